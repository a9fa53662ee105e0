"""The pipelined label batch with its teacher on CUDA (pinned host memory, non-blocking copies).

These call `tasks.labelling.label_batch` directly, the plain function a round's
batch task runs, so they need the package's data dependencies and no
orchestrator: a GPU host can run them as it is.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference import REFERENCE, weights_rule  # noqa: E402

from pseudotrack.config import RoundConfig  # noqa: E402
from pseudotrack.storage.catalog import Catalog  # noqa: E402
from pseudotrack.storage.uri import open_workspace  # noqa: E402
from pseudotrack.tasks.labelling import label_batch, resolve_checkpoints  # noqa: E402
from pseudotrack.tasks.prepare import PlannedVideo  # noqa: E402
from pseudotrack.teachers.base import teacher_spec  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHARED = Path(os.environ.get("PSEUDOTRACK_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
SMALL = dict(height=96, width=128, num_frames=16, min_frames=8, num_queries=32, num_keyframes=2, seed=5)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda-bucket")
    for path in sorted((SHARED / "videos").glob("*.mp4")):
        for copy in ("a", "b"):
            shutil.copy(path, root / f"{path.stem}_{copy}.mp4")
    return root


def batch(bucket: Path, workspace: Path, **overrides):
    config = RoundConfig(
        bucket=str(bucket), workspace=str(workspace), round_id="r", missing_caption="keep", **{**SMALL, **overrides}
    )
    store, ws = open_workspace(config)
    videos = [PlannedVideo(o.key, o.size, o.etag) for o in store.list(suffixes=(".mp4",))]
    result = label_batch(videos, config, resolve_checkpoints(config), store, ws, Catalog(ws))
    assert result.labelled == len(videos) and result.failed == 0, result
    return result


def arrays(workspace: Path, suffix: str) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted((workspace / "shards").rglob("*.tar")):
        with tarfile.open(tar) as archive:
            for info in archive.getmembers():
                if info.name.endswith(suffix):
                    out[info.name] = np.load(io.BytesIO(archive.extractfile(info).read()))
    return out


def test_pipelined_lk_on_cuda_matches_in_process(bucket, tmp_path):
    batch(bucket, tmp_path / "a", teachers=["lk"], device="cuda", cpu_workers=0)
    batch(bucket, tmp_path / "b", teachers=["lk"], device="cuda", cpu_workers=2)
    a, b = arrays(tmp_path / "a", ".npy"), arrays(tmp_path / "b", ".npy")
    assert a.keys() == b.keys() and a
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_pipelined_neural_teacher_on_cuda(bucket, tmp_path):
    """cotracker3_offline (reference-rule weights, bf16) in a pipelined batch: the same clips, one per forward,
    give the same tracks as the in-process batch, and the batch records the teacher's busy share."""
    name = "cotracker3_offline"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(weights_rule().make_state_dict(REFERENCE / name), folder / teacher_spec(name).checkpoint_names[0])
    common = dict(teachers=[name], device="cuda", checkpoints=str(folder), teacher_batch=1)
    batch(bucket, tmp_path / "a", cpu_workers=0, **common)
    result = batch(bucket, tmp_path / "b", cpu_workers=2, **common)
    assert 0.0 < result.teacher_busy <= 1.0 and result.clips_per_s > 0
    a, b = arrays(tmp_path / "a", f"{name}.tracks.npy"), arrays(tmp_path / "b", f"{name}.tracks.npy")
    assert a.keys() == b.keys() and a
    gap = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert gap <= 0.01, f"tracks moved by {gap} px between in-process and pipelined batches"
