"""apertus_hf: the Hugging Face-native home of the Apertus architecture.

Importing the package registers our config and model classes with the `transformers` Auto classes for model type
`apertus`, so `AutoModelForCausalLM.from_pretrained(folder)` returns `apertus_hf.ApertusForCausalLM`. Without the
import, the same folders load into `transformers`' built-in Apertus.
"""

import os

import torch

# DeepSpeed picks its accelerator when first imported; without a GPU it must be told to use the CPU one. Set here,
# before any submodule (or transformers, accelerate, TRL) can import it, and only as a default so a user's own
# setting wins.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_apertus import PRESETS, ApertusConfig, InvalidApertusConfigError
from .data import goldfish_drop_mask
from .modeling_apertus import (
    ApertusForCausalLM,
    ApertusForSequenceClassification,
    ApertusForTokenClassification,
    ApertusModel,
    ApertusPreTrainedModel,
)
from .tokenization import APERTUS_CHAT_TEMPLATE, apertus_generation_config, load_apertus_tokenizer

__version__ = "0.1.0"

# `apertus` is built into transformers, hence exist_ok: we replace its entries, and only those.
AutoConfig.register(ApertusConfig.model_type, ApertusConfig, exist_ok=True)
AutoModel.register(ApertusConfig, ApertusModel, exist_ok=True)
AutoModelForCausalLM.register(ApertusConfig, ApertusForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ApertusConfig, ApertusForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(ApertusConfig, ApertusForTokenClassification, exist_ok=True)

__all__ = [
    "APERTUS_CHAT_TEMPLATE",
    "PRESETS",
    "ApertusConfig",
    "ApertusForCausalLM",
    "ApertusForSequenceClassification",
    "ApertusForTokenClassification",
    "ApertusModel",
    "ApertusPreTrainedModel",
    "InvalidApertusConfigError",
    "apertus_generation_config",
    "goldfish_drop_mask",
    "load_apertus_tokenizer",
]
