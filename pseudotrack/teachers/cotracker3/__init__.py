"""CoTracker3 online and offline: the network (`model`) and its teachers (`teacher`)."""

from .model import (
    Chunks,
    CoTracker3,
    CoTracker3Config,
    OnlineState,
    RefineSteps,
    TrackerOutput,
    WindowIterates,
    config_from_dict,
    default_config,
    load_cotracker3,
    student_config,
    tiny_config,
    train_forward,
    window_starts,
    with_variant,
)
from .teacher import CoTracker3Teacher, predictor_from_model

__all__ = [
    "Chunks",
    "CoTracker3",
    "CoTracker3Config",
    "CoTracker3Teacher",
    "OnlineState",
    "RefineSteps",
    "TrackerOutput",
    "WindowIterates",
    "config_from_dict",
    "default_config",
    "load_cotracker3",
    "predictor_from_model",
    "student_config",
    "tiny_config",
    "train_forward",
    "window_starts",
    "with_variant",
]
