"""runtime: the one rule for "local path or Hub id", and the CPU threads a run takes."""

from pathlib import Path

import pytest
import torch

from apertus_hf.runtime import SourceNotFoundError, cpu_thread_count, resolve_source


def test_existing_paths_are_local_and_repo_ids_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "model").mkdir(parents=True)
    assert resolve_source("outputs/model", "init_from").resolve() == tmp_path / "outputs" / "model"
    assert resolve_source(str(tmp_path / "outputs"), "init_from") == tmp_path / "outputs"
    assert resolve_source("swiss-ai/Apertus-8B-2509", "init_from") == "swiss-ai/Apertus-8B-2509"


@pytest.mark.parametrize(
    "value",
    [
        "outputs/my_model",  # one "/" like a repo id, but outputs/ is a folder here
        "./model",
        "/no/such/dir",
        "~/no-such-model",
        "model",  # a Hub id has a namespace
        "corpus/part.jsonl",  # ends like a data file
    ],
)
def test_a_missing_local_path_is_named_with_the_option_and_the_hint(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(
        SourceNotFoundError, match=rf"^init_from='{value.replace('*', '[*]')}': no such file or folder .*Run make"
    ):
        resolve_source(value, "init_from", "Run make pretrain first.")


def test_a_glob_is_local_and_must_match_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(
        SourceNotFoundError, match=r"^data\[0\]\.path='data/\*\.jsonl': the glob matches no file .*Run make"
    ):
        resolve_source("data/*.jsonl", "data[0].path", "Run make pretrain first.")
    (tmp_path / "data" / "en.jsonl").write_text('{"text": "x"}\n')
    assert resolve_source("data/*.jsonl", "data[0].path") == Path("data/*.jsonl")


def test_a_name_that_is_neither_path_nor_repo_id_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFoundError, match=r"neither a file or folder here nor a Hub repo id"):
        resolve_source("org/na me", "tokenizer")


def test_cpu_threads_replace_the_launchers_single_thread_default_only(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what `accelerate launch` exports to its processes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads, reason = cpu_thread_count(None, cpu, num_processes=1)
    assert threads >= 1 and "accelerate launch defaulted OMP_NUM_THREADS to 1" in reason
    assert cpu_thread_count(3, cpu, num_processes=1) == (3, "set by cpu_threads")
    # Several processes share the cores; a GPU run needs no CPU threads; a user's own OMP_NUM_THREADS stands.
    assert cpu_thread_count(None, cpu, num_processes=2)[0] == torch.get_num_threads()
    assert cpu_thread_count(None, torch.device("cuda"), num_processes=1)[0] == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_thread_count(None, cpu, num_processes=1)[0] == torch.get_num_threads()
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_thread_count(None, cpu, num_processes=1)[0] == torch.get_num_threads()
