"""The real Apertus tokenizer, built offline from Mistral-Nemo's tekken v3, with the Apertus chat template.

Apertus' BPE is tekken v3 (`tekken_240718.json`, shipped inside the `mistral-common` wheel): ordinary token id =
1000 + tekken rank, vocabulary 131,072, and ids 0..999 are the Apertus special slots (`special_tokens.py`; Apertus
tech report, arXiv 2509.14233, §2.2 'Tokenizer').
`transformers`' `MistralConverter` already turns the tekken ranks into a `tokenizers` BPE with exactly these ids
(the same ids as mistral-common's own `Tekkenizer`); only the names of the 1000 special slots differ, so they are
renamed to the Apertus layout here.
"""

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.integrations.mistral.tokenizer import MistralConverter

from ..runtime import resolve_source
from .chat_template import APERTUS_CHAT_TEMPLATE
from .special_tokens import (
    ASSISTANT_END_TOKEN_ID,
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    NAMED_SPECIAL_TOKENS,
    NUM_SPECIAL_TOKENS,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    TOOLS_SUFFIX_TOKEN_ID,
)
from .training import bos_prepending_post_processor, wrap_apertus_tokenizer

logger = logging.getLogger(__name__)

APERTUS_VOCAB_SIZE = 131072
APERTUS_MODEL_MAX_LENGTH = 65536
TEKKEN_VERSION = "v3"
TEKKEN_FILE_NAME = "tekken_240718.json"
MISTRAL_COMMON_INSTALL = "pip install 'mistral-common>=1.5'"


def default_tekken_path() -> Path:
    """The tekken v3 file shipped inside the installed `mistral-common` wheel."""
    try:
        import mistral_common
    except ImportError as error:
        raise ImportError(
            f"The Apertus tokenizer is built from Mistral-Nemo's tekken v3 ({TEKKEN_FILE_NAME}), which ships with "
            f"mistral-common; install it with `{MISTRAL_COMMON_INSTALL}` or pass tekken_path=... to a local copy."
        ) from error
    return Path(mistral_common.__file__).parent / "data" / TEKKEN_FILE_NAME


def _check_tekken_v3(path: Path) -> None:
    """Raise unless `path` is a tekken v3 file with Apertus' vocabulary layout."""
    if not path.is_file():
        raise FileNotFoundError(f"Tekken file {path} does not exist; pass the path to {TEKKEN_FILE_NAME}.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a tekken tokenizer file (JSON with a 'config' object): {error}") from error
    expected = {
        "version": TEKKEN_VERSION,
        "default_vocab_size": APERTUS_VOCAB_SIZE,
        "default_num_special_tokens": NUM_SPECIAL_TOKENS,
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(
                f"{path} has config {key}={config.get(key)!r}, but the Apertus tokenizer needs tekken {TEKKEN_VERSION} "
                f"with {key}={value!r}; use Mistral-Nemo's {TEKKEN_FILE_NAME} (in `{MISTRAL_COMMON_INSTALL}`)."
            )


def load_apertus_tokenizer(tekken_path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the Apertus tokenizer offline from tekken v3 (a few seconds).

    Ordinary ids are 1000 + tekken rank (the first 130,072 ranks), ids 0..999 carry the Apertus special-token names,
    encoding prepends `<s>` and appends nothing, and `chat_template` is `APERTUS_CHAT_TEMPLATE`.

    Args:
        tekken_path: a tekken v3 JSON file; default: `tekken_240718.json` from the installed `mistral-common`.
    """
    path = Path(tekken_path) if tekken_path is not None else default_tekken_path()
    _check_tekken_v3(path)

    converted = json.loads(MistralConverter(str(path)).converted().to_str())
    # Rename Mistral's special slots (`[INST]`, `<SPECIAL_n>`, ...) to Apertus' names at the same ids.
    vocab = converted["model"]["vocab"]
    for name in [name for name, token_id in vocab.items() if token_id < NUM_SPECIAL_TOKENS]:
        del vocab[name]
    vocab.update({name: token_id for token_id, name in SPECIAL_TOKENS.items()})
    for added_token in converted["added_tokens"]:
        added_token["content"] = SPECIAL_TOKENS[added_token["id"]]
    tokenizer = Tokenizer.from_str(json.dumps(converted))
    tokenizer.post_processor = bos_prepending_post_processor()
    if tokenizer.get_vocab_size() != APERTUS_VOCAB_SIZE:
        raise ValueError(
            f"Building the Apertus tokenizer from {path} gave {tokenizer.get_vocab_size()} tokens instead of "
            f"{APERTUS_VOCAB_SIZE}; an ordinary tekken token collides with an Apertus special-token name."
        )
    return wrap_apertus_tokenizer(tokenizer, APERTUS_MODEL_MAX_LENGTH, APERTUS_CHAT_TEMPLATE)


APERTUS_TOKENIZER_NAME = "apertus"
"""What recipes write for `tokenizer` to get `load_apertus_tokenizer()`: the real Apertus tokenizer, built offline."""


def load_tokenizer(name_or_path: str, what: str = "tokenizer") -> PreTrainedTokenizerFast:
    """`load_apertus_tokenizer()` for the name "apertus", else `AutoTokenizer.from_pretrained(name_or_path)`.

    A local path that does not exist raises `SourceNotFoundError` naming `what` (the option that gave it), before
    transformers would take it for a Hub id.
    """
    if name_or_path == APERTUS_TOKENIZER_NAME:
        return load_apertus_tokenizer()
    source = resolve_source(name_or_path, what, f"Use a tokenizer folder, a Hub id, or {APERTUS_TOKENIZER_NAME!r}.")
    return AutoTokenizer.from_pretrained(source)


def has_apertus_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` has every named Apertus special token at its Apertus id (the ids of the Hub's
    swiss-ai/Apertus-8B-Instruct-2509 tokenizer_config.json)."""
    vocab = tokenizer.get_vocab()
    return all(vocab.get(token) == token_id for token_id, token in NAMED_SPECIAL_TOKENS.items())


def load_chat_tokenizer(name_or_path: str, what: str = "tokenizer_name_or_path") -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path` for chat training and sampling: it must have a chat template and a pad token.

    Tokenizers with the Apertus special tokens at their ids but no stored template (saved before the template
    existed) get the Apertus template, which renders correctly with them.
    """
    tokenizer = load_tokenizer(name_or_path, what)
    if not tokenizer.chat_template and has_apertus_special_tokens(tokenizer):
        logger.info("The tokenizer of %s has no chat template; using the Apertus one.", name_or_path)
        tokenizer.chat_template = APERTUS_CHAT_TEMPLATE
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer of {name_or_path} has no chat template. Use a tokenizer saved by apertus_hf "
            "(data/tokenizer or apertus_hf.tokenization.load_apertus_tokenizer()), or set tokenizer_name_or_path to one."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"The tokenizer of {name_or_path} has no pad token; set tokenizer.pad_token.")
    return tokenizer


def apertus_generation_config() -> GenerationConfig:
    """Apertus' recommended sampling (swiss-ai/Apertus-8B-Instruct-2509's model card and generation_config.json on
    the Hub): stop on `</s>`, `<|assistant_end|>` or `<|tools_suffix|>`."""
    return GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=[EOS_TOKEN_ID, ASSISTANT_END_TOKEN_ID, TOOLS_SUFFIX_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
    )
