"""The Apertus special-token layout.

Apertus keeps tekken's convention: ids 0..999 are reserved special slots and ordinary (learned) tokens start at
id 1000. The slots Apertus gives a meaning to are named below (as in the Hub's swiss-ai/Apertus-8B-Instruct-2509
tokenizer_config.json); every other slot is `<SPECIAL_{id}>`.
The names of the three fill-in-the-middle slots (58-60) are not documented in what this project has access to, so
they follow the common `<fim_prefix>`/`<fim_middle>`/`<fim_suffix>` convention.
"""

NUM_SPECIAL_TOKENS = 1000

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
PAD_TOKEN_ID = 3
THINK_START_TOKEN_ID = 32
THINK_END_TOKEN_ID = 33
ANSWER_START_TOKEN_ID = 34
ANSWER_END_TOKEN_ID = 35
FIM_PREFIX_TOKEN_ID = 58
FIM_MIDDLE_TOKEN_ID = 59
FIM_SUFFIX_TOKEN_ID = 60
SYSTEM_START_TOKEN_ID = 61
SYSTEM_END_TOKEN_ID = 62
DEVELOPER_START_TOKEN_ID = 63
DEVELOPER_END_TOKEN_ID = 64
USER_START_TOKEN_ID = 65
USER_END_TOKEN_ID = 66
ASSISTANT_START_TOKEN_ID = 67
ASSISTANT_END_TOKEN_ID = 68
INNER_PREFIX_TOKEN_ID = 69
INNER_SUFFIX_TOKEN_ID = 70
TOOLS_PREFIX_TOKEN_ID = 71
TOOLS_SUFFIX_TOKEN_ID = 72

NAMED_SPECIAL_TOKENS: dict[int, str] = {
    UNK_TOKEN_ID: UNK_TOKEN,
    BOS_TOKEN_ID: BOS_TOKEN,
    EOS_TOKEN_ID: EOS_TOKEN,
    PAD_TOKEN_ID: PAD_TOKEN,
    THINK_START_TOKEN_ID: "<think>",
    THINK_END_TOKEN_ID: "</think>",
    ANSWER_START_TOKEN_ID: "<answer>",
    ANSWER_END_TOKEN_ID: "</answer>",
    FIM_PREFIX_TOKEN_ID: "<fim_prefix>",
    FIM_MIDDLE_TOKEN_ID: "<fim_middle>",
    FIM_SUFFIX_TOKEN_ID: "<fim_suffix>",
    SYSTEM_START_TOKEN_ID: "<|system_start|>",
    SYSTEM_END_TOKEN_ID: "<|system_end|>",
    DEVELOPER_START_TOKEN_ID: "<|developer_start|>",
    DEVELOPER_END_TOKEN_ID: "<|developer_end|>",
    USER_START_TOKEN_ID: "<|user_start|>",
    USER_END_TOKEN_ID: "<|user_end|>",
    ASSISTANT_START_TOKEN_ID: "<|assistant_start|>",
    ASSISTANT_END_TOKEN_ID: "<|assistant_end|>",
    INNER_PREFIX_TOKEN_ID: "<|inner_prefix|>",
    INNER_SUFFIX_TOKEN_ID: "<|inner_suffix|>",
    TOOLS_PREFIX_TOKEN_ID: "<|tools_prefix|>",
    TOOLS_SUFFIX_TOKEN_ID: "<|tools_suffix|>",
}
"""The special slots Apertus uses, by id."""

MIN_NUM_SPECIAL_TOKENS = max(NAMED_SPECIAL_TOKENS) + 1


def special_token_layout(num_special_tokens: int = NUM_SPECIAL_TOKENS) -> dict[int, str]:
    """Map every special id 0..num_special_tokens-1 to its token string: the named Apertus slots, else `<SPECIAL_{id}>`.

    A smaller layout than Apertus' 1000 slots is allowed (for tests and toy vocabularies) as long as it keeps every
    named slot.
    """
    if num_special_tokens < MIN_NUM_SPECIAL_TOKENS:
        raise ValueError(
            f"num_special_tokens={num_special_tokens} cannot hold the Apertus special tokens, the last of which "
            f"({NAMED_SPECIAL_TOKENS[MIN_NUM_SPECIAL_TOKENS - 1]!r}) has id {MIN_NUM_SPECIAL_TOKENS - 1}; "
            f"use num_special_tokens >= {MIN_NUM_SPECIAL_TOKENS} (Apertus uses {NUM_SPECIAL_TOKENS})."
        )
    return {
        token_id: NAMED_SPECIAL_TOKENS.get(token_id, f"<SPECIAL_{token_id}>") for token_id in range(num_special_tokens)
    }


SPECIAL_TOKENS: dict[int, str] = special_token_layout()
"""The full Apertus layout: id -> token string for ids 0..999."""
