"""A round's teacher calibration: δ_avg, AJ and OA of each teacher on generated scenes with exact tracks.

The quality scores (tasks/quality.py) rank a teacher's tracks; calibration says how good the
teacher is at all, on the same small fixed set every round (student/calibration.py), so rounds
compare. It is recorded in runs/<round>/calibration.json and in the round's summary.json.
"""

from __future__ import annotations

import json

from ..config import RoundConfig
from .summary import calibration_key


def calibrate_round(config: RoundConfig, checkpoints: dict[str, str | None], workspace) -> dict[str, dict]:
    """Each configured teacher's δ_avg, AJ and OA on the generated calibration set, on the round's device.

    Runs where the teachers label: the round's process for the local executor (its batches then reuse
    the teachers set up here), the first batch of a worker for the pool executor (`run_batch`). It is
    written to runs/<round>/calibration.json; a teacher that cannot be calibrated is recorded with why,
    and never fails the round.
    """
    from ..student.calibration import CalibrationSet, calibrate_teachers
    from ..tasks.labelling import TeacherPool

    if not checkpoints or config.calibration_scenes < 1:
        return {}
    try:
        teachers = TeacherPool(checkpoints, config.device)
    except Exception as exc:  # e.g. a device that cannot be resolved here; the batches will say more
        return {name: {"teacher": name, "error": f"{type(exc).__name__}: {exc}"} for name in checkpoints}
    result = calibrate_teachers(teachers.get, teachers.names, CalibrationSet(scenes=config.calibration_scenes))
    workspace.write_bytes(calibration_key(config.round_id or ""), json.dumps(result, indent=2, sort_keys=True).encode())
    return result


def read_calibration(workspace, round_id: str) -> dict[str, dict]:
    """A round's calibration.json, or {} when no batch wrote one (none ran, or all failed first)."""
    try:
        return json.loads(workspace.read_bytes(calibration_key(round_id)))
    except (FileNotFoundError, ValueError):
        return {}
