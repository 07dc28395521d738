"""Data side of the Apertus pretraining recipe."""

from .goldfish import apply_goldfish, goldfish_drop_mask

__all__ = [
    "apply_goldfish",
    "goldfish_drop_mask",
]
