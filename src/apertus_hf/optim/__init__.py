"""The optimizer and learning-rate schedule of the Apertus pretraining recipe: AdEMAMix and warmup-stable-decay."""

from .ademamix import AdEMAMix, ademamix_alpha, ademamix_beta3, build_parameter_groups
from .schedules import WSDSchedule, wsd_lr_factor

__all__ = [
    "AdEMAMix",
    "WSDSchedule",
    "ademamix_alpha",
    "ademamix_beta3",
    "build_parameter_groups",
    "wsd_lr_factor",
]
