"""QRPOTrainer on a tiny model: its data checks, reference log-probs, loss, training, LoRA and model card."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.preference import PreferenceLayout, qrpo_dataset_layout
from apertus_hf.trainers import QRPOConfig, QRPODatasetError, QRPOTrainer, qrpo_loss
from apertus_hf.trainers.qrpo import DataCollatorForQRPO
from tests.pretraining.conftest import SHIPPED_TOKENIZER, TINY_MODEL


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


def tiny_model(seed: int = 0) -> ApertusForCausalLM:
    torch.manual_seed(seed)
    return ApertusForCausalLM(ApertusConfig.from_preset("small", **TINY_MODEL, vocab_size=8192))


def paired_rows(count: int = 8) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Name a colour, number {index}."}],
            "chosen": [{"role": "assistant", "content": "Red, like a poppy."}],
            "rejected": [{"role": "assistant", "content": "I do not know."}],
            "chosen_reward": 2.0,
            "rejected_reward": -1.0,
            "ref_rewards": [-1.0, 0.0, 0.5, 1.0],
        }
        for index in range(count)
    ]


def unpaired_rows(count: int = 8) -> list[dict]:
    return [
        {
            "prompt": f"Count to {index % 4 + 2}:",
            "completion": " one two" if index % 2 else " zebra",
            "reward": 1.0 if index % 2 else 0.0,
            "ref_rewards": [0.0, 0.0, 1.0],
        }
        for index in range(count)
    ]


def config(tmp_path, **overrides) -> QRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "qrpo"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=3e-3,
        max_steps=8,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    return QRPOConfig(**{**values, **overrides})


def sequence_logps(model, tokenizer, prompt_ids, completion_ids) -> float:
    """log pi(completion | prompt) from full logits, independent of the trainer's fused head."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    targets = ids[0, 1:]
    token_logps = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1 :].sum().item()


# --- data checks ------------------------------------------------------------------------------------------------------


def test_layouts_are_detected():
    assert qrpo_dataset_layout(Dataset.from_list(paired_rows())) == "paired"
    assert qrpo_dataset_layout(Dataset.from_list(unpaired_rows())) == "unpaired"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda rows: [{k: v for k, v in row.items() if k != "reward"} for row in rows],
            r"misses the columns \['reward'\]",
        ),
        (
            lambda rows: [*rows[:3], {**rows[3], "ref_rewards": [0.0, 1.0]}, *rows[4:]],
            "Row 3 .* 2 ref_rewards, but row 0 has 3",
        ),
        (lambda rows: [*rows[:2], {**rows[2], "ref_rewards": []}, *rows[3:]], r"Row 2 .* ref_rewards=\[\]"),
        (lambda rows: [*rows[:5], {**rows[5], "reward": math.nan}, *rows[6:]], "Row 5 .* reward=nan"),
        (
            lambda rows: [*rows[:1], {**rows[1], "ref_rewards": [0.0, math.inf, 1.0]}, *rows[2:]],
            "Row 1 .* ref_rewards entry inf",
        ),
        (lambda rows: [*rows[:4], {**rows[4], "prompt": ""}, *rows[5:]], "Row 4 .* empty prompt"),
    ],
)
def test_bad_rows_are_named(change, message):
    with pytest.raises(QRPODatasetError, match=message):
        qrpo_dataset_layout(Dataset.from_list(change(unpaired_rows())))


def test_bad_dataset_fails_before_training(tmp_path, tokenizer):
    rows = paired_rows()
    rows[6]["chosen_reward"] = math.nan
    with pytest.raises(QRPODatasetError, match="Row 6 of the train dataset has chosen_reward=nan"):
        QRPOTrainer(
            tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )


def test_collator_flattens_pairs_chosen_first():
    rows = [
        {
            "prompt_ids": [1, 5],
            "chosen_ids": [6, 7],
            "rejected_ids": [8],
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "ref_rewards": [0.5],
        },
        {
            "prompt_ids": [1],
            "chosen_ids": [9],
            "rejected_ids": [10, 11, 12],
            "chosen_reward": 2.0,
            "rejected_reward": 1.0,
            "ref_rewards": [0.5],
        },
    ]
    batch = DataCollatorForQRPO(pad_token_id=3, layout=PreferenceLayout.PAIRED)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, 3, 3], [1, 5, 8, 3], [1, 10, 11, 12]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["rewards"].tolist() == [1.0, 2.0, 0.0, 1.0]
    assert batch["member"].tolist() == [0, 0, 1, 1]


def test_an_eval_dataset_of_another_layout_is_refused(tmp_path, tokenizer):
    with pytest.raises(QRPODatasetError, match="The eval dataset is unpaired but the train dataset is paired"):
        QRPOTrainer(
            tiny_model(),
            args=config(tmp_path),
            train_dataset=Dataset.from_list(paired_rows(4)),
            eval_dataset=Dataset.from_list(unpaired_rows(4)),
            processing_class=tokenizer,
        )
    with pytest.raises(QRPODatasetError, match="The eval pairs dataset is paired but the train dataset is unpaired"):
        QRPOTrainer(
            tiny_model(),
            args=config(tmp_path),
            train_dataset=Dataset.from_list(unpaired_rows(4)),
            eval_dataset={"same": Dataset.from_list(unpaired_rows(4)), "pairs": Dataset.from_list(paired_rows(4))},
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("rows", [paired_rows(4), unpaired_rows(4)], ids=["paired", "unpaired"])
def test_metrics_regroup_each_member_by_the_layout_the_collator_stacked(tmp_path, tokenizer, rows):
    """The trainer reads the layout once; the collator stacks every row's first member, then every row's second, and
    the metrics regroup by the same layout: each member's implied reward beta * (log pi - log pi_ref) is its own."""
    layout = qrpo_dataset_layout(Dataset.from_list(rows))
    # Reference log-probs far apart for the two members: a chosen/rejected swap would show.
    for index, row in enumerate(rows):
        for member, offset in zip(layout.members, (-40.0, -10.0), strict=False):
            row["ref_logps" if member == "completion" else f"ref_{member}_logps"] = offset - index
    dataset = Dataset.from_list(rows)
    trainer = QRPOTrainer(
        tiny_model(), args=config(tmp_path), train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.layout is layout and trainer.data_collator.layout is layout

    metrics = trainer.evaluate()
    policy = tiny_model()
    implied = {}
    for member in layout.members:
        column = "ref_logps" if member == "completion" else f"ref_{member}_logps"
        values = [
            min(5.0 / len(row[f"{member}_ids"]), 0.1)
            * (sequence_logps(policy, tokenizer, row["prompt_ids"], row[f"{member}_ids"]) - row[column])
            for row in trainer.eval_dataset
        ]
        implied[member] = torch.tensor(values, dtype=torch.float64)
    everything = torch.cat(list(implied.values()))
    assert metrics["eval_implied_reward"] == pytest.approx(everything.mean().item(), rel=1e-4)
    if layout is PreferenceLayout.PAIRED:
        chosen, rejected = implied["chosen"], implied["rejected"]
        assert metrics["eval_implied_reward/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-4)
        assert metrics["eval_implied_reward/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-4)
        assert metrics["eval_implied_reward/margin"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-4)
        assert metrics["eval_implied_reward/accuracy"] == (chosen > rejected).double().mean().item()
    else:
        assert not any(key.startswith("eval_implied_reward/") for key in metrics)


# --- reference log-probs and loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [paired_rows(4), unpaired_rows(4)], ids=["chat-paired", "text-unpaired"])
def test_reference_logps_are_the_initial_policy_and_the_loss_is_qrpo_loss(tmp_path, tokenizer, rows):
    reference = tiny_model()
    trainer = QRPOTrainer(
        tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    dataset = trainer.train_dataset
    members = ("chosen", "rejected") if "chosen_ids" in dataset.column_names else ("completion",)
    for row in dataset:
        for member in members:
            column = "ref_logps" if member == "completion" else f"ref_{member}_logps"
            expected = sequence_logps(reference, tokenizer, row["prompt_ids"], row[f"{member}_ids"])
            assert row[column] == pytest.approx(expected, abs=1e-4)
    if members == ("completion",):
        # Text completions end with EOS; chat ones with the template's end of turn.
        assert all(row["completion_ids"][-1] == tokenizer.eos_token_id for row in dataset)
    else:
        assert all(tokenizer.decode(row["chosen_ids"]).endswith("<|assistant_end|>") for row in dataset)

    batch = trainer.data_collator([dataset[index] for index in range(len(dataset))])
    logps = torch.tensor(
        [
            sequence_logps(reference, tokenizer, row["prompt_ids"], row[f"{member}_ids"])
            for member in members
            for row in dataset
        ]
    )
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    expected = qrpo_loss(
        logps,
        batch["ref_logps"].double(),
        batch["rewards"],
        batch["ref_rewards"],
        beta=5.0,
        completion_lengths=batch["completion_mask"].sum(-1),
        length_normalize=True,
    ).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_reference_logps_from_the_dataset_are_kept(tmp_path, tokenizer):
    rows = [{**row, "ref_logps": -7.5 - index} for index, row in enumerate(unpaired_rows(4))]
    trainer = QRPOTrainer(
        tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    assert trainer.train_dataset["ref_logps"] == [-7.5, -8.5, -9.5, -10.5]


def test_ref_model_gives_the_reference_and_is_released(tmp_path, tokenizer):
    reference = tiny_model(seed=1)
    trainer = QRPOTrainer(
        tiny_model(),
        ref_model=reference,
        args=config(tmp_path),
        train_dataset=Dataset.from_list(unpaired_rows(2)),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    assert row["ref_logps"] == pytest.approx(
        sequence_logps(tiny_model(seed=1), tokenizer, row["prompt_ids"], row["completion_ids"]), abs=1e-4
    )
    assert trainer.ref_model is None


# --- training ---------------------------------------------------------------------------------------------------------


def test_training_regresses_the_log_ratio_onto_the_quantile_target(tmp_path, tokenizer):
    dataset = Dataset.from_list(paired_rows(8))
    trainer = QRPOTrainer(
        tiny_model(),
        args=config(tmp_path, max_steps=12),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_implied_reward/margin"] > before["eval_implied_reward/margin"] + 0.05
    assert after["eval_implied_reward/accuracy"] == 1.0
    logged = [entry for entry in trainer.state.log_history if "quantile_reward" in entry]
    assert logged and {"loss", "log_ratio", "implied_reward", "target", "beta", "implied_reward/margin"} <= set(
        logged[0]
    )
    assert logged[0]["quantile_reward"] == pytest.approx((1.0 + 0.25) / 2)


def test_lora_trains_adapters_against_the_base_model(tmp_path, tokenizer):
    base = tiny_model()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")
    dataset = Dataset.from_list(paired_rows(8))
    trainer = QRPOTrainer(
        base, args=config(tmp_path, max_steps=6), train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    frozen = {name: tensor.clone() for name, tensor in trainer.model.named_parameters() if "lora_" not in name}
    trainer.train()
    assert all(
        torch.equal(tensor, frozen[name]) for name, tensor in trainer.model.named_parameters() if "lora_" not in name
    )
    assert any(
        not torch.equal(module.weight, torch.zeros_like(module.weight))
        for name, module in trainer.model.named_modules()
        if name.endswith("lora_B.default")
    )

    trainer.save_model()
    saved = tmp_path / "qrpo"
    assert (saved / "adapter_config.json").is_file() and (saved / "README.md").is_file()


def test_reference_of_an_adapted_model_has_adapters_disabled(tmp_path, tokenizer):
    """A PeftModel passed as the policy: its reference is the base model, not base + adapter."""
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    adapted = get_peft_model(tiny_model(), lora)
    trainer = QRPOTrainer(
        adapted, args=config(tmp_path), train_dataset=Dataset.from_list(unpaired_rows(2)), processing_class=tokenizer
    )
    row = trainer.train_dataset[0]
    base_logps = sequence_logps(tiny_model(), tokenizer, row["prompt_ids"], row["completion_ids"])
    assert row["ref_logps"] == pytest.approx(base_logps, abs=1e-4)
    with torch.no_grad():
        adapted_logps = QRPOTrainer._sequence_logps(trainer.model, trainer.data_collator([row]))
    assert abs(adapted_logps.item() - base_logps) > 1e-3


def test_saved_model_has_a_qrpo_model_card_and_loads(tmp_path, tokenizer):
    trainer = QRPOTrainer(
        tiny_model(),
        args=config(tmp_path, max_steps=2),
        train_dataset=Dataset.from_list(unpaired_rows(4)),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "qrpo" / "README.md").read_text()
    assert "QRPO" in card and "2507.08068" in card and "matrenok2025qrpo" in card
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qrpo")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)


def test_log_ratio_starts_at_zero_under_mixed_precision(tmp_path, tokenizer):
    """The reference pass runs under the training autocast, so an untrained policy has log-ratio exactly 0."""
    args = config(tmp_path, bf16=True, learning_rate=0.0, max_steps=1, logging_steps=1)
    trainer = QRPOTrainer(
        tiny_model(), args=args, train_dataset=Dataset.from_list(paired_rows(4)), processing_class=tokenizer
    )
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "log_ratio" in entry)
    assert logged["log_ratio"] == 0.0


def test_lora_on_the_lm_head_is_trained_and_scored(tmp_path, tokenizer):
    """TRL's fused head reads the base LM-head weight only; with a LoRA there, the logits path is used."""
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    trainer = QRPOTrainer(
        tiny_model(),
        args=config(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(unpaired_rows(4)),
        processing_class=tokenizer,
        peft_config=lora,
    )
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    adapted = trainer.model
    with torch.no_grad():
        scored = QRPOTrainer._sequence_logps(adapted, batch).item()
        logits = adapted(input_ids=batch["input_ids"], use_cache=False).logits[0, :-1].double()
    targets = batch["input_ids"][0, 1:]
    expected = (logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0] * batch["completion_mask"][0, 1:]).sum()
    assert scored == pytest.approx(expected.item(), abs=1e-4)
    head_b = adapted.base_model.model.lm_head.lora_B.default.weight.clone()
    trainer.train()
    assert not torch.equal(adapted.base_model.model.lm_head.lora_B.default.weight, head_b)


def test_an_empty_completion_is_scored_on_its_end_token(tmp_path, tokenizer):
    rows = unpaired_rows(4)
    rows[2]["completion"] = ""  # the policy stopped at once: a real sample
    trainer = QRPOTrainer(
        tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    assert trainer.train_dataset[2]["completion_ids"] == [tokenizer.eos_token_id]
