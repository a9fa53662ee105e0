"""Errors that carry a reason a person can act on.

A `SampleError` fails one video (it becomes a `failed` catalog row with its
reason) while the round goes on; a `ConfigError` stops a round before any work
because nothing useful can happen until a person fixes the input.
"""

from __future__ import annotations


class PseudotrackError(Exception):
    """Base class for errors raised on purpose by pseudotrack."""


class ConfigError(PseudotrackError):
    """The round cannot start: a missing bucket, an unwritable workspace, a missing checkpoint..."""


class SampleError(PseudotrackError):
    """One video cannot be labelled; `reason` is short, stable and human-readable.

    `stage` names the pipeline stage that failed (decode, queries, teacher, ...),
    so failure tables can group by it.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class CheckpointError(ConfigError):
    """A checkpoint file is missing, truncated, or belongs to another model."""
