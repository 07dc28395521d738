import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mistral_common")

from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from apertus_hf.tokenization import (
    APERTUS_CHAT_TEMPLATE,
    NAMED_SPECIAL_TOKENS,
    apertus_generation_config,
    load_apertus_tokenizer,
)
from apertus_hf.tokenization.apertus import default_tekken_path

MULTILINGUAL_TEXTS = [
    "Die Schweizer Alpen sind im Winter wunderschön, nicht wahr?",
    "L'été dernier, nous sommes allés à Genève pour la fête nationale.",
    "Buongiorno! Quanto costa un caffè a Lugano?",
    "Bun di! Co vai? Jau discur rumantsch grischun.",
    "¿Dónde está la estación de tren más cercana?",
    "The quick brown fox jumps over the lazy dog.\n\n  def f(x):\n\treturn x ** 2  # 42",
    "瑞士有四种官方语言。スイスの山はとても美しいです。스위스 초콜릿",
    "Emoji: 🇨🇭🏔️👩‍💻🧀 and ünïcödé ẞ, plus   trailing spaces  ",
]
SYSTEM, USER, ANSWER = "Be brief.", "Wie heisst die Hauptstadt der Schweiz?", "Bern ist die Bundesstadt."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ANSWER},
]
# swiss-ai/posttraining `src/post_training/data_sft/tokenization.py` (template `apertus`), verbatim.
EXPECTED_RENDERING = (
    f"<s><|system_start|>{SYSTEM}<|system_end|><|developer_start|>Deliberation: disabled\n"
    f"Tool Capabilities: disabled<|developer_end|><|user_start|>{USER}<|user_end|><|assistant_start|>"
    f"{ANSWER}<|assistant_end|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_apertus_tokenizer()


@pytest.fixture(scope="module")
def tekkenizer():
    return Tekkenizer.from_file(str(default_tekken_path()))


def test_vocabulary_size_and_special_ids(tokenizer):
    assert len(tokenizer) == 131072
    assert tokenizer.vocab_size == 131072
    expected = {
        0: "<unk>",
        1: "<s>",
        2: "</s>",
        3: "<pad>",
        32: "<think>",
        33: "</think>",
        34: "<answer>",
        35: "</answer>",
        61: "<|system_start|>",
        62: "<|system_end|>",
        63: "<|developer_start|>",
        64: "<|developer_end|>",
        65: "<|user_start|>",
        66: "<|user_end|>",
        67: "<|assistant_start|>",
        68: "<|assistant_end|>",
        69: "<|inner_prefix|>",
        70: "<|inner_suffix|>",
        71: "<|tools_prefix|>",
        72: "<|tools_suffix|>",
    }
    for token_id, name in expected.items():
        assert tokenizer.convert_ids_to_tokens(token_id) == name
        assert tokenizer.convert_tokens_to_ids(name) == token_id
    assert tokenizer.convert_ids_to_tokens(999) == "<SPECIAL_999>"
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.model_max_length == 65536
    # A special token in text is one id, never split into bytes.
    for token_id, name in NAMED_SPECIAL_TOKENS.items():
        assert tokenizer(f"a{name}b", add_special_tokens=False).input_ids[1] == token_id


def test_ordinary_ids_equal_mistral_common_ids(tokenizer, tekkenizer):
    # mistral-common's Tekkenizer already offsets tekken ranks by its 1000 special slots, so its ids are exactly the
    # Apertus ids (1000 + rank), not ids to shift.
    assert tekkenizer.num_special_tokens == 1000
    for text in MULTILINGUAL_TEXTS:
        expected = tekkenizer.encode(text, bos=False, eos=False)
        assert min(expected) >= 1000
        assert tokenizer(text, add_special_tokens=False).input_ids == expected
        assert tokenizer(text).input_ids == [1, *expected]  # `<s>` prepended, no `</s>` appended


def test_exact_round_trip_on_multilingual_text(tokenizer):
    for text in MULTILINGUAL_TEXTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids) == "<s>" + text


def test_chat_rendering_matches_spec(tokenizer):
    assert tokenizer.chat_template == APERTUS_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDERING
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_RENDERING.removesuffix(f"{ANSWER}<|assistant_end|>")
    assert prompt.endswith("<|assistant_start|>")


def test_chat_ids_and_assistant_mask(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    system = tokenizer(SYSTEM, add_special_tokens=False).input_ids
    user = tokenizer(USER, add_special_tokens=False).input_ids
    answer = tokenizer(ANSWER, add_special_tokens=False).input_ids
    developer = tokenizer("Deliberation: disabled\nTool Capabilities: disabled", add_special_tokens=False).input_ids
    assert ids == [1, 61, *system, 62, 63, *developer, 64, 65, *user, 66, 67, *answer, 68]
    assert ids.count(1) == 1
    # The mask covers exactly the answer and its `<|assistant_end|>`.
    assert mask == [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)


def test_multi_turn_and_default_system_prompt(tokenizer):
    conversation = [
        {"role": "user", "content": "Hoi"},
        {"role": "assistant", "content": "Grüezi!"},
        {"role": "user", "content": "Merci"},
        {"role": "assistant", "content": "Gern gescheh."},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    # As swiss-ai's SFT rendered conversations without a system message: an empty system block.
    assert rendered.startswith("<s><|system_start|><|system_end|><|developer_start|>")
    assert rendered.endswith(
        "<|user_start|>Hoi<|user_end|><|assistant_start|>Grüezi!<|assistant_end|>"
        "<|user_start|>Merci<|user_end|><|assistant_start|>Gern gescheh.<|assistant_end|>"
    )
    masked = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    masked_ids = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked_ids) == "Grüezi!<|assistant_end|>Gern gescheh.<|assistant_end|>"


def test_unsupported_role_is_rejected(tokenizer):
    with pytest.raises(Exception, match="Unsupported message role function at position 1"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "function", "content": "y"}])


def test_generation_config():
    config = apertus_generation_config()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, [2, 68, 72], 3)
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.8, 0.9)


def test_missing_mistral_common_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    with pytest.raises(ImportError, match=r"pip install 'mistral-common>=1\.5'"):
        load_apertus_tokenizer()


def test_rejects_a_file_that_is_not_tekken_v3(tmp_path):
    not_v3 = tmp_path / "tekken.json"
    not_v3.write_text(json.dumps({"config": {"version": "v7", "default_vocab_size": 131072}, "vocab": []}))
    with pytest.raises(ValueError, match=r"version='v7'.*tekken v3"):
        load_apertus_tokenizer(not_v3)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_apertus_tokenizer(tmp_path / "missing.json")


def test_saved_tokenizer_loads_with_plain_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    script = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts, conversation = json.loads(sys.argv[2])
print(json.dumps({
    "ids": [tokenizer(text).input_ids for text in texts],
    "rendering": tokenizer.apply_chat_template(conversation, tokenize=False),
    "apertus_hf_imported": any(name.startswith("apertus_hf") for name in sys.modules),
}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps([MULTILINGUAL_TEXTS, CONVERSATION])],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not reloaded["apertus_hf_imported"]
    assert reloaded["ids"] == [tokenizer(text).input_ids for text in MULTILINGUAL_TEXTS]
    assert reloaded["rendering"] == EXPECTED_RENDERING


def test_recipes_name_the_apertus_tokenizer_apertus(tokenizer):
    """`tokenizer: apertus` in a recipe builds this tokenizer; the 8B/70B pretraining recipes use it."""
    from apertus_hf.pretraining import PretrainConfig
    from apertus_hf.recipe_args import parse_recipe_args
    from apertus_hf.tokenization import load_tokenizer

    built = load_tokenizer("apertus")
    assert built.get_vocab() == tokenizer.get_vocab() and built.chat_template == tokenizer.chat_template
    assert len(load_tokenizer(str(Path(__file__).resolve().parents[2] / "data" / "tokenizer"))) == 8192
    for size in ("8b", "70b"):
        recipe = Path(__file__).resolve().parents[2] / "recipes" / "configs" / size / "pretrain.yaml"
        assert parse_recipe_args(PretrainConfig, ["--config", str(recipe)]).tokenizer == "apertus"
