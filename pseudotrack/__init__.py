"""pseudotrack: pseudo-label real videos with frozen point trackers, then fine-tune a student on them."""

__version__ = "0.1.0"
