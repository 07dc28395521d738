"""Recipe options: YAML plus command-line overrides into the typed PretrainConfig, and the shipped recipes."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from apertus_hf.pretraining import PretrainConfig
from apertus_hf.recipe_args import RecipeArgumentError, parse_recipe_args
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


def test_the_apertus_recipes_carry_the_spec_values():
    eight_b = parse_recipe_args(PretrainConfig, ["--config", str(REPO_ROOT / "recipes/configs/8b/pretrain.yaml")])
    seventy_b = parse_recipe_args(PretrainConfig, ["--config", str(REPO_ROOT / "recipes/configs/70b/pretrain.yaml")])
    for config, processes in ((eight_b, 256), (seventy_b, 2048)):
        assert (config.seq_len, config.goldfish_k, config.goldfish_h, config.max_grad_norm) == (4096, 50, 50, 0.1)
        assert (config.adam_beta1, config.adam_beta2, config.ademamix_beta3, config.ademamix_alpha) == (
            0.9,
            0.999,
            0.9999,
            8.0,
        )
        assert (config.ademamix_warmup_steps, config.weight_decay, config.min_lr_ratio) == (100_000, 0.1, 0.1)
        assert config.decay_shape == "1-sqrt" and config.decay_fraction == 0.11
        # 16.78B warmup tokens.
        rows_per_step = config.per_device_batch_size * processes
        assert config.warmup_steps * rows_per_step * config.seq_len == pytest.approx(16.78e9, rel=0.01)
        assert config.gradient_accumulation_at(config.max_steps - 1) == 2 * config.gradient_accumulation_at(0)
    assert (eight_b.model_preset, eight_b.learning_rate) == ("apertus-8b", 1.1e-4)
    assert (seventy_b.model_preset, seventy_b.learning_rate) == ("apertus-70b", 1e-5)
