"""loss_averaging: the default mean over all kept targets of a step, and Megatron's mean of micro-batch means (without
--calculate-per-token-loss), on micro-batches with unequal numbers of kept targets."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from apertus_hf import ApertusForCausalLM
from apertus_hf.data import IGNORE_INDEX, PackedBatchCollator
from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.pretraining.step import train_step
from tests.helpers import tiny_config
from tests.pretraining.conftest import tiny_run, write_recipe
from tests.pretraining.test_distributed import ACCELERATE, CONFIGS, CPU_OVERRIDES, _launch


def unequal_micro_batches() -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of two packed rows of 24 tokens (documents of 10 and 14): the first keeps its 44 targets,
    the second only 3."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).tolist()
    batches = []
    for kept in (None, 3):
        rows = []
        for _ in range(2):
            ids = torch.randint(4, 256, (24,), generator=generator)
            labels = ids.clone()
            labels[[0, 10]] = IGNORE_INDEX  # the <s> of each document
            rows.append({"input_ids": ids.tolist(), "position_ids": positions, "labels": labels.tolist()})
        batch = PackedBatchCollator(goldfish_k=None)(rows)
        if kept is not None:
            labels = torch.full_like(batch["labels"], IGNORE_INDEX)
            labels[0, 4 : 4 + kept] = batch["labels"][0, 4 : 4 + kept]
            batch["labels"] = labels
        batches.append(batch)
    return batches


def fresh_model() -> ApertusForCausalLM:
    torch.manual_seed(0)
    return ApertusForCausalLM(tiny_config()).train()


class GradientRecordingSGD(torch.optim.SGD):
    """SGD with learning rate 0 that keeps the gradients it was given at its last step."""

    def step(self, closure=None):
        self.gradients = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def run_train_step(loss_averaging: str, batches: list[dict[str, torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    """train_step on a fresh tiny model, one process, `len(batches)` micro-batches: the step's loss and gradients."""
    model = fresh_model()
    optimizer = GradientRecordingSGD(model.parameters(), lr=0.0)
    run = SimpleNamespace(
        accelerator=Accelerator(cpu=True, gradient_accumulation_steps=len(batches)),
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        config=PretrainConfig(loss_averaging=loss_averaging, max_grad_norm=0.0),
    )
    output = train_step(run, batches)
    return output.loss.item(), optimizer.gradients


def direct_losses(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Both objectives from the full logits and plain cross-entropy, with the gradients of each."""
    sums, counts = [], []
    model = fresh_model()
    for batch in batches:
        inputs = {key: batch[key] for key in ("input_ids", "position_ids", "seq_idx")}
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        sums.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        counts.append((targets != IGNORE_INDEX).sum())
    objectives = {
        "per_token": torch.stack(sums).sum() / torch.stack(counts).sum(),
        "per_micro_batch": torch.stack([s / c for s, c in zip(sums, counts, strict=True)]).mean(),
    }
    result = {}
    for name, objective in objectives.items():
        model.zero_grad()
        objective.backward(retain_graph=True)
        result[name] = (objective.item(), [p.grad.clone() for p in model.parameters()])
    return result


def test_micro_batches_have_unequal_target_counts():
    counts = [(batch["labels"][:, 1:] != IGNORE_INDEX).sum().item() for batch in unequal_micro_batches()]
    assert counts == [44, 3]


@pytest.mark.parametrize("loss_averaging", ["per_token", "per_micro_batch"])
def test_train_step_loss_and_gradients_are_those_of_its_objective(loss_averaging):
    batches = unequal_micro_batches()
    loss, gradients = run_train_step(loss_averaging, batches)
    expected_loss, expected_gradients = direct_losses(batches)[loss_averaging]
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for gradient, expected in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-7)


def test_per_micro_batch_weighs_a_micro_batch_of_few_targets_as_much_as_a_full_one():
    batches = unequal_micro_batches()
    direct = direct_losses(batches)
    per_token, per_micro_batch = direct["per_token"][0], direct["per_micro_batch"][0]
    # The 3 targets of the second micro-batch count for half of the step instead of 3/47 of it.
    assert abs(per_micro_batch - per_token) > 0.05
    assert run_train_step("per_micro_batch", batches)[0] == pytest.approx(per_micro_batch, rel=1e-5)
    assert run_train_step("per_token", batches)[0] == pytest.approx(per_token, rel=1e-5)


def test_loss_averaging_must_be_a_known_name():
    with pytest.raises(ValueError, match="loss_averaging='per_sample' must be per_token or per_micro_batch"):
        PretrainConfig(loss_averaging="per_sample")


@pytest.mark.slow
def test_ddp_over_two_processes_averages_like_two_micro_batches_of_one(tmp_path, small_corpus, monkeypatch):
    """per_micro_batch averages over data-parallel ranks as over micro-batches: two processes of one micro-batch of 2
    rows train exactly as one process accumulating two micro-batches of 2 rows (the global row order deals the same
    micro-batches), and differently from per_token on the same rows: Goldfish with k=2 drops about half of the targets, so the
    micro-batches keep unequal numbers of them."""
    options = {"max_steps": 4, "eval_documents": 4, "eval_steps": 0, "checkpoint_steps": 0, "logging_steps": 1}
    options |= {"per_device_batch_size": 2, "loss_averaging": "per_micro_batch", "goldfish_k": 2, "goldfish_h": 2}
    single = pretrain(
        PretrainConfig(**tiny_run(tmp_path / "single", small_corpus, gradient_accumulation_steps=2, **options))
    )
    AcceleratorState._reset_state(True)
    per_token = pretrain(
        PretrainConfig(
            **tiny_run(
                tmp_path / "per_token",
                small_corpus,
                gradient_accumulation_steps=2,
                **{**options, "loss_averaging": "per_token"},
            )
        )
    )
    AcceleratorState._reset_state(True)

    ddp_dir = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "ddp.yaml", tiny_run(ddp_dir, small_corpus, **options))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    _launch(["--config", str(recipe)], [*ACCELERATE, "--config_file", str(CONFIGS / "ddp.yaml"), *CPU_OVERRIDES])
    ddp_records = read_metrics(ddp_dir / "metrics.jsonl")
    single_records = read_metrics(single.output_dir / "metrics.jsonl")
    per_token_records = read_metrics(per_token.output_dir / "metrics.jsonl")
    assert [record["step"] for record in ddp_records] == [1, 2, 3, 4]
    for single_record, ddp_record in zip(single_records, ddp_records, strict=True):
        assert ddp_record["train/loss"] == pytest.approx(single_record["train/loss"], rel=1e-5)
        assert ddp_record["train/grad_norm"] == pytest.approx(single_record["train/grad_norm"], rel=1e-5)
    # The gradient norms differ from per_token's (the losses of a fresh model differ less: every target costs about the
    # same): by 0.03% to 0.7% over the 4 steps of these rows, far more than the 1e-5 of the comparison above.
    differences = [
        abs(record["train/grad_norm"] / per_token_record["train/grad_norm"] - 1)
        for record, per_token_record in zip(single_records, per_token_records, strict=True)
    ]
    assert max(differences) > 5e-3 and min(differences) > 1e-4, differences
