"""What bounded a label batch or a round: the teacher's busy fraction, clips per second, and "teacher" or "cpu".

Read from the stage seconds a batch records (tasks/labelling.py) and a round
sums into `runs/<round>/summary.json`; `pseudotrack status` and the dashboard
show them.
"""

from __future__ import annotations

TEACHER_BOUND = 0.9  # a teacher busy at least this fraction of a batch's time is the bound, not the CPU


def teacher_busy(stage_seconds: dict[str, float]) -> float:
    """The fraction of a batch's (or a round's batches') time the teacher was running."""
    total = stage_seconds.get("batch", 0.0)
    return stage_seconds.get("teacher", 0.0) / total if total > 0 else 0.0


def bound_by(stage_seconds: dict[str, float]) -> str:
    """'teacher' when the teacher was busy almost all the time (more CPU workers would not help), else 'cpu'."""
    return "teacher" if teacher_busy(stage_seconds) >= TEACHER_BOUND else "cpu"


def round_throughput(summary: dict) -> dict | None:
    """What bounded a round: teacher busy fraction, clips per second of batch time, and `bound_by`.

    From a round's `runs/<round>/summary.json` (RoundSummary.to_dict): its
    `stage_seconds` are its batches' stage seconds summed, so the busy fraction
    is the teacher's share of all batch time and clips/s is the videos labelled
    per second a batch ran (one batch process's rate; batches running side by
    side add up). None while the round has recorded no batch time (still
    planning or running, or nothing to label).
    """
    stages = summary.get("stage_seconds") if isinstance(summary, dict) else None
    if not isinstance(stages, dict):
        return None
    stages = {k: float(v) for k, v in stages.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    batch = stages.get("batch", 0.0)
    if not batch > 0:
        return None
    labelled = summary.get("labelled")
    labelled = labelled if isinstance(labelled, int) and not isinstance(labelled, bool) else 0
    return {
        "teacher_busy": teacher_busy(stages),
        "clips_per_s": labelled / batch,
        "bound_by": bound_by(stages),
        "batch_seconds": batch,
    }
