import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from tokenizers import pre_tokenizers

from apertus_hf.tokenization import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    NAMED_SPECIAL_TOKENS,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    UNK_TOKEN_ID,
    corpus_token_statistics,
    iter_corpus_texts,
    special_token_layout,
    train_bpe_tokenizer,
)

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.\n",
    "Der schnelle braune Fuchs springt über den faulen Hund, und der Hund schläft weiter.\n",
    "Le renard brun et rapide saute par-dessus le chien paresseux, qui ne se réveille pas.\n",
    "La volpe marrone e veloce salta sopra il cane pigro, che continua a dormire.\n",
    "El rápido zorro marrón salta sobre el perro perezoso, que sigue durmiendo.\n",
    "La vulp brina e svelta siglia sur il chaun pigher, che dorma vinavant.\n",
] * 4
VOCAB_SIZE = 1000 + 256 + 120

ROUND_TRIP_STRINGS = [
    "Grüezi mitenand! Wie geht's?",
    "L'été à Zürich: 23,5 °C — «très agréable».",
    "Emoji: 🇨🇭🏔️👩‍👩‍👧 and CJK: 你好，世界。日本語のテキスト。한국어",
    "Arabic مرحبا and Hindi नमस्ते",
    "  leading spaces, tabs\tand\r\nWindows newlines\n\n\nand trailing  ",
    "numbers 1234567890 and symbols <>&%$#@!~`^*()[]{}|\\",
    "\x00\x07 control bytes and a lone combining mark \u0301",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TRAINING_TEXTS, VOCAB_SIZE)


def test_special_tokens_sit_at_their_apertus_ids(tokenizer):
    assert len(SPECIAL_TOKENS) == 1000
    for token_id, token in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        UNK_TOKEN_ID,
        BOS_TOKEN_ID,
        EOS_TOKEN_ID,
        PAD_TOKEN_ID,
    )
    assert tokenizer.convert_ids_to_tokens([61, 68, 72, 32, 58, 100]) == [
        "<|system_start|>",
        "<|assistant_end|>",
        "<|tools_suffix|>",
        "<think>",
        "<fim_prefix>",
        "<SPECIAL_100>",
    ]
    assert tokenizer("<|user_start|>hi<|user_end|>")["input_ids"][:2] == [BOS_TOKEN_ID, 65]


def test_learned_vocabulary_fills_exactly_the_ids_after_the_special_slots(tokenizer):
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    byte_tokens = {token for token, token_id in vocab.items() if 1000 <= token_id < 1256}
    assert byte_tokens == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_byte_level_round_trip_is_exact_and_never_unknown(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert UNK_TOKEN_ID not in ids
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_encoding_prepends_bos_and_appends_no_eos(tokenizer):
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == BOS_TOKEN_ID
    assert ids.count(BOS_TOKEN_ID) == 1
    assert EOS_TOKEN_ID not in ids
    assert tokenizer("")["input_ids"] == [BOS_TOKEN_ID]


def test_saved_folder_loads_with_stock_autotokenizer_in_a_fresh_interpreter(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
        assert "apertus_hf" not in sys.modules
        texts = json.loads(sys.stdin.read())
        ids = [tokenizer(text)["input_ids"] for text in texts]
        print(json.dumps({"ids": ids, "decoded": [tokenizer.decode(i[1:]) for i in ids], "size": len(tokenizer)}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        input=json.dumps(ROUND_TRIP_STRINGS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=tmp_path,
    )
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["ids"] == [tokenizer(text)["input_ids"] for text in ROUND_TRIP_STRINGS]
    assert reloaded["decoded"] == ROUND_TRIP_STRINGS
    assert reloaded["size"] == VOCAB_SIZE


def test_training_is_deterministic(tokenizer):
    again = train_bpe_tokenizer(TRAINING_TEXTS, VOCAB_SIZE)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_smaller_special_layout_keeps_the_named_slots():
    layout = special_token_layout(80)
    assert len(layout) == 80
    assert all(layout[token_id] == token for token_id, token in NAMED_SPECIAL_TOKENS.items())
    small = train_bpe_tokenizer(TRAINING_TEXTS, 80 + 256 + 50, num_special_tokens=80)
    assert small.convert_ids_to_tokens([1, 68, 79]) == ["<s>", "<|assistant_end|>", "<SPECIAL_79>"]
    assert len(small) == 80 + 256 + 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 1200}, "vocab_size=1200 is too small"),
        ({"vocab_size": 2000, "num_special_tokens": 50}, "num_special_tokens=50 cannot hold"),
        ({"vocab_size": 1400, "min_frequency": 0}, "min_frequency=0"),
        ({"vocab_size": 1400, "model_max_length": 0}, "model_max_length=0"),
        ({"vocab_size": 100_000}, "use vocab_size <="),
    ],
)
def test_bad_arguments_raise_with_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_bpe_tokenizer(TRAINING_TEXTS, **kwargs)


def test_corpus_texts_stream_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first", "language": "en"}\n\n{"text": "second"}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("para one\nstill one\n\npara two\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a corpus file", encoding="utf-8")
    assert list(iter_corpus_texts(tmp_path)) == ["first", "second", "para one\nstill one\n\n", "para two\n"]
    (tmp_path / "c.jsonl").write_text('{"content": "third"}\n', encoding="utf-8")
    assert list(iter_corpus_texts(tmp_path / "c.jsonl", text_field="content")) == ["third"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: expected an object with a string 'text' field"),
    ],
)
def test_bad_jsonl_lines_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        list(iter_corpus_texts(path))


def test_missing_or_unsupported_corpus_paths_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_corpus_texts(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"holds no \.jsonl or \.txt files"):
        list(iter_corpus_texts(tmp_path))
    (tmp_path / "data.csv").write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported corpus file type"):
        list(iter_corpus_texts(tmp_path / "data.csv"))


def test_corpus_statistics_count_bos_and_eos_per_document(tokenizer):
    texts = ["the dog", "der Hund schläft", "il cane"]
    stats = corpus_token_statistics(tokenizer, texts, batch_size=2)
    encodings = [tokenizer(text)["input_ids"] + [EOS_TOKEN_ID] for text in texts]
    tokens = [token for ids in encodings for token in ids]
    counts = {token: tokens.count(token) for token in set(tokens)}
    expected_entropy = -sum(n / len(tokens) * math.log(n / len(tokens)) for n in counts.values())
    assert stats.num_documents == 3
    assert stats.num_tokens == len(tokens)
    assert stats.num_bytes == sum(len(text.encode()) for text in texts)
    assert stats.bytes_per_token == pytest.approx(stats.num_bytes / (len(tokens) - 6))
    assert stats.unigram_entropy == pytest.approx(expected_entropy)
    with pytest.raises(ValueError, match="No documents"):
        corpus_token_statistics(tokenizer, [])
