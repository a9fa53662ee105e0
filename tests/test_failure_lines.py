"""Whose fault is it? Only a video's own faults are terminal; a teacher, device, disk or bug fails the batch.

A bad checkpoint is refused before any video is touched (exit 2, one line, an
empty catalog); a teacher that breaks during a batch, or a full disk, leaves
the videos pending so that the next good round labels them.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from reference import BOOTSTAPIR_TINY, CT2_TINY, TAPIR_TINY
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.config import RoundConfig
from pseudotrack.demo import write_demo_bucket
from pseudotrack.errors import CheckpointError, ConfigError
from pseudotrack.flows.label_round import BatchesFailed, run_round
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.labelling import resolve_checkpoints
from pseudotrack.teachers.base import TeacherSpec, create_teacher, register_teacher
from pseudotrack.teachers.cotracker2 import CoTracker2
from pseudotrack.teachers.cotracker3 import CoTracker3, tiny_config
from pseudotrack.teachers.tapir import Tapir

SMALL = dict(height=64, width=96, num_frames=12, min_frames=8, num_queries=24, num_keyframes=4, batch_size=2)
runner = CliRunner()


class Breaking:
    """A teacher whose forward fails with `error()`, as a GPU or a full disk would, whatever the clip."""

    error = staticmethod(lambda: RuntimeError("CUDA error: an illegal memory access was encountered"))
    checkpoint_sha256 = ""
    tracks_occluded = True

    def __init__(self, name: str):
        self.name = name

    def setup(self, device: str = "cpu") -> None:
        pass

    def predict(self, frames: np.ndarray, queries: np.ndarray):
        raise type(self).error()


class CudaBroken(Breaking):
    pass


class DiskFull(Breaking):
    error = staticmethod(lambda: OSError(errno.ENOSPC, "No space left on device"))


for _name, _cls in (("test_cuda_broken", CudaBroken), ("test_disk_full", DiskFull)):
    register_teacher(
        TeacherSpec(name=_name, factory=lambda _cls=_cls, _name=_name: _cls(_name), needs_checkpoint=False)
    )


@pytest.fixture
def bucket(tmp_path):
    """Four generated videos the caption filter keeps or drops, and one broken file."""
    root = tmp_path / "bucket"
    write_demo_bucket(root, videos=4, frames=14, height=64, width=96, seed=5, broken=1)
    return root


def latest(workspace) -> dict[str, dict]:
    return {r["video_key"]: r for r in Catalog(open_store(str(workspace))).latest().to_pylist()}


def good_videos(bucket, rows: dict[str, dict]) -> set[str]:
    return {k for k, r in rows.items() if r["status"] == "labelled"}


# ---------------------------------------------------------------- a broken checkpoint, before any work


def test_a_corrupt_checkpoint_is_refused_before_any_video(bucket, tmp_path, prefect_server):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    workspace = tmp_path / "ws"
    common = ["--bucket", str(bucket), "--workspace", str(workspace), "--frames", "12", "--height", "64"]
    common += ["--width", "96", "--queries", "24", "--batch-size", "2"]
    result = runner.invoke(
        app,
        ["round", *common, "--teacher", f"cotracker3_online={garbage}"],
        terminal_width=200,
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 2, result.output
    joined = " ".join(" ".join(lines).split())  # rich wraps long lines at the terminal width
    assert "Traceback" not in result.output and len(result.output) < 600, result.output
    assert joined.startswith("error:") and "garbage.pth" in joined and "weights-only loader" in joined
    assert "cotracker3_online" in joined
    catalog_files = list((workspace / "catalog").rglob("*.parquet")) if (workspace / "catalog").exists() else []
    assert catalog_files == [], catalog_files  # nothing recorded: no video was touched
    # the next round with a good teacher labels every good video (none was marked done)
    result = runner.invoke(app, ["round", *common, "--teacher", "lk"])
    assert result.exit_code == 0, result.output
    rows = latest(workspace)
    labelled = good_videos(bucket, rows)
    assert labelled and all(r["status"] in ("labelled", "filtered") for k, r in rows.items() if k != "broken_00.mp4")
    assert rows["broken_00.mp4"]["status"] == "failed" and rows["broken_00.mp4"]["stage"] == "decode"


def test_a_checkpoint_of_the_wrong_model_is_refused_with_its_keys(tmp_path):
    """A valid weights file that is not CoTracker3's: refused by name, before work, without a forward."""
    wrong = tmp_path / "scaled_online.pth"
    torch.save({"fnet.conv1.weight": torch.zeros(4, 3, 3, 3)}, wrong)
    config = RoundConfig(bucket=str(tmp_path), workspace=str(tmp_path / "ws"), teachers=[f"cotracker3_online={wrong}"])
    with pytest.raises(ConfigError, match="does not fit") as caught:
        resolve_checkpoints(config)
    message = str(caught.value)
    assert str(wrong) in message and "missing keys" in message and "\n" not in message


TINY = {
    "cotracker3_online": lambda: (CoTracker3(tiny_config(False)), {"model_config": tiny_config()}),
    "cotracker3_offline": lambda: (CoTracker3(tiny_config(True)), {"model_config": tiny_config()}),
    "cotracker2": lambda: (CoTracker2(CT2_TINY), {"config": CT2_TINY}),
    "tapir": lambda: (Tapir(TAPIR_TINY), {"config": TAPIR_TINY}),
    "bootstapir": lambda: (Tapir(BOOTSTAPIR_TINY), {"config": BOOTSTAPIR_TINY}),
}
OTHER = {
    "cotracker3_online": "cotracker3_offline",
    "cotracker3_offline": "cotracker3_online",
    "tapir": "bootstapir",
    "bootstapir": "tapir",
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_check_before_work_accepts_a_good_file_and_refuses_another_models(name, tmp_path):
    """`check_checkpoint` is what setup refuses, without loading: a good file passes, the other variant's
    file is refused with the teacher to use, and the network it checked against holds no memory."""
    net, options = TINY[name]()
    good = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), good)
    teacher = create_teacher(name, good, **options)
    teacher.check_checkpoint()
    assert teacher.model is None  # checked, not loaded
    teacher.setup("cpu")  # and setup agrees
    if name in OTHER:
        other_net, _ = TINY[OTHER[name]]()
        other = tmp_path / f"{OTHER[name]}.pth"
        torch.save(other_net.state_dict(), other)
        with pytest.raises(CheckpointError, match=OTHER[name]):
            create_teacher(name, other, **options).check_checkpoint()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated|damaged"):
        create_teacher(name, truncated, **options).check_checkpoint()


# ---------------------------------------------------------------- faults during a batch


@pytest.mark.parametrize("teacher", ["test_cuda_broken", "test_disk_full"])
def test_a_teacher_that_breaks_leaves_the_videos_pending(teacher, bucket, tmp_path):
    workspace = tmp_path / "ws"
    config = RoundConfig(bucket=str(bucket), workspace=str(workspace), round_id="bad", teachers=[teacher], **SMALL)
    with pytest.raises(BatchesFailed) as caught:
        run_round(config)
    assert caught.value.summary.failed_batches
    rows = latest(workspace)
    assert not [r for r in rows.values() if r["status"] == "labelled"]
    # only the videos' own faults are terminal: the broken file and caption verdicts, never a teacher's error
    failed = {k: r for k, r in rows.items() if r["status"] == "failed"}
    assert all(r["stage"] != "internal" and "CUDA" not in r["reason"] for r in failed.values()), failed
    assert all(r["stage"] == "decode" for r in failed.values()), failed
    # a good round labels them all
    good = RoundConfig(bucket=str(bucket), workspace=str(workspace), round_id="good", teachers=["lk"], **SMALL)
    summary = run_round(good)
    rows = latest(workspace)
    assert summary.labelled >= 1 and summary.labelled == len(good_videos(bucket, rows))
    kept = {k for k, r in rows.items() if r["status"] not in ("filtered",) and k != "broken_00.mp4"}
    assert kept == good_videos(bucket, rows)


def test_a_full_disk_while_encoding_leaves_the_videos_pending(bucket, tmp_path, monkeypatch):
    """ENOSPC in our own stage (the clip encoder) fails the batch; it used to be an `internal` failed row."""
    import pseudotrack.tasks.labelling as labelling

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    workspace = tmp_path / "ws"
    # in-process CPU stages (cpu_workers=0), where the patch reaches the encoder; a worker's own unexpected error
    # fails the batch the same way (tasks/pipeline.py)
    config = RoundConfig(
        bucket=str(bucket), workspace=str(workspace), round_id="full", teachers=["lk"], cpu_workers=0, **SMALL
    )
    with monkeypatch.context() as patch:
        patch.setattr(labelling, "encode_clip_described", no_space)
        with pytest.raises(BatchesFailed):
            run_round(config)
    assert not [r for r in latest(workspace).values() if r["status"] == "labelled" or r.get("stage") == "internal"]
    config = RoundConfig(bucket=str(bucket), workspace=str(workspace), round_id="room", teachers=["lk"], **SMALL)
    assert run_round(config).labelled >= 1


def test_a_video_that_does_not_decode_is_terminally_failed(bucket, tmp_path):
    config = RoundConfig(bucket=str(bucket), workspace=str(tmp_path / "ws"), round_id="r", teachers=["lk"], **SMALL)
    summary = run_round(config)
    row = latest(tmp_path / "ws")["broken_00.mp4"]
    assert row["status"] == "failed" and row["stage"] == "decode" and row["reason"]
    again = run_round(RoundConfig(bucket=str(bucket), workspace=str(tmp_path / "ws"), round_id="r2", **SMALL))
    assert summary.labelled >= 1 and again.planned == 0  # terminal: not tried again


def test_a_batch_is_not_retried_by_prefect():
    """One retry policy, the store's (storage/base.py): a storage fault past it, a full disk or a bug fails the
    batch once, and the round says how to resume, instead of Prefect running the whole batch again."""
    from pseudotrack.flows.label_round import label_batch_task

    assert label_batch_task.retries == 0 and label_batch_task.retry_condition_fn is None
