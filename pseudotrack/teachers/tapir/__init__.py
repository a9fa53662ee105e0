"""TAPIR and BootsTAPIR: the network (`model`, `blocks`) and their teachers (`teacher`)."""

from .model import (
    BOOTSTAPIR_CONFIG,
    TAPIR_CONFIG,
    Tapir,
    TapirConfig,
    load_tapir,
    refinement_resolutions,
)
from .teacher import TapirTeacher

__all__ = [
    "BOOTSTAPIR_CONFIG",
    "TAPIR_CONFIG",
    "Tapir",
    "TapirConfig",
    "TapirTeacher",
    "load_tapir",
    "refinement_resolutions",
]
