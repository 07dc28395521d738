"""Publishing: a round trip through a fake Hub that stock transformers (without apertus_hf) downloads from, the
card written into the folder, sharding, privacy, dry runs and the command line."""

import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
from accelerate.state import AcceleratorState

from apertus_hf.hub import CARD_MARKER, publish
from apertus_hf.pretraining import PretrainConfig, pretrain
from tests.hub.conftest import BASE_MODEL_ID, TINY_SHARD
from tests.hub_server import start_fake_hub
from tests.pretraining.conftest import REPO_ROOT, tiny_run


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    hub, server = start_fake_hub(tmp_path_factory.mktemp("hub"))
    yield hub
    server.shutdown()


@pytest.fixture
def online(fake_hub, monkeypatch):
    """The Hub client online, pointed at the fake Hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # tests run with HF_HUB_OFFLINE=1
    # huggingface_hub sends a few requests (agent detection) to the default endpoint whatever HfApi's is.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.url)
    return {"endpoint": fake_hub.url, "token": "test-token"}


@pytest.fixture(scope="module")
def published(pretrained, fake_hub, tmp_path_factory):
    """`pretrained` published as org/tiny (one weights file) and as org/tiny-sharded (first unsharded, then
    again in shards), each from its own copy of the folder, then downloaded by stock transformers in a fresh
    interpreter that never imports apertus_hf. Returns {repo_id: (folder, PublishResult)} and the load report."""
    folders = {
        repo_id: Path(shutil.copytree(pretrained, tmp_path_factory.mktemp("publish") / "model"))
        for repo_id in ("org/tiny", "org/tiny-sharded")
    }
    (folders["org/tiny"] / ".notes").write_text("hidden files stay local")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "ENDPOINT", fake_hub.url)
        options = {"endpoint": fake_hub.url, "token": "test-token"}
        results = {"org/tiny": publish(folders["org/tiny"], "org/tiny", private=True, **options)}
        publish(folders["org/tiny-sharded"], "org/tiny-sharded", **options)
        results["org/tiny-sharded"] = publish(
            folders["org/tiny-sharded"], "org/tiny-sharded", max_shard_size=TINY_SHARD, **options
        )
    loaded = _load_in_stock_transformers(fake_hub.url, list(results), pretrained, tmp_path_factory.mktemp("home"))
    return {repo_id: (folders[repo_id], results[repo_id]) for repo_id in results}, loaded


_LOAD_SCRIPT = """
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

local = transformers.ApertusForCausalLM.from_pretrained(sys.argv[1]).state_dict()
report = {}
for repo_id in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(repo_id).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    inputs = tokenizer("Las Alps èn muntognas che", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    state_dict = model.state_dict()
    report[repo_id] = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "same_weights": set(local) == set(state_dict) and all(torch.equal(local[k], state_dict[k]) for k in local),
        "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1],
        "bos_first": generated[0, 0].item() == tokenizer.bos_token_id,
    }
report["apertus_hf_imported"] = "apertus_hf" in sys.modules
print(json.dumps(report))
"""


def _load_in_stock_transformers(endpoint: str, repo_ids: list[str], local: Path, hf_home: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)}
    env.pop("PYTHONPATH", None)
    process = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(local), *repo_ids],
        env=env,
        capture_output=True,
        text=True,
        cwd=hf_home,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_published_model_loads_in_stock_transformers_without_apertus_hf(published, fake_hub):
    repos, loaded = published
    assert loaded["apertus_hf_imported"] is False
    report = loaded["org/tiny"]
    assert report["class"] == "transformers.models.apertus.modeling_apertus.ApertusForCausalLM"
    assert report["same_weights"] and report["bos_first"] and report["new_tokens"] == 6
    assert repos["org/tiny"][1].commit_url.startswith(f"{fake_hub.url}/org/tiny/commit/")
    assert fake_hub.repos["org/tiny"].private


def test_published_repo_holds_the_folder_and_the_card(published, fake_hub):
    repos, _ = published
    folder, result = repos["org/tiny"]
    uploaded = fake_hub.repo_files("org/tiny")
    local = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert ".notes" not in uploaded and local.pop(".notes")
    assert uploaded == local  # config, weights, tokenizer, recipe, facts, eval results and README.md, byte for byte
    assert {"eval_results/perplexity.json", "pretrain_config.yaml", "training_facts.json"} <= set(uploaded)
    assert uploaded["README.md"].decode() == str(result.card)
    assert ("POST", "/api/validate-yaml") in fake_hub.requests  # upload_folder had the card's metadata checked
    assert CARD_MARKER in (folder / "README.md").read_text()  # the folder matches the repo


def test_sharded_upload_replaces_the_single_file_and_loads(published, fake_hub):
    repos, loaded = published
    uploaded = fake_hub.repo_files("org/tiny-sharded")
    shards = sorted(name for name in uploaded if name.endswith(".safetensors"))
    assert repos["org/tiny-sharded"][1].resharded
    shard_bytes = [sum(tensor.nbytes for tensor in safetensors.torch.load(uploaded[name]).values()) for name in shards]
    assert len(shards) > 1 and max(shard_bytes) <= 1_200_000
    assert "model.safetensors" not in uploaded  # the first upload's single file was deleted
    index = json.loads(uploaded["model.safetensors.index.json"])
    assert sorted(set(index["weight_map"].values())) == shards
    report = loaded["org/tiny-sharded"]
    assert report["same_weights"] and report["new_tokens"] == 6


def test_private_none_leaves_visibility_to_the_hub(pretrained, fake_hub, online, tmp_path):
    publish(shutil.copytree(pretrained, tmp_path / "model"), "org/tiny-default", **online)
    request = fake_hub.repos["org/tiny-default"].create_request
    assert "private" not in request and "visibility" not in request  # the namespace's default applies


def test_publish_replaces_trls_readme_with_our_card(post_trained, fake_hub, online):
    folder = post_trained("sft")
    result = publish(folder, "org/tiny-sft", **online)
    uploaded = fake_hub.repo_files("org/tiny-sft")["README.md"].decode()
    assert result.card_generated and CARD_MARKER in uploaded and "[TRL](https://github.com" not in uploaded
    assert "post-trained by supervised fine-tuning (SFT)" in uploaded and f"base_model: {BASE_MODEL_ID}" in uploaded
    assert (folder / "README.md").read_text() == uploaded


def test_a_run_folders_training_state_stays_local(post_trained, fake_hub, online):
    folder = post_trained("sft")
    # What a full fine-tune's output_dir also holds: Trainer checkpoints (with pickled optimizer state), TensorBoard
    # logs, and a merged model that is published on its own.
    for relative in ("checkpoint-5/optimizer.pt", "checkpoint-5/model.safetensors", "runs/events.out", "merged/x.json"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"state")
    result = publish(folder, "org/tiny-sft-run", **online)
    uploaded = set(fake_hub.repo_files("org/tiny-sft-run"))
    assert "model.safetensors" in uploaded and "training_facts.json" in uploaded
    assert not [name for name in uploaded if name.startswith(("checkpoint-", "runs/", "merged/"))]
    assert set(result.files) == uploaded


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dry_run_makes_no_request_and_leaves_the_folder_unchanged(model_copy):
    before = sorted(path.relative_to(model_copy).as_posix() for path in model_copy.rglob("*") if path.is_file())
    result = publish(model_copy, "org/tiny", dry_run=True, endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert result.commit is None and result.card_generated
    assert list(result.files) == sorted([*before, "README.md"])
    assert sorted(path.relative_to(model_copy).as_posix() for path in model_copy.rglob("*") if path.is_file()) == before


def test_dry_run_of_an_adapter_publishes_a_peft_card(adapter):
    result = publish(adapter, "org/tiny-lora", dry_run=True, license="mit")
    assert result.card.data.library_name == "peft" and result.card.data.license == "mit"  # the argument wins
    assert "adapter_model.safetensors" in result.files and not result.resharded


def _run_publish_cli(monkeypatch, arguments: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["publish.py", *arguments])
    runpy.run_path(str(REPO_ROOT / "recipes" / "publish.py"), run_name="__main__")


def test_publish_cli_dry_run_prints_files_and_card(model_copy, monkeypatch, capsys):
    arguments = ["--model", str(model_copy), "--repo-id", "org/tiny", "--dry-run", "--max-shard-size", TINY_SHARD]
    _run_publish_cli(monkeypatch, [*arguments, "--endpoint", f"http://127.0.0.1:{_closed_port()}"])
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and f"would be re-saved in shards of at most {TINY_SHARD}" in printed
    assert "model-index:" in printed and "| Evaluation | Task |" in printed
    assert "Dry run: nothing was uploaded." in printed


class _Published(Exception):
    """Raised by a stand-in for `publish` with the options it was called with."""


@pytest.mark.parametrize(("flag", "private"), [([], None), (["--private"], True)])
def test_publish_cli_private_is_true_or_the_hubs_default(model_copy, monkeypatch, flag, private):
    def record(model_dir, repo_id, **options):
        raise _Published(options)

    monkeypatch.setattr("apertus_hf.hub.publish", record)
    with pytest.raises(_Published) as called:
        _run_publish_cli(monkeypatch, ["--model", str(model_copy), "--repo-id", "org/tiny", *flag])
    options = called.value.args[0]
    assert options["private"] is private and options["license"] is None  # None: the run's license


def test_hand_written_readme_is_published_unchanged(model_copy):
    own_card = "---\nlicense: mit\nlanguage: [rm]\n---\n\n# My own card\n"
    (model_copy / "README.md").write_text(own_card)
    result = publish(model_copy, "org/tiny", dry_run=True)
    assert not result.card_generated
    assert result.card.data.license == "mit" and result.card.text == "\n# My own card\n"
    assert result.files["README.md"] == len(own_card.encode())
    assert (model_copy / "README.md").read_text() == own_card


def test_publish_refuses_repo_ids_without_namespace(model_copy):
    with pytest.raises(ValueError, match="use ORG/NAME"):
        publish(model_copy, "tiny", dry_run=True)


def test_publish_offline_fails_before_touching_the_folder(model_copy):
    assert huggingface_hub.constants.is_offline_mode()  # tests run with HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1 is set"):
        publish(model_copy, "org/tiny", endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert not (model_copy / "README.md").exists()


def test_a_pretraining_export_publishes_as_it_is(tmp_path, fake_hub, online):
    """What pretrain() exports carries its facts and no absolute path of this machine (the probe found the run's
    output_dir in pretrain_config.yaml), so it publishes without edits, recipe and card included."""
    options = tiny_run(tmp_path / "run", REPO_ROOT / "data" / "corpus", max_steps=5, warmup_steps=1, eval_steps=0)
    options.update(eval_documents=0, checkpoint_steps=0)
    AcceleratorState._reset_state(True)
    model_dir = pretrain(PretrainConfig(**options)).model_dir
    AcceleratorState._reset_state(True)
    result = publish(model_dir, "org/exported", **online)
    uploaded = fake_hub.repo_files("org/exported")
    expected = {"config.json", "model.safetensors", "tokenizer.json", "README.md", "pretrain_config.yaml"}
    assert expected | {"training_facts.json"} <= set(uploaded)
    assert (
        "| Optimizer steps | 5 |" in result.card.text and "| Context length (trained) | 64 tokens |" in result.card.text
    )
    assert (model_dir / "README.md").read_text().startswith("---\n")
