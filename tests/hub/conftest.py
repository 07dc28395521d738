"""Model folders as the training runs save them, for the publishing tests: a pretrained model (weights, tokenizer,
generation config, the resolved recipe, `training_facts.json` and an evaluation result), a post-trained one for each
of sft, dpo and qrpo (with the README.md draft that TRL's trainers write), and a LoRA adapter."""

import json
import shutil
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, GenerationConfig
from trl.trainer.utils import generate_model_card

from apertus_hf import ApertusConfig, ApertusForCausalLM
from apertus_hf.evaluation.common import EvalResult
from apertus_hf.training_facts import TrainingFacts
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, TINY_MODEL

CORPUS = REPO_ROOT / "data" / "corpus"
CHAT_DATA = REPO_ROOT / "data" / "chat"
CORPUS_LANGUAGES = {"en", "fr", "it", "es", "de", "rm"}
BASE_MODEL_ID = "swiss-ai/Apertus-8B-2509"
PREFERENCE_DATASET_ID = "HuggingFaceH4/ultrafeedback_binarized"
TINY_SHARD = "1.2MB"  # the tiny model's 2.2 MB of weights (two 1 MB embedding matrices) become several shards
DPO_CITATION = "@inproceedings{rafailov2023direct,\n  title = {{Direct Preference Optimization}},\n  year = {2023}\n}"


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    """Runs record their data relative to the working directory (portable_path); the tests run from the repo."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        yield


def pretraining_facts(**overrides) -> TrainingFacts:
    """What a 4-step pretraining run on two processes, 4 rows of 64 tokens each per step, records."""
    values = {
        "stage": "pretraining",
        "base_model": None,
        "datasets": [str(CORPUS)],
        "context_length": 64,
        "steps": 4,
        "tokens_seen": 4 * 64 * 4 * 2,
        "eval_results": {"loss": 5.25, "perplexity": 190.57},
        "license": "apache-2.0",
        "hyperparameters": {"Peak learning rate": "0.003", "Goldfish loss": "on: k=50, h=13"},
        "tags": ["goldfish-loss"],
        "recipe_file": "pretrain_config.yaml",
    }
    return TrainingFacts(**{**values, **overrides})


def save_model_folder(folder: Path, facts: TrainingFacts | None) -> Path:
    """The tiny Apertus model (untrained) saved as a run saves it: weights, config, generation config, tokenizer,
    and the run's facts."""
    config = ApertusConfig(vocab_size=8192, **TINY_MODEL)
    ApertusForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER).save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    if facts is not None:
        facts.save(folder)
    return folder


def trl_readme(stage: str, base_model: str | None = BASE_MODEL_ID) -> str:
    """The README.md that TRL's trainers write on save (its own generator and template)."""
    card = generate_model_card(
        base_model=base_model,
        model_name="tiny",
        hub_model_id="org/tiny",
        dataset_name=None,
        tags=["trl", stage],
        wandb_url=None,
        trackio_url=None,
        trainer_name=stage.upper(),
    )
    return str(card)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretraining export with its recipe and a perplexity result from eval/."""
    folder = save_model_folder(tmp_path_factory.mktemp("pretrained") / "model", pretraining_facts())
    recipe = {"output_dir": "outputs/tiny", "data": [{"path": "data/corpus"}], "seq_len": 64, "max_steps": 4}
    (folder / "pretrain_config.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    EvalResult(
        evaluation="perplexity",
        model="outputs/tiny/model",
        task_name="perplexity",
        task_type="text-generation",
        dataset_name="shipped corpus",
        dataset_type="local",
        metrics={"perplexity": 4321.5, "bits_per_byte": 3.25},
    ).write(folder / "eval_results" / "perplexity.json")
    return folder


@pytest.fixture
def model_copy(pretrained, tmp_path) -> Path:
    return Path(shutil.copytree(pretrained, tmp_path / "model"))


def post_training_facts(stage: str, **overrides) -> TrainingFacts:
    values = {
        "stage": stage,
        "base_model": BASE_MODEL_ID,
        "datasets": [PREFERENCE_DATASET_ID if stage != "sft" else str(CHAT_DATA / "train.jsonl")],
        "context_length": 512,
        "steps": 20,
        "eval_results": {"loss": 0.625},
        "license": "apache-2.0",
        "hyperparameters": {"Learning rate": "5e-07"},
        "tags": [stage],
        "citations": [DPO_CITATION] if stage == "dpo" else [],
        "recipe_file": f"{stage}_config.yaml",
    }
    return TrainingFacts(**{**values, **overrides})


@pytest.fixture
def post_trained(pretrained, tmp_path):
    """`post_trained(stage)`: a full model folder post-trained by `stage`, with TRL's README.md draft."""

    def make(stage: str, **facts) -> Path:
        folder = Path(shutil.copytree(pretrained, tmp_path / stage))
        shutil.rmtree(folder / "eval_results")
        (folder / "pretrain_config.yaml").unlink()
        (folder / f"{stage}_config.yaml").write_text(json.dumps({"model_name_or_path": BASE_MODEL_ID}))
        post_training_facts(stage, **facts).save(folder)
        (folder / "README.md").write_text(trl_readme(stage))
        return folder

    return make


@pytest.fixture(scope="module")
def adapter(pretrained, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model saved by an SFT run (adapter weights and config, tokenizer, generation
    config, facts, TRL's README.md), its base named by Hub id."""
    folder = tmp_path_factory.mktemp("adapter") / "sft-lora"
    base = ApertusForCausalLM.from_pretrained(pretrained)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": BASE_MODEL_ID})
    )
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    GenerationConfig.from_pretrained(pretrained).save_pretrained(folder)
    post_training_facts("sft", adapter=True, tags=["sft", "lora"]).save(folder)
    (folder / "README.md").write_text(trl_readme("sft"))
    return folder
