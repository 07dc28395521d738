"""Data side of the Apertus pretraining recipe: documents, packing, Goldfish."""

from .collator import PackedBatchCollator
from .global_rows import GlobalRowSampler, GlobalRowStream
from .goldfish import apply_goldfish, goldfish_drop_mask
from .packing import IGNORE_INDEX, pack_token_ids, tokenize_and_pack
from .sources import BadRecordError, DataSource, LoadStats, load_documents

__all__ = [
    "IGNORE_INDEX",
    "BadRecordError",
    "DataSource",
    "GlobalRowSampler",
    "GlobalRowStream",
    "LoadStats",
    "PackedBatchCollator",
    "apply_goldfish",
    "goldfish_drop_mask",
    "load_documents",
    "pack_token_ids",
    "tokenize_and_pack",
]
