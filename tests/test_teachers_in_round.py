"""Each neural teacher, loaded from an official-layout checkpoint file, labels a real clip end to end.

The weights are the reference rule's (../shared/reference/weights_rule.py), saved under the official
file name in a checkpoints directory, exactly as a user's download would sit there.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from reference import REFERENCE, weights_rule

from pseudotrack.config import RoundConfig
from pseudotrack.flows.label_round import run_round
from pseudotrack.render import shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.shards import committed_shards, read_shard
from pseudotrack.teachers.base import sha256_file, teacher_spec

TEACHERS = ["cotracker3_online", "cotracker3_offline", "cotracker2", "tapir", "bootstapir"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_labels_a_real_clip(name, shared_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    state = weights_rule().make_state_dict(REFERENCE / name)
    path = checkpoints / teacher_spec(name).checkpoint_names[0]
    torch.save(state, path)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    shutil.copyfile(shared_dir / "videos" / "cat.mp4", bucket / "cat.mp4")
    (bucket / "cat.txt").write_text("A long-haired cat licks its nose.")
    config = RoundConfig(
        bucket=str(bucket),
        workspace=str(tmp_path / "ws"),
        round_id="teach",
        teachers=[name],
        checkpoints=str(checkpoints),
        num_frames=12,
        min_frames=8,
        height=96,
        width=128,
        num_queries=24,
        num_keyframes=4,
        seed=1,
        calibration_scenes=1 if name == "tapir" else 0,  # one neural teacher's calibration is enough here
    )
    summary = run_round(config)
    assert summary.labelled == 1, summary
    store = open_store(str(tmp_path / "ws"))
    (manifest,) = committed_shards(store, "teach")
    (sample,) = list(read_shard(shard_url(store, manifest["shard"])))
    labels = sample["labels"][name]
    t = sample["meta"]["num_frames"]
    assert labels["tracks"].shape == (t, 24, 2) and np.isfinite(labels["tracks"]).all()
    assert labels["visibility"].dtype == bool and labels["confidence"].dtype == np.float16
    digest = sha256_file(path)
    assert sample["meta"]["teacher_sha256"] == [digest]
    row = Catalog(store).latest().to_pylist()[0]
    assert row["teachers"] == [name] and row["teacher_sha256"] == [digest]
    assert json.loads(store.read_bytes("runs/teach/config.json"))["teachers"] == [name]
    if name == "tapir":  # a neural teacher is calibrated on the round's device like lk
        assert summary.calibration[name]["scenes"] == 1 and summary.calibration[name]["delta_avg"] is not None
    else:
        assert summary.calibration == {}
