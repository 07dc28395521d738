"""Sample completions from a causal LM with `model.generate`: QRPO's reference completions, and evaluations.

Prompts are plain strings (tokenized with the tokenizer's own special tokens, so `<s>` first) or chat conversations
(rendered with `apply_chat_template(add_generation_prompt=True)`). Sequences are generated in batches with left
padding; a completion ends at the first stop token (left out of the text) or after `max_new_tokens`.

Determinism: the (prompt, sample) pairs are laid out in order (prompt 0's samples, then prompt 1's, ...) and cut into
batches of `batch_size` sequences; batch b is sampled right after seeding torch with (seed, b). Results are therefore
the same for a given (seed, batch_size) whatever the number of processes, since under `accelerate launch` the batches
are shared out with `PartialState.split_between_processes` and gathered back in order. They do change with
`batch_size`: `generate` draws every row of a batch from one random stream, so another batching gives different (but
equally valid) samples. Greedy decoding (temperature 0) does not depend on the batching. Without a GPU, processes
only form a group once `runtime.init_cpu_process_group()` has set it up (`prepare_qrpo_dataset` calls it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..data.padding import pad_token_rows
from ..tokenization.special_tokens import ASSISTANT_END_TOKEN_ID, SPECIAL_TOKENS, TOOLS_SUFFIX_TOKEN_ID

# A chat prompt is a list of {"role": ..., "content": ...} messages; anything else must be a string.
Prompt = str | list[dict[str, Any]]

# Apertus ends an assistant turn with <|assistant_end|> and a tool call with <|tools_suffix|> (the eos_token_id of
# swiss-ai/Apertus-8B-Instruct-2509's generation_config.json on the Hub).
APERTUS_END_OF_TURN_TOKENS = (SPECIAL_TOKENS[ASSISTANT_END_TOKEN_ID], SPECIAL_TOKENS[TOOLS_SUFFIX_TOKEN_ID])

# Logits processors, each set to its no-op value: `generate` fills every field left at None from the model's own
# generation_config.json (an instruct model ships top_p 0.9 and the like), which would change what is sampled.
_NEUTRAL_PENALTIES = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
}
_NEUTRAL_WARPERS = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its text (without the stop token), its token count and whether a stop token ended it
    (False: cut at `max_new_tokens`)."""

    text: str
    num_tokens: int
    finished: bool


def is_chat_prompt(prompt: Any) -> bool:
    """Whether `prompt` is a chat conversation (a non-empty list of messages) rather than a string."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the model's generation-config EOS ids, the tokenizer's EOS, and the Apertus
    end-of-turn tokens when the tokenizer has them (a pretrained checkpoint's config knows only `</s>`)."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    ids += configured if isinstance(configured, list) else [] if configured is None else [configured]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in APERTUS_END_OF_TURN_TOKENS if token in vocab]
    return sorted(set(ids))


def sampling_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generation_config: GenerationConfig | None = None,
) -> GenerationConfig:
    """The `GenerationConfig` `sample_completions` generates with.

    Without `generation_config`: plain ancestral sampling at `temperature` with nucleus `top_p` and nothing else (no
    top-k, no repetition penalty, ...), whatever the model's own generation config says; at temperature 1 and top_p 1
    that is exactly the policy's distribution, which QRPO's reference completions need. Temperature 0 means greedy.
    With `generation_config`, that config is the starting point (e.g. `apertus_generation_config()` for its stop
    tokens) and `temperature`, `top_p` and `max_new_tokens` are applied on top. Stop tokens: `stop_token_ids` unless
    the given config sets its own.
    """
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError(
            f"Need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1; got temperature={temperature}, "
            f"top_p={top_p}, max_new_tokens={max_new_tokens}."
        )
    sampled = temperature > 0
    if generation_config is None:
        config = GenerationConfig(do_sample=sampled, **_NEUTRAL_PENALTIES, **(_NEUTRAL_WARPERS if sampled else {}))
    else:
        config = GenerationConfig.from_dict(generation_config.to_dict())  # a copy: the caller's stays as it was
    config.update(
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_p=top_p if sampled else None,
        max_new_tokens=max_new_tokens,
        max_length=None,
    )
    if config.eos_token_id is None:
        config.eos_token_id = stop_token_ids(model, tokenizer)
    if config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token to pad batches with; set tokenizer.pad_token."
            )
        config.pad_token_id = pad
    return config


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of `prompt` as the model sees it before its completion."""
    if is_chat_prompt(prompt):
        if not tokenizer.chat_template:
            raise ValueError(
                "Chat prompts need a tokenizer with a chat template; this one has none. Use a tokenizer saved by "
                "apertus_hf (it carries the Apertus template) or give string prompts."
            )
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt is a string or a list of chat messages, got {type(prompt).__name__}: {prompt!r}.")
    return list(tokenizer(prompt)["input_ids"])


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch `batch_index`: independent streams per batch, the same on every process."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    generation_config: GenerationConfig | None = None,
) -> list[list[Completion]]:
    """`num_samples` completions per prompt (see `sample_completions`), with token counts and stop flags."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    config = sampling_config(model, tokenizer, max_new_tokens, temperature, top_p, generation_config)
    stops = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    work = [(prompt_index, sample) for prompt_index in range(len(prompts)) for sample in range(num_samples)]
    batches = [work[start : start + batch_size] for start in range(0, len(work), batch_size)]

    state = PartialState()
    mine: list[tuple[int, list[Completion]]] = []
    was_training = model.training
    model.eval()
    with state.split_between_processes(list(range(len(batches)))) as batch_indices:
        progress = tqdm(batch_indices, desc="Sampling", unit="batch", disable=not state.is_local_main_process)
        for batch_index in progress:
            rows = [encoded[prompt_index] for prompt_index, _ in batches[batch_index]]
            torch.manual_seed(batch_seed(seed, batch_index))
            mine.append((batch_index, _generate_batch(model, rows, config, stops, tokenizer)))
    model.train(was_training)

    flat = [completion for _, batch in sorted(gather_object(mine)) for completion in batch]
    return [flat[index * num_samples : (index + 1) * num_samples] for index in range(len(prompts))]


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    generation_config: GenerationConfig | None = None,
) -> list[list[str]]:
    """`num_samples` completion texts for each prompt, in prompt order, sampled with `model.generate`.

    Args:
        model: a causal LM, on the device it should run on.
        tokenizer: its tokenizer (with a chat template for chat prompts).
        prompts: strings, or chat conversations (lists of {"role", "content"} messages ending with a user turn).
        num_samples: completions per prompt.
        max_new_tokens: longest completion, in tokens.
        temperature: sampling temperature; 1 with top_p 1 samples the policy's own distribution; 0 is greedy.
        top_p: nucleus sampling mass.
        batch_size: sequences per `generate` call (prompts are repeated `num_samples` times, then batched).
        seed: results are reproducible for a given (seed, batch_size), on any number of processes.
        generation_config: a config to start from instead of plain sampling (see `sampling_config`).

    Returns:
        For each prompt, its `num_samples` completions, decoded without the stop token.
    """
    completions = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p, batch_size, seed, generation_config
    )
    return [[completion.text for completion in samples] for samples in completions]


@torch.inference_mode()
def _generate_batch(
    model: PreTrainedModel,
    rows: list[list[int]],
    config: GenerationConfig,
    stops: set[int],
    tokenizer: PreTrainedTokenizerBase,
) -> list[Completion]:
    input_ids, attention_mask = pad_token_rows(rows, config.pad_token_id, padding_side="left")
    width = input_ids.shape[1]
    generated = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        generation_config=config,
    )
    completions = []
    for sequence in generated[:, width:].tolist():
        end = next((position for position, token in enumerate(sequence) if token in stops), None)
        tokens = sequence if end is None else sequence[:end]
        completions.append(Completion(tokenizer.decode(tokens), num_tokens=len(tokens), finished=end is not None))
    return completions
