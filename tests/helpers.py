"""Shared builders for tests: tiny configs and a stock `transformers` twin with identical weights."""

import torch
import transformers

import apertus_hf

TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.05,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


def tiny_config(**overrides) -> apertus_hf.ApertusConfig:
    return apertus_hf.ApertusConfig(**{**TINY, **overrides})


def randomize_xielu(model: torch.nn.Module) -> None:
    """Move the xIELU scalars off their initial values, so parity also covers trained activations."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):
                parameter.add_(torch.randn_like(parameter) * 0.3)
            if name.endswith("layernorm.weight") or name.endswith("_norm.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)


def model_pair(config: apertus_hf.ApertusConfig, attn_implementation: str = "eager"):
    """Our ApertusForCausalLM and transformers' built-in one, with the same weights, in eval mode."""
    ours = apertus_hf.ApertusForCausalLM(config)
    randomize_xielu(ours)
    stock_config = transformers.models.apertus.ApertusConfig(**config.to_diff_dict())
    stock = transformers.models.apertus.ApertusForCausalLM(stock_config)
    stock.load_state_dict(ours.state_dict(), strict=True)
    ours.set_attn_implementation(attn_implementation)
    stock.set_attn_implementation(attn_implementation)
    return ours.eval(), stock.eval()


def left_padded_batch(lengths: list[int], vocab_size: int, pad_token_id: int = 3):
    """Token ids and attention mask of a left-padded batch (pads first, as for generation)."""
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(4, vocab_size, (length,))
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


TINY_TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüezi mitenand! Wie gaht's dir hüt?",
    "Le chat dort sur la table, près de la fenêtre.",
    "La gata duerme junto a la ventana abierta.",
    "Der Zug nach Zürich fährt um acht Uhr ab.",
    "Il treno per Lugano parte alle nove e mezza.",
]


def tiny_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on a few sentences: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_TOKENIZER_TEXTS * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# An accelerate config for DeepSpeed ZeRO-3 on two CPU processes (see FINDINGS: `use_cpu: false`, gloo backend).
ZERO3_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: true
  zero3_save_16bit_model: true
num_machines: 1
num_processes: 2
use_cpu: false
mixed_precision: "no"
"""
