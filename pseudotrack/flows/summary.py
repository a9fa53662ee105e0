"""What a round reports when it ends: its summary, and the artifact keys the flows publish it under."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..storage.layout import runs_prefix


@dataclass
class RoundSummary:
    round_id: str
    discovered: int = 0
    planned: int = 0
    reused: int = 0  # already labelled/filtered/failed with the same ETag
    filtered: int = 0
    labelled: int = 0
    failed: int = 0
    recovered: int = 0  # samples of shards committed by an interrupted run, catalogued now
    shards: list[str] = field(default_factory=list)
    teachers: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    filter_rules: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failed_batches: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # planned videos left to another round, by why
    seconds: float = 0.0
    # teacher -> {delta_avg, average_jaccard, occlusion_accuracy, scenes, queries, seconds, failed} on the
    # generated calibration set (student/calibration.py), or {"error": why}; empty when not calibrated
    calibration: dict[str, dict] = field(default_factory=dict)
    next_steps: list[str] = field(default_factory=list)  # how to resume or retry, when something failed

    def to_dict(self) -> dict:
        return asdict(self)


def next_steps(summary: RoundSummary) -> list[str]:
    """What to run after a round with failures, for the CLI, the Prefect artifact and the dashboard.

    Failed batches are unrecorded work that the same round id resumes; failed videos are recorded as
    failed and skipped by later rounds unless asked to try them again with --retry-failed.
    """
    steps = []
    if summary.failed_batches:
        steps.append(
            f"{len(summary.failed_batches)} batch(es) did not finish: run the round again with "
            f"--round-id {summary.round_id} to resume them (everything else is kept)"
        )
    if summary.failed:
        steps.append(
            f"{summary.failed} video(s) failed (see the failure reasons): once their cause is fixed, run again "
            "with --retry-failed to label them again (later rounds skip them otherwise)"
        )
    return steps


def calibration_key(round_id: str) -> str:
    """Where a round's calibration is written (beside its summary.json), by the round or a pool batch."""
    return f"{runs_prefix(round_id)}calibration.json"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]
