"""Pre-tokenized data: shards written once, read as packed rows equal to tokenize_and_pack's, blended by weight."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from apertus_hf.data import IGNORE_INDEX, DataSource, PackedBatchCollator, load_documents, tokenize_and_pack
from apertus_hf.data.pretokenized import (
    MANIFEST_NAME,
    BlendedRows,
    PretokenizedFolder,
    PretokenizedRows,
    all_pretokenized,
    blend_pretokenized,
    last_documents_rows,
    write_pretokenized,
)
from apertus_hf.pretraining import PretrainConfig, pretrain, read_metrics
from apertus_hf.pretraining.build import build_run
from tests.helpers import TINY_TOKENIZER_TEXTS, tiny_bpe_tokenizer
from tests.pretraining.conftest import REPO_ROOT, SHIPPED_TOKENIZER, tiny_run

SEQ_LEN = 16


def write_documents(path: Path, count: int, seed: int = 0) -> Path:
    """A jsonl file of `count` documents of 1 to ~40 words of the tiny tokenizer's sentences, one ~6 rows long."""
    rng = random.Random(seed)
    words = " ".join(TINY_TOKENIZER_TEXTS).split()
    documents = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(count)]
    documents[count // 2] = " ".join(words[:20] * 2)
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    return path


def rows_of(dataset) -> list[dict[str, np.ndarray]]:
    return [{key: np.asarray(value) for key, value in dataset[index].items()} for index in range(len(dataset))]


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_documents(tmp_path / "corpus.jsonl", 50)


@pytest.fixture
def folder(tmp_path, corpus, tokenizer) -> PretokenizedFolder:
    # Shards of 37 tokens: most rows of 16 tokens lie in one shard, some span two.
    return write_pretokenized(DataSource(str(corpus)), tokenizer, tmp_path / "tokenized", shard_tokens=37)


def test_rows_equal_those_of_tokenize_and_pack_when_it_packs_in_one_batch(folder, corpus, tokenizer):
    """tokenize_and_pack pads the end of each map batch; with every document in one batch its rows are exactly the
    stream cut every seq_len tokens, as PretokenizedRows cuts it, for any seq_len."""
    documents = load_documents([DataSource(str(corpus))])
    assert len(folder.manifest["shards"]) > 1
    for seq_len in (SEQ_LEN, 7, 100):
        expected = rows_of(tokenize_and_pack(documents, tokenizer, seq_len, batch_size=len(documents)))
        rows = rows_of(PretokenizedRows(folder, seq_len))
        assert len(rows) == len(expected)
        for row, reference in zip(rows, expected, strict=True):
            assert row.keys() == reference.keys()
            for column, values in row.items():
                assert values.dtype == np.int32 and values.shape == (seq_len,)
                np.testing.assert_array_equal(values, reference[column], err_msg=column)


def test_with_several_map_batches_the_token_stream_and_documents_agree(folder, corpus, tokenizer):
    """With batches of 8 documents tokenize_and_pack pads each batch's last row, so rows differ from there on; the
    tokens without padding and the document starts (labels -100 outside padding) are the same."""
    packed = rows_of(tokenize_and_pack(load_documents([DataSource(str(corpus))]), tokenizer, SEQ_LEN, batch_size=8))
    input_ids = np.concatenate([row["input_ids"] for row in packed])
    labels = np.concatenate([row["labels"] for row in packed])
    # Padding is the pad id with label -100; a real token never has both (only a document's <s> has label -100).
    real = ~((input_ids == tokenizer.pad_token_id) & (labels == IGNORE_INDEX))
    stream = folder.tokens(0, folder.num_tokens)
    np.testing.assert_array_equal(input_ids[real], stream)
    np.testing.assert_array_equal(np.flatnonzero(labels[real] == IGNORE_INDEX), folder.document_starts)
    assert folder.num_documents == 50


def test_held_out_documents_are_the_last_ones_and_left_out_of_training(folder, tokenizer):
    evaluation = last_documents_rows(str(folder.path), tokenizer, SEQ_LEN, 3)
    training = blend_pretokenized([DataSource(str(folder.path))], tokenizer, SEQ_LEN, held_out=evaluation)
    boundary = int(folder.document_starts[47])

    def tokens(rows) -> np.ndarray:
        return np.concatenate([row["input_ids"][row["labels"] != IGNORE_INDEX] for row in rows_of(rows)])

    assert evaluation.documents == range(47, 50)
    stream = folder.tokens(0, folder.num_tokens)
    keep = ~np.isin(np.arange(folder.num_tokens), folder.document_starts)
    np.testing.assert_array_equal(tokens(training), stream[:boundary][keep[:boundary]])
    np.testing.assert_array_equal(tokens(evaluation), stream[boundary:][keep[boundary:]])
    with pytest.raises(ValueError, match=r"eval_documents=50 holds out the whole of .* \(50 documents\)"):
        last_documents_rows(str(folder.path), tokenizer, SEQ_LEN, 50)


def megatron_blend(weights: list[float], size: int) -> list[int]:
    """The dataset of each sample of Megatron's BlendedDataset (`build_blending_indices` in
    megatron/core/datasets/helpers.cpp): the one with the largest weight * max(sample, 1) - samples so far."""
    normalized = np.asarray(weights) / sum(weights)
    counts = np.zeros(len(weights))
    order = []
    for sample in range(size):
        chosen = int(np.argmax(normalized * max(sample, 1) - counts))
        order.append(chosen)
        counts[chosen] += 1
    return order


@pytest.mark.parametrize("weights", [[2, 1, 0.5], [0.35, 0.25, 0.4], [5, 1, 1, 1, 1], [1 / 3, 2 / 3]])
def test_a_blend_gives_every_source_its_weight_at_every_prefix(weights):
    sizes = [3000, 10, 2000, 5, 5][: len(weights)]
    blend = BlendedRows([list(range(size)) for size in sizes], weights)
    shares = np.asarray(weights) / sum(weights)
    sources = [blend.locate(index)[0] for index in range(len(blend))]
    ours = np.cumsum(np.eye(len(weights))[sources], axis=0)
    reference = np.cumsum(np.eye(len(weights))[megatron_blend(weights, len(blend))], axis=0)
    expected = shares * np.arange(1, len(blend) + 1)[:, None]
    assert np.abs(ours - expected).max() <= (1 + len(weights)) / 2
    assert np.abs(ours - reference).max() <= 2
    # The blend ends when the source that needs the most rows has given each of its rows once.
    limiting = int(np.argmax(np.asarray(sizes) / shares))
    assert ours[-1, limiting] == sizes[limiting]
    assert all(ours[-1] >= sizes)


def test_blended_rows_come_from_their_source_and_smaller_sources_repeat(tmp_path, tokenizer):
    folders = []
    for name, count in (("large", 40), ("small", 4)):
        corpus = write_documents(tmp_path / f"{name}.jsonl", count, seed=len(name))
        folders.append(write_pretokenized(DataSource(str(corpus)), tokenizer, tmp_path / name))
    sources = [DataSource(str(folders[0].path), weight=3), DataSource(str(folders[1].path), weight=1)]
    blend = blend_pretokenized(sources, tokenizer, SEQ_LEN)
    per_source = [rows_of(PretokenizedRows(folder, SEQ_LEN)) for folder in folders]
    seen = [set(), set()]
    for index in range(len(blend)):
        source, row = blend.locate(index)
        seen[source].add(row)
        for column, values in blend[index].items():
            np.testing.assert_array_equal(values, per_source[source][row][column])
    assert seen == [set(range(len(per_source[0]))), set(range(len(per_source[1])))]
    counts = np.bincount([blend.locate(index)[0] for index in range(len(blend))])
    assert counts[0] == len(per_source[0]) and abs(counts[0] / counts[1] - 3) < 0.1
    # The collator takes the rows as they are: documents from the position restarts, Goldfish drops on the labels.
    rows = [blend[index] for index in range(len(blend))]
    batch = PackedBatchCollator(goldfish_k=4, goldfish_h=4)(rows)
    labels = np.stack([row["labels"] for row in rows])
    assert batch["seq_idx"].max() > 0
    assert ((batch["labels"].numpy() == IGNORE_INDEX) & (labels != IGNORE_INDEX)).any()


def test_a_folder_written_with_another_tokenizer_is_refused(folder):
    other = tiny_bpe_tokenizer(vocab_size=300)
    with pytest.raises(ValueError) as error:
        blend_pretokenized([DataSource(str(folder.path))], other, SEQ_LEN)
    message = str(error.value)
    assert f"{folder.path} was tokenized with the tokenizer" in message
    assert "vocabulary 320" in message and "vocabulary 300" in message
    assert "they differ in vocab_size, vocab_sha256" in message
    assert "tokenize_data.py --tokenizer" in message


def test_a_missing_truncated_or_corrupt_shard_is_refused(folder, tokenizer):
    shard = folder.path / folder.manifest["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"tokens-00001.bin has 144 bytes, .*pretokenized.json says 148: the file is"):
        PretokenizedFolder(folder.path, tokenizer)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"tokens-00001.bin is missing: .* lists it. The folder is incomplete"):
        PretokenizedFolder(folder.path, tokenizer)
    shard.write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])
    opened = PretokenizedFolder(folder.path, tokenizer)  # same size: only the checksums tell
    with pytest.raises(ValueError, match=r"tokens-00001.bin does not hold what was written .* corrupt"):
        opened.verify()
    (folder.path / MANIFEST_NAME).write_text("{")
    with pytest.raises(ValueError, match=r"pretokenized.json is no valid JSON"):
        PretokenizedFolder(folder.path, tokenizer)


def test_writing_never_replaces_data_unless_asked(tmp_path, corpus, folder, tokenizer):
    source = DataSource(str(corpus))
    with pytest.raises(FileExistsError, match=r"tokenized exists already. Pass overwrite=True"):
        write_pretokenized(source, tokenizer, folder.path)
    rewritten = write_pretokenized(source, tokenizer, folder.path, overwrite=True)
    assert rewritten.num_tokens == folder.num_tokens
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"is no pre-tokenized folder .* not replaced even with overwrite"):
        write_pretokenized(source, tokenizer, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(Exception, match="invalid JSON"):
        write_pretokenized(DataSource(str(broken)), tokenizer, tmp_path / "never")
    # A failed write leaves nothing behind: no folder, no half-written one under a temporary name.
    assert sorted(path.name for path in tmp_path.iterdir() if "never" in path.name) == []


def test_a_stage_of_pre_tokenized_and_raw_sources_is_refused(folder, corpus):
    sources = [DataSource(str(folder.path)), DataSource(str(corpus))]
    with pytest.raises(ValueError) as error:
        all_pretokenized(sources, "stages[1].data")
    assert str(error.value).startswith(
        f"stages[1].data mixes pre-tokenized folders ({folder.path}) with raw sources ({corpus}); a stage reads one "
        f"kind. Tokenize the raw ones too (python recipes/tokenize_data.py --source {corpus} --output_dir"
    )
    assert all_pretokenized(sources[:1], "data") and not all_pretokenized(sources[1:], "data")


def test_two_processes_write_the_same_folder_as_one(tmp_path, tokenizer):
    corpus = write_documents(tmp_path / "corpus.jsonl", 400)
    written = {
        num_proc: write_pretokenized(
            DataSource(str(corpus)), tokenizer, tmp_path / f"proc{num_proc}", num_proc=num_proc, batch_size=50
        ).path
        for num_proc in (1, 2)
    }
    files = sorted(path.name for path in written[1].iterdir())
    assert files == ["document_starts.bin", "pretokenized.json", "tokens-00000.bin"]
    assert sorted(path.name for path in written[2].iterdir()) == files
    for name in files:
        assert (written[1] / name).read_bytes() == (written[2] / name).read_bytes(), name


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _losses(output_dir: Path) -> list[tuple]:
    return [
        (record["step"], record.get("train/loss"), record.get("eval/loss"))
        for record in read_metrics(output_dir / "metrics.jsonl")
    ]


@pytest.mark.slow
def test_training_on_pre_tokenized_data_equals_training_on_the_raw_documents(tmp_path, fresh_accelerator_state):
    """Fewer documents than a map batch: tokenize_and_pack's rows are then exactly the pre-tokenized ones, so the two
    runs (document masking and Goldfish on) see the same batches and their losses are equal to the last bit."""
    lines = []
    for language in ("en", "de", "fr", "it"):
        with (REPO_ROOT / "data" / "corpus" / f"{language}.jsonl").open() as handle:
            lines += [json.loads(line)["text"][:700] for _, line in zip(range(8), handle, strict=False)]
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": text}) + "\n" for text in lines[:28]))
    held_out.write_text("".join(json.dumps({"text": text}) + "\n" for text in lines[28:]))
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    folders = [
        write_pretokenized(DataSource(str(path)), tokenizer, path.with_suffix("")).path for path in (train, held_out)
    ]
    options = {"max_steps": 4, "eval_steps": 2, "checkpoint_steps": 0}
    options |= {"document_masking": True, "goldfish": True, "goldfish_k": 4, "goldfish_h": 4}
    losses = {}
    for name, (data, evaluation) in {"raw": (train, held_out), "pretokenized": folders}.items():
        AcceleratorState._reset_state(True)
        pretrain(PretrainConfig(**tiny_run(tmp_path / name, data, eval_data=[{"path": str(evaluation)}], **options)))
        losses[name] = _losses(tmp_path / name)
    assert len(losses["raw"]) == 4 and sum(loss is not None for _, _, loss in losses["raw"]) == 2
    assert losses["pretokenized"] == losses["raw"]


def test_a_run_holds_out_the_last_documents_of_its_first_pre_tokenized_source(tmp_path, fresh_accelerator_state):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    folders = [
        write_pretokenized(DataSource(str(REPO_ROOT / "data" / "corpus" / f"{name}.jsonl")), tokenizer, tmp_path / name)
        for name in ("de", "rm")
    ]
    options = tiny_run(tmp_path / "run", folders[0].path, eval_documents=5, checkpoint_steps=0)
    del options["data"]
    options["stages"] = [
        {"data": [{"path": str(folders[0].path)}]},
        {"start_step": 6, "data": [{"path": str(folders[1].path)}, {"path": str(folders[0].path), "weight": 2}]},
    ]
    run = build_run(PretrainConfig(**options))
    try:
        first, second = run.train_rows
        assert run.eval_loader.dataset.documents == range(18, 23)
        assert first.parts[0].documents == second.parts[1].documents == range(18)
        assert second.parts[0].documents == range(7)
        assert second.units == [1, 2]
    finally:
        run.close()
    AcceleratorState._reset_state(True)
    with pytest.raises(
        ValueError, match=r"names pre-tokenized folders, which are read by memory map .* streaming: false"
    ):
        build_run(PretrainConfig(**{**options, "streaming": True, "output_dir": str(tmp_path / "streamed")}))


@pytest.mark.slow
def test_the_tokenize_data_recipe_writes_every_source_of_a_pretraining_recipe(tmp_path):
    for name, count in (("web", 30), ("books", 12), ("held", 6)):
        write_documents(tmp_path / f"{name}.jsonl", count, seed=count)
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "tokenizer": str(REPO_ROOT / "data" / "tokenizer"),
                "data": [{"path": str(tmp_path / "web.jsonl"), "weight": 3}, {"path": str(tmp_path / "books.jsonl")}],
                "eval_data": [{"path": str(tmp_path / "held.jsonl")}],
                "streaming": True,
            }
        )
    )
    output = tmp_path / "tokenized"
    command = [sys.executable, str(REPO_ROOT / "recipes" / "tokenize_data.py"), "--config", str(recipe)]
    command += ["--output_dir", str(output)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'web.jsonl'} -> {output / 'web'}: 30 documents, ")
    summary = next(line for line in lines if line.startswith("Done: "))
    assert summary.startswith("Done: 3 source(s), 48 documents, ") and "tokens/s with 1 process(es)" in summary
    block = yaml.safe_load(completed.stdout.split("in place of its data options):\n")[1])
    assert block == {
        "data": [{"path": str(output / "web"), "weight": 3}, {"path": str(output / "books")}],
        "eval_data": [{"path": str(output / "held")}],
        "streaming": False,
    }
    for name in ("web", "books", "held"):
        manifest = json.loads((output / name / MANIFEST_NAME).read_text())
        assert manifest["source"]["path"] == str(tmp_path / f"{name}.jsonl")
        assert manifest["tokenizer"]["name"] == str(REPO_ROOT / "data" / "tokenizer")
    assert sorted(path.name for path in output.iterdir()) == ["books", "held", "web"]
    assert PretrainConfig(**block).data == block["data"]
