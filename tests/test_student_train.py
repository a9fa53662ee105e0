"""Student training: schedule, frozen head, exact resume after a stop, export layout, and end to end on `lk` labels."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pseudotrack.errors import ConfigError
from pseudotrack.student.model import FROZEN_PREFIX, build_student, export_student, read_export_meta
from pseudotrack.student.train import (
    TrainConfig,
    checkpoint_paths,
    cosine_factor,
    default_steps,
    load_training_checkpoint,
    run_training,
)

H, W, T = 64, 96, 12  # the tiny CoTracker3's resolution; labelled clips of 12 frames


def _write_exact_shards(workspace: str, scenes: list[int], per_shard: int = 3, batch: str = "exact") -> None:
    """Shards whose labels are a synthetic scene's exact tracks, under a teacher named 'exact'."""
    from pseudotrack.storage.uri import open_store
    from pseudotrack.synthetic import render_scene
    from pseudotrack.tasks.clip_codec import encode_clip
    from pseudotrack.tasks.shards import Sample, ShardSink
    from pseudotrack.teachers.base import TeacherOutput

    store = open_store(workspace)
    sink = ShardSink(store, "r1", batch, max_samples=per_shard)
    for seed in scenes:
        scene = render_scene(seed, num_frames=T, height=H, width=W, num_objects=2, num_points=24)
        queries = np.concatenate([np.zeros((24, 1)), scene.tracks[:, 0]], axis=1).astype(np.float32)
        label = TeacherOutput(scene.tracks.transpose(1, 0, 2), ~scene.occluded.T, np.ones((T, 24), np.float16))
        meta = {"teachers": ["exact"], "tracks_occluded": {"exact": True}}
        sink.add(Sample(f"scene{seed}", encode_clip(scene.frames, 24.0), queries, {"exact": label}, meta), {})
    sink.close()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared 2-core test machine, two OpenMP threads contend and run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("student-ws"))
    _write_exact_shards(path, list(range(6)))
    return path


def _config(workspace: str, output: Path, **overrides) -> TrainConfig:
    values = dict(
        workspace=workspace,
        output=str(output),
        model_size="tiny",
        steps=2,
        batch_size=2,
        micro_batch_size=1,
        num_frames=8,
        num_tracks=8,
        iters=2,
        workers=0,
        checkpoint_every=2,
        log_every=1,
        lr=1e-3,
    )
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------- plain pieces


def test_cosine_decay_starts_at_the_peak_without_warmup_and_ends_at_zero() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_default_steps_are_one_per_video_at_batch_32() -> None:
    assert default_steps(15000, 32) == 15000
    assert default_steps(100, 8) == 400  # same number of clips seen at a smaller batch


def test_config_refuses_what_cannot_run() -> None:
    with pytest.raises(ConfigError, match="variant"):
        TrainConfig(workspace="w", output="o", variant="sideways")
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        TrainConfig(workspace="w", output="o", batch_size=3, micro_batch_size=2)
    recipe = TrainConfig(workspace="w", output="o")
    assert (recipe.lr, recipe.batch_size, recipe.huber_delta, recipe.gamma) == (5e-5, 32, 6.0, 0.8)
    assert TrainConfig.from_dict(recipe.to_dict()) == recipe


def test_offline_clips_are_trimmed_between_half_and_full_length() -> None:
    spec = TrainConfig(workspace="w", output="o", variant="offline", num_frames=64).clip_spec(384, 512)
    assert spec.trim_range() == (32, 64)
    assert TrainConfig(workspace="w", output="o").clip_spec(384, 512).trim_range() == (64, 64)


def test_the_visibility_confidence_head_is_frozen() -> None:
    student = build_student("online", "tiny")
    frozen = student.frozen_parameters()
    assert set(frozen) == {FROZEN_PREFIX + "weight", FROZEN_PREFIX + "bias"}
    assert not any(p.requires_grad for p in frozen.values())
    assert all(p.requires_grad for n, p in student.net.named_parameters() if n not in frozen)


# --------------------------------------------------------------------------- the loop


def test_stop_and_resume_gives_the_same_weights_as_an_uninterrupted_run(workspace: str, tmp_path: Path) -> None:
    straight = run_training(_config(workspace, tmp_path / "straight"))  # 2 steps of 2 accumulated clips
    assert straight.steps == 2 and straight.resumed_from == 0

    import shutil

    copy = str(tmp_path / "ws")
    shutil.copytree(workspace, copy)
    interrupted = _config(copy, tmp_path / "resumed")
    first = run_training(interrupted, stop_at=1)
    assert first.steps == 1 and first.export_path == ""  # stopped: nothing exported yet
    _write_exact_shards(copy, list(range(40, 49)), batch="late")  # a round commits more shards meanwhile
    second = run_training(interrupted)  # trains on the shard list fixed at its first start
    assert len(json.loads((tmp_path / "resumed" / "shards.json").read_text())) == 2
    assert second.resumed_from == 1 and second.steps == 2

    a = torch.load(straight.export_path, weights_only=True)
    b = torch.load(second.export_path, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    torch.manual_seed(0)  # run_training seeds the initial weights with config.seed
    start = build_student("online", "tiny")
    moved = [k for k in a if not k.startswith(FROZEN_PREFIX) and not torch.equal(a[k], start.net.state_dict()[k])]
    assert moved, "training changed nothing"
    for name, value in start.frozen_parameters().items():
        assert torch.equal(a[name], value), f"frozen {name} changed"

    ckpt = load_training_checkpoint(checkpoint_paths(tmp_path / "resumed")[0])  # weights_only=True inside
    trainable = sum(1 for n, p in start.net.named_parameters() if not n.startswith(FROZEN_PREFIX))
    assert len(ckpt["optimizer"]["state"]) == trainable  # the frozen head is not in the optimiser
    assert ckpt["step"] == 2 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["clips_per_second"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(1e-3 * cosine_factor(1, 2))


def _tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_curves_match_the_metrics_log_and_show_each_step_once_after_a_kill(
    workspace: str, tmp_path: Path
) -> None:
    output = tmp_path / "tb"
    cfg = _config(workspace, output, steps=4, batch_size=1, checkpoint_every=2)
    run_training(cfg, stop_at=3)  # checkpoints at steps 2 and 3, metrics logged for 1..3
    newest = checkpoint_paths(output)[0]
    assert load_training_checkpoint(newest)["step"] == 3
    newest.unlink()  # as if killed after logging step 3 but before its checkpoint landed
    result = run_training(cfg)
    assert result.resumed_from == 2 and result.steps == 4

    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in ("loss", "lr", "grad_norm", "clips_per_second"):
        scalars = _tensorboard_scalars(output / "tensorboard", f"train/{name}")
        assert [step for step, _ in scalars] == [1, 2, 3, 4], name
        assert [v for _, v in scalars] == pytest.approx([r[name] for r in rows], rel=1e-6), name


def test_resume_with_loader_workers_is_exact(workspace: str, tmp_path: Path) -> None:
    straight = run_training(_config(workspace, tmp_path / "a", workers=2, steps=3, batch_size=1))
    cfg = _config(workspace, tmp_path / "b", workers=2, steps=3, batch_size=1)
    run_training(cfg, stop_at=1)
    resumed = run_training(cfg)
    a = torch.load(straight.export_path, weights_only=True)
    b = torch.load(resumed.export_path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_configuration(workspace: str, tmp_path: Path) -> None:
    run_training(_config(workspace, tmp_path / "run", steps=2, batch_size=1), stop_at=1)
    with pytest.raises(ConfigError, match="num_tracks"):
        run_training(_config(workspace, tmp_path / "run", steps=2, batch_size=1, num_tracks=6))


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_weights(workspace: str, tmp_path: Path) -> None:
    """SIGKILL (no chance to save) after a periodic checkpoint; the restarted run ends where a straight one does."""
    import signal
    import subprocess
    import sys
    import time

    straight = run_training(_config(workspace, tmp_path / "straight", steps=6, batch_size=1))
    killed = _config(workspace, tmp_path / "killed", steps=6, batch_size=1, checkpoint_every=2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(killed.to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pseudotrack.student.train", str(path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not checkpoint_paths(tmp_path / "killed") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoint_paths(tmp_path / "killed")
    assert saved, proc.stderr.read().decode()[-2000:] if proc.stderr else "no checkpoint before the kill"
    assert not (tmp_path / "killed" / "student.pth").exists()  # killed before the end
    resumed = run_training(killed)
    assert 2 <= resumed.resumed_from < 6 and resumed.steps == 6
    a = torch.load(straight.export_path, weights_only=True)
    b = torch.load(resumed.export_path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- export


def test_export_of_the_published_architecture_has_exactly_the_official_keys(shared_dir: Path, tmp_path: Path) -> None:
    manifest_path = shared_dir / "reference" / "cotracker3_online" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())["state_dict"]
    path = export_student(build_student("online", "full"), tmp_path / "student.pth")
    state = torch.load(path, weights_only=True)
    assert set(state) == set(manifest)
    assert all(list(state[k].shape) == manifest[k]["shape"] for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict, nothing else


def test_exported_student_loads_as_the_next_rounds_teacher(tmp_path: Path) -> None:
    from pseudotrack.synthetic import render_scene
    from pseudotrack.teachers.base import create_teacher

    student = build_student("online", "tiny")
    path = export_student(student, tmp_path / "student.pth", {"step": 7})
    meta = read_export_meta(path)
    assert meta is not None and meta["step"] == 7 and meta["model"]["variant"] == "online"
    teacher = create_teacher("cotracker3_online", checkpoint=path)
    teacher.setup("cpu")
    scene = render_scene(3, num_frames=10, height=H, width=W, num_points=6)
    queries = np.concatenate([np.zeros((6, 1)), scene.tracks[:, 0]], axis=1).astype(np.float32)
    labels = teacher.predict(scene.frames, queries)
    assert labels.tracks.shape == (10, 6, 2) and np.isfinite(labels.tracks).all()
    reloaded = build_student("online", checkpoint=str(path))  # and as a student again, same weights
    assert all(
        torch.equal(a, b)
        for a, b in zip(reloaded.net.state_dict().values(), student.net.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="online student"):
        build_student("offline", checkpoint=str(path))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_student_learns_from_lk_labels_of_generated_clips(tmp_path: Path) -> None:
    """Label generated clips with `lk`, train a tiny student a few hundred steps, evaluate on held-out scenes.

    The tiny architecture has no published weights, so the starting checkpoint is a random student.
    CoTracker3's own init keeps the update head near zero (a student that does not move its points);
    we put that head back at PyTorch's default init, a start whose tracks wander, so that a few
    hundred CPU steps have something measurable to fix. The held-out scenes (seeds 5000+) are
    never labelled.
    """
    from pseudotrack.config import RoundConfig
    from pseudotrack.demo import write_demo_bucket
    from pseudotrack.flows.label_round import run_round
    from pseudotrack.flows.train_student import train_student
    from pseudotrack.student.benchmarks import synthetic_videos

    write_demo_bucket(tmp_path / "bucket", videos=48, frames=24, height=H, width=W, broken=0)
    summary = run_round(
        RoundConfig(
            bucket=str(tmp_path / "bucket"),
            workspace=str(tmp_path / "ws"),
            teachers=["lk"],
            height=H,
            width=W,
            num_frames=24,
            num_queries=24,
            max_stride=1,
            min_frames=8,
        )
    )
    assert summary.labelled >= 24 and summary.teachers == {"lk": summary.labelled}

    torch.manual_seed(0)
    start = build_student("online", "tiny")
    start.net.updateformer.flow_head.reset_parameters()
    start_path = export_student(start, tmp_path / "start.pth")
    head = {k: v.clone() for k, v in start.frozen_parameters().items()}

    config = TrainConfig(
        workspace=str(tmp_path / "ws"),
        output=str(tmp_path / "out"),
        init_checkpoint=str(start_path),
        model_size="tiny",
        steps=200,
        batch_size=1,
        num_frames=8,
        num_tracks=24,
        iters=3,
        lr=1e-3,
        workers=0,
        checkpoint_every=100,
        log_every=10,
    )
    held_out = list(synthetic_videos(6, seed=5000, num_frames=16, height=H, width=W, num_points=24))
    report = train_student(
        config,
        evaluate_on="synthetic",
        eval_clips=held_out,
        eval_options={"resize_to": None, "one_query_at_a_time": False},
    )

    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    trained = torch.load(report["train"]["export_path"], weights_only=True)
    assert all(torch.equal(trained[k], v) for k, v in head.items()), "the frozen head moved"
    before = report["evaluation"]["initial"]["metrics"]["average_pts_within_thresh"]
    after = report["evaluation"]["trained"]["metrics"]["average_pts_within_thresh"]
    assert after > before + 0.05, (before, after)
    saved = json.loads(Path(report["report_path"]).read_text())
    assert saved["evaluation"]["trained"]["metrics"]["average_pts_within_thresh"] == pytest.approx(after)
    assert (tmp_path / "ws" / "reports" / "student-out.json").is_file()


@pytest.mark.slow
def test_two_rank_ddp_run_under_torchrun(workspace: str, tmp_path: Path) -> None:
    """`torchrun` with two CPU ranks (gloo): both ranks step together, rank 0 exports, each keeps its stream."""
    import signal
    import subprocess
    import sys

    config = _config(workspace, tmp_path / "ddp", steps=2, batch_size=2, checkpoint_every=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pseudotrack.student.train",
        str(path),
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: torchrun and its two ranks
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout[stdout.index("{") :])["steps"] == 2
    ckpt = load_training_checkpoint(checkpoint_paths(tmp_path / "ddp")[0])
    assert ckpt["world_size"] == 2 and len(ckpt["loader"]) == 2 and len(ckpt["rng"]) == 2
    assert all(state["batches"] == 2 for state in ckpt["loader"])  # one clip per rank per step
    assert torch.load(tmp_path / "ddp" / "student.pth", weights_only=True).keys() == ckpt["model"].keys()


# --------------------------------------------------------------------------- command line


def _cli():
    import typer

    from pseudotrack.cli.student import eval_command, train_command

    app = typer.Typer()
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    return app


def test_eval_command_prints_a_metrics_table_and_saves_a_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    path = export_student(build_student("online", "tiny"), tmp_path / "student.pth")
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(
        _cli(),
        ["eval", "--checkpoint", str(path), "--videos", "1", "--joint", "--native-size", "--report", str(report)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "average_pts_within_thresh" in result.stdout and "occlusion_accuracy" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["videos"] == 1 and saved["variant"] == "online" and saved["info"]["protocol"] == "all queries at once"
    assert 0.0 <= saved["metrics"]["average_pts_within_thresh"] <= 1.0
    missing = CliRunner().invoke(_cli(), ["eval", "--checkpoint", str(tmp_path / "nope.pth")])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())


@pytest.mark.slow
def test_train_command_runs_the_train_student_flow(prefect_server: str, workspace: str, tmp_path: Path) -> None:
    """In a subprocess, as a user runs it: Prefect's log handlers and CliRunner's captured streams do not mix."""
    import subprocess
    import sys

    program = (
        "import typer; from pseudotrack.cli.student import train_command; "
        "app = typer.Typer(); app.command('train')(train_command); app.command('other')(lambda: None); app()"
    )
    args = [
        "train",
        "--workspace",
        workspace,
        "--output",
        str(tmp_path / "run"),
        "--model-size",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--frames",
        "8",
        "--tracks",
        "8",
        "--iters",
        "2",
        "--workers",
        "0",
        "--lr",
        "1e-3",
        "--evaluate-on",
        "none",
    ]
    done = subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one logged window" in done.stdout  # two steps log one row: its loss is their mean, not a first and a last
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["train"]["steps"] == 2 and Path(report["train"]["export_path"]).is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            "train",
            "--workspace",
            workspace,
            "--output",
            str(tmp_path / "x"),
            "--variant",
            "sideways",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "variant" in bad.stderr
