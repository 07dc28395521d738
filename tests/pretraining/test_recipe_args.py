"""Recipe options: YAML plus command-line overrides into typed dataclasses (PretrainConfig; the post-training recipes'
own options and TRL config), the shipped recipes, and every recipe's --help."""

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers.trainer_utils import IntervalStrategy
from trl import DPOConfig

from apertus_hf.pretraining import PretrainConfig
from apertus_hf.recipe_args import (
    RecipeArgumentError,
    parse_recipe_args,
    parse_recipe_configs,
    recipe_configs_from_dict,
)
from apertus_hf.trainers.dpo import DPO_RECIPE
from apertus_hf.trainers.qrpo_recipe import QRPO_RECIPE
from apertus_hf.trainers.sft import SFT_RECIPE
from tests.pretraining.conftest import REPO_ROOT

RECIPES = sorted((REPO_ROOT / "recipes" / "configs").glob("*/pretrain.yaml"))


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 70\nlearning_rate: 1e-3\ndata: [{path: a.jsonl, weight: 2}]\n")
    config = parse_recipe_args(
        PretrainConfig,
        ["--config", str(recipe), "--learning_rate", "2e-3", "--goldfish=false", "--report_to", "[tensorboard]"],
    )
    assert config.max_steps == 70
    assert config.learning_rate == 2e-3
    assert config.goldfish is False
    assert config.report_to == ["tensorboard"]
    assert config.data == [{"path": "a.jsonl", "weight": 2}]
    assert config.seq_len == PretrainConfig().seq_len


def test_ints_are_accepted_for_floats_and_numbers_for_strings():
    config = parse_recipe_args(PretrainConfig, ["--learning_rate", "1", "--output_dir", "2026"])
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.output_dir == "2026"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--learning_rat", "1e-3"],
            "Unknown option 'learning_rat' in the command line. Did you mean 'learning_rate'?",
        ),
        (["--max_steps", "ten"], "max_steps (from the command line)='ten' is not a valid int"),
        (["--goldfish", "maybe"], "goldfish (from the command line)='maybe' is not a valid bool"),
        (["--optimizer", "sgd"], "optimizer (from the command line)='sgd' is not a valid 'ademamix' | 'adamw'"),
        (["--max_steps"], "Option --max_steps has no value"),
        (["max_steps", "3"], "Expected an option like --key value, got 'max_steps'"),
        (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
    ],
)
def test_bad_options_are_named(argv, message):
    with pytest.raises(RecipeArgumentError) as error:
        parse_recipe_args(PretrainConfig, argv)
    assert message in str(error.value)


def test_unknown_yaml_key_names_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seq_length: 128\n")
    with pytest.raises(RecipeArgumentError, match=f"Unknown option 'seq_length' in {recipe}. Did you mean 'seq_len'"):
        parse_recipe_args(PretrainConfig, ["--config", str(recipe)])


def test_invalid_values_are_rejected_by_the_config():
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
        parse_recipe_args(PretrainConfig, ["--seq_len", "0"])


def test_help_lists_every_option_with_its_help(capsys):
    with pytest.raises(SystemExit):
        parse_recipe_args(PretrainConfig, ["--help"])
    printed = capsys.readouterr().out
    for field in dataclasses.fields(PretrainConfig):
        assert f"--{field.name} (" in printed
        assert field.metadata["help"] in printed


def test_every_option_has_help_text():
    assert all(field.metadata.get("help") for field in dataclasses.fields(PretrainConfig))


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.parent.name for path in RECIPES])
def test_shipped_recipes_are_valid(recipe: Path):
    config = parse_recipe_args(PretrainConfig, ["--config", str(recipe)])
    assert config.max_steps > config.warmup_steps


def test_shipped_recipes_cover_every_size():
    assert [path.parent.name for path in RECIPES] == ["125m", "1b", "70b", "8b", "tiny"]


def test_the_tiny_recipe_is_the_embedded_default():
    written = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / "tiny" / "pretrain.yaml").read_text())
    defaults = dataclasses.asdict(PretrainConfig())
    assert {key: defaults[key] for key in written} == written


# Several dataclasses from one recipe: the post-training recipes fill their own small one and a TRL config.


@dataclasses.dataclass
class DataOptions:
    dataset: str = dataclasses.field(default="data/chat", metadata={"help": "Training data."})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank."})
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list, metadata={"help": "Sources."})


def test_each_key_lands_in_the_dataclass_that_has_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: my/chat\nlearning_rate: 1e-3\neval_strategy: no\nloss_type: [sigmoid, ipo]\n"
        "sources: [{path: a.jsonl, weight: 2}]\nlr_scheduler_kwargs: {num_cycles: 2}\n"
    )
    ours, args = parse_recipe_configs(
        [DataOptions, DPOConfig],
        ["--config", str(recipe), "--lora_r", "4", "--warmup_steps", "0.03", "--report_to", "none"],
        defaults={"learning_rate": 5e-4, "bf16": False, "output_dir": "outputs/x"},
    )
    assert (ours.dataset, ours.lora_r, ours.sources) == ("my/chat", 4, [{"path": "a.jsonl", "weight": 2}])
    assert args.learning_rate == 1e-3  # the file wins over the recipe's default
    assert args.output_dir == "outputs/x" and args.bf16 is False  # the recipe's defaults win over the class's
    assert args.eval_strategy == IntervalStrategy.NO  # YAML 1.1 reads `no` as false
    assert args.loss_type == ["sigmoid", "ipo"] and args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert args.warmup_steps == 0.03 and args.get_warmup_steps(100) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--learning_rat", "1e-3"],
            "Unknown option 'learning_rat' in the command line. Did you mean 'learning_rate'?",
        ),
        (["--lora_rr", "4"], "Unknown option 'lora_rr' in the command line. Did you mean 'lora_r'?"),
        # A string the class validates itself.
        (["--eval_strategy", "sometimes"], "sometimes is not a valid IntervalStrategy, please select one of"),
        (["--eval_strategy", "[steps]"], "is not a valid IntervalStrategy | str"),
        (["--per_device_train_batch_size", "1.5"], "per_device_train_batch_size (from the command line)=1.5 is not"),
    ],
)
def test_bad_options_of_several_dataclasses_are_named(argv, message):
    with pytest.raises(ValueError) as error:
        parse_recipe_configs([DataOptions, DPOConfig], [*argv, "--bf16", "false"])
    assert message in str(error.value)


def test_an_option_of_two_dataclasses_is_refused():
    @dataclasses.dataclass
    class Clashing:
        learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "Learning rate."})

    with pytest.raises(TypeError, match="'learning_rate' is a field of both Clashing and DPOConfig"):
        recipe_configs_from_dict([Clashing, DPOConfig], {})


def test_no_post_training_option_has_two_owners():
    for spec in (SFT_RECIPE, DPO_RECIPE, QRPO_RECIPE):
        ours = {field.name for field in dataclasses.fields(spec.arguments_class)}
        assert not ours & {field.name for field in dataclasses.fields(spec.config_class)}, spec.stage
        assert set(spec.config_defaults) <= {field.name for field in dataclasses.fields(spec.config_class)}


# The embedded default runs, as they were before the TRL configs owned these options (one logging_steps for all).
EMBEDDED_DEFAULTS = {
    "sft": {
        "output_dir": "outputs/sft-tiny", "model_name_or_path": "outputs/pretrain-tiny/model", "dataset": "data/chat",
        "eval_dataset_split": "test", "learning_rate": 3e-3, "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16, "num_train_epochs": 1.0, "max_length": 256, "save_steps": 50,
        "eval_steps": 50, "eval_on_start": True, "assistant_only_loss": True, "use_ademamix": True,
    },
    "dpo": {
        "output_dir": "outputs/dpo-tiny", "model_name_or_path": "outputs/sft-tiny",
        "dataset": "outputs/qrpo-data-tiny", "learning_rate": 1e-4, "per_device_train_batch_size": 16,
        "num_train_epochs": 1.0, "max_length": 256, "save_steps": 50, "beta": 0.1, "loss_type": ["sigmoid"],
        "use_ademamix": False,
    },
    "qrpo": {
        "output_dir": "outputs/qrpo-tiny", "model_name_or_path": "outputs/sft-tiny",
        "dataset": "outputs/qrpo-data-tiny", "eval_fraction": 0.1, "learning_rate": 1e-3,
        "per_device_train_batch_size": 16, "num_train_epochs": 4.0, "max_length": 1024, "save_steps": 500,
        "beta": 5.0, "transform": "identity", "use_ademamix": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("spec", [SFT_RECIPE, DPO_RECIPE, QRPO_RECIPE], ids=lambda spec: spec.stage)
def test_post_training_defaults_are_the_embedded_runs(spec):
    recipe, args = spec.parse([])
    values = {**dataclasses.asdict(recipe), **{name: getattr(args, name) for name in EMBEDDED_DEFAULTS[spec.stage]
                                                 if hasattr(args, name)}}  # fmt: skip
    assert {name: values[name] for name in EMBEDDED_DEFAULTS[spec.stage]} == EMBEDDED_DEFAULTS[spec.stage]
    assert (args.logging_steps, args.save_total_limit, args.seed, args.max_grad_norm, args.weight_decay) == (
        5,
        2,
        42,
        1,
        0,
    )
    # TRL defaults to bf16 and gradient checkpointing; the CPU default runs use neither.
    assert (args.bf16, args.activation_checkpointing, args.push_to_hub, args.hub_private_repo) == (
        False,
        False,
        False,
        None,
    )
    # Before, the recipe's warmup_ratio 0.03 went into warmup_steps, which transformers reads as a ratio below 1: the
    # same warmup of ceil(3% of the steps).
    assert args.warmup_steps == 0.03
    assert [args.get_warmup_steps(steps) for steps in (10, 100, 150, 1000)] == [1, 3, 5, 30]


def test_push_to_hub_is_refused_for_our_card():
    with pytest.raises(ValueError, match="set hub_model_id only"):
        SFT_RECIPE.parse(["--push_to_hub", "true"])


RECIPE_SCRIPTS = ["pretrain.py", "qrpo_prepare.py", "sft.py", "dpo.py", "qrpo.py"]


@pytest.mark.parametrize("script", RECIPE_SCRIPTS)
def test_every_recipe_help_shows_usage_config_and_options(script, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"recipe_{script[:-3]}", REPO_ROOT / "recipes" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"recipes/{script}", "--help"])
    with pytest.raises(SystemExit) as exit_code:
        module.main()
    assert exit_code.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: recipes/{script} [--config RECIPE.yaml] [--key value ...]\n")
    assert "\n  --config RECIPE.yaml\n" in printed
    assert "\n  --output_dir (" in printed
    if script in ("sft.py", "dpo.py", "qrpo.py"):
        # The TRL config: where its options are documented, and those the recipe sets with the recipe's default, not
        # its ~150 TrainingArguments fields.
        assert "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments" in printed
        assert "\n  --learning_rate (float, default " in printed and "\n  --model_name_or_path (" in printed
        assert "\n  --warmup_steps (float, default 0.03)" in printed
        assert "--adam_beta1 (" not in printed and len(printed.splitlines()) < 200
