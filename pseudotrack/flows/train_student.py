"""The `train-student` and `evaluate-student` flows, thin over `student.train` and `student.evaluate`.

Both are plain functions first (`train_student`, `evaluate_student`) so the CLI
and tests run them without a Prefect server; the flows add artifacts: a
progress bar and a loss/lr/throughput table while training, and a metrics
table at the end. Reports are JSON files in the run's output folder and, when
the workspace is writable, under `reports/` in the workspace.

Under `torchrun` every rank calls `train_student`; only rank 0 evaluates and
writes reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext

from ..student.train import TrainConfig, TrainResult, run_training
from .summary import artifact_key

REPORT_NAME = "report.json"

# on_progress(event, payload): "train" with each training log row (step, total_steps, loss, lr, clips_per_second),
# then "eval" with {"name": "initial" | "trained", "done", "total"} after each evaluated video
OnProgress = Callable[[str, dict], None]


def _in_flow() -> bool:
    return FlowRunContext.get() is not None


# --------------------------------------------------------------------------- evaluation


def benchmark_videos(
    benchmark: str,
    videos: int = 8,
    seed: int = 1000,
    num_frames: int = 24,
    size: tuple[int, int] = (256, 256),
    num_points: int = 64,
) -> list:
    """Benchmark clips by name: 'synthetic' (generated, exact ground truth) or a TAP-Vid pickle/folder path.

    Synthetic seeds start at 1000 so held-out clips never coincide with the
    generated videos a test or demo round is labelled on (those use small seeds).
    """
    from ..student import benchmarks

    if benchmark == "synthetic":
        return list(
            benchmarks.synthetic_videos(
                videos, seed=seed, num_frames=num_frames, height=size[0], width=size[1], num_points=num_points
            )
        )
    return list(benchmarks.read_tapvid(benchmark, limit=videos))


def evaluate_student(
    checkpoint: str,
    benchmark: str = "synthetic",
    query_mode: str = "first",
    variant: str | None = None,
    videos: int = 8,
    device: str = "auto",
    output: str | None = None,
    clips: list | None = None,
    resize_to: tuple[int, int] | None = (256, 256),
    one_query_at_a_time: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """TAP-Vid metrics (AJ, δ_avg, OA) of a student export or an official CoTracker3 file.

    variant: online/offline; None takes it from the export's sidecar (online for official files).
    clips: BenchmarkVideo list to use instead of reading `benchmark` (the name is still reported).
    resize_to / one_query_at_a_time: the evaluator's protocol (TAP-Vid: 256x256, one query per call);
    cheaper settings are for smoke tests and must be reported as such.
    """
    import torch

    from ..student.evaluate import evaluate, with_backward_pass
    from ..student.model import build_student, read_export_meta

    started = time.perf_counter()
    meta = read_export_meta(checkpoint)
    variant = variant or (meta["model"]["variant"] if meta else "online")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    student = build_student(variant, checkpoint=checkpoint).to(device).eval()
    clips = clips if clips is not None else benchmark_videos(benchmark, videos)
    predict = student.predict
    if variant == "online" and query_mode == "strided":
        predict = with_backward_pass(predict)  # an online tracker only looks forward (as the authors evaluate)
    result = evaluate(
        predict, clips, query_mode, resize_to=resize_to, one_query_at_a_time=one_query_at_a_time, progress=progress
    )
    report = {
        "checkpoint": str(checkpoint),
        "variant": variant,
        "benchmark": benchmark,
        "query_mode": query_mode,
        "videos": len(clips),
        "metrics": {k: float(v) for k, v in result.items() if k not in ("per_video", "info")},
        "per_video": result["per_video"],
        "info": result["info"],
        "seconds": time.perf_counter() - started,
    }
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        report["report_path"] = str(path)
    if _in_flow():
        create_markdown_artifact(
            metrics_markdown(report),
            key=artifact_key("student-eval", Path(benchmark).stem),
            description=f"metrics of {checkpoint}",
        )
    return report


def metrics_markdown(report: dict) -> str:
    rows = [f"| {k} | {v:.4f} |" for k, v in report["metrics"].items()]
    return "\n".join(
        [
            f"# {report['benchmark']} ({report['query_mode']} queries, {report['videos']} videos)",
            "",
            "| metric | value |",
            "|---|---|",
            *rows,
        ]
    )


# --------------------------------------------------------------------------- training


def train_student(
    config: TrainConfig,
    evaluate_on: str | None = "synthetic",
    eval_videos: int = 8,
    on_progress: OnProgress | None = None,
    eval_clips: list | None = None,
    eval_options: dict | None = None,
) -> dict:
    """Train, export, then evaluate the start and the trained student on the same clips; returns the report.

    eval_clips: BenchmarkVideo list to evaluate on instead of reading `evaluate_on`;
    eval_options: extra `evaluate_student` arguments (query_mode, resize_to, one_query_at_a_time).
    """
    from ..student.train import init_distributed

    progress_id = None
    if _in_flow():
        progress_id = create_progress_artifact(
            0.0,
            key=artifact_key("student-progress", Path(config.output).name),
            description=f"training progress of {config.output}",
        )
    history: list[dict] = []

    def log_row(row: dict) -> None:
        history.append(row)
        if progress_id is not None:
            update_progress_artifact(progress_id, 100.0 * row["step"] / row["total_steps"])
        if on_progress is not None:
            on_progress("train", row)

    def eval_progress(name: str) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        return lambda done, total: on_progress("eval", {"name": name, "done": done, "total": total})

    result: TrainResult = run_training(config, on_log=log_row)
    if not init_distributed(config.device).is_main:
        return result.to_dict()
    report: dict = {"train": {k: v for k, v in result.to_dict().items() if k != "history"}, "config": config.to_dict()}
    report["train"]["loss_windows"] = loss_windows(result.history, result.resumed_from)
    if evaluate_on and result.export_path:
        clips = eval_clips if eval_clips is not None else benchmark_videos(evaluate_on, eval_videos)
        options = dict(variant=config.variant, device=config.device, clips=clips, **(eval_options or {}))
        report["evaluation"] = {}
        if config.init_checkpoint:  # the same clips and protocol, so the two columns compare
            report["evaluation"]["initial"] = evaluate_student(
                config.init_checkpoint, evaluate_on, **options, progress=eval_progress("initial")
            )
        report["evaluation"]["trained"] = evaluate_student(
            result.export_path, evaluate_on, **options, progress=eval_progress("trained")
        )
    path = Path(config.output) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    report["report_path"] = str(path)
    _publish_report(config, report)
    if _in_flow():
        create_markdown_artifact(
            training_markdown(report, history),
            key=artifact_key("student-report", Path(config.output).name),
            description="student training summary",
        )
    return report


def loss_windows(history: list[dict], resumed_from: int = 0) -> list[dict]:
    """The first and last logged loss with the steps each averages ({"first_step", "last_step", "loss"}).

    A logged loss is the mean over the steps since the previous row, so a short run logs one row whose
    loss is both "first" and "last": then one window is returned, and the report says it is one.
    """
    if not history:
        return []
    starts = [resumed_from + 1] + [row["step"] + 1 for row in history[:-1]]
    windows = [{"first_step": starts[i], "last_step": history[i]["step"], "loss": history[i]["loss"]} for i in (0, -1)]
    return windows[:1] if len(history) == 1 else windows


def _publish_report(config: TrainConfig, report: dict) -> None:
    """Copy the report under `reports/` of the workspace, when it can be written (best effort)."""
    from ..storage.uri import open_store

    try:
        store = open_store(config.workspace)
        key = f"reports/student-{Path(config.output).name}.json"
        store.write_bytes(key, json.dumps(report, indent=2, sort_keys=True, default=str).encode("utf-8"))
        report["workspace_report"] = store.uri(key)
    except Exception as exc:  # the local report exists; a read-only workspace must not fail the run
        report["workspace_report_error"] = f"{type(exc).__name__}: {exc}"


def training_markdown(report: dict, history: list[dict]) -> str:
    train = report["train"]
    windows = train.get("loss_windows") or []
    if len(windows) == 1:
        w = windows[0]
        loss = f"loss {w['loss']:.3f} (one logged window, steps {w['first_step']}-{w['last_step']})"
    else:
        loss = f"loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}"
    lines = [
        f"# Student training: {train['steps']} steps",
        "",
        f"{loss}, {train['clips_per_second']:.2f} clips/s, {train['seconds']:.0f} s",
        "",
        "| step | loss | lr | clips/s |",
        "|---|---|---|---|",
    ]
    stride = max(1, len(history) // 20)
    lines += [
        f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} | {r['clips_per_second']:.2f} |" for r in history[::stride]
    ]
    for name, ev in report.get("evaluation", {}).items():
        lines += ["", f"## {name}: {ev['benchmark']}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in ev["metrics"].items() if isinstance(v, float)]
    return "\n".join(lines)


@flow(name="train-student", log_prints=True)
def train_student_flow(
    config: TrainConfig,
    evaluate_on: str | None = "synthetic",
    eval_videos: int = 8,
    on_progress: OnProgress | None = None,
) -> dict:
    """Fine-tune a CoTracker3 student on committed pseudo-label shards, then evaluate it.

    on_progress: an in-process callback (OnProgress; not stored with the run, unset in a deployment run).
    """
    return train_student(config, evaluate_on, eval_videos, on_progress)


@flow(name="evaluate-student", log_prints=True)
def evaluate_student_flow(
    checkpoint: str,
    benchmark: str = "synthetic",
    query_mode: str = "first",
    variant: str | None = None,
    videos: int = 8,
    output: str | None = None,
) -> dict:
    """TAP-Vid metrics of a student checkpoint on a benchmark."""
    return evaluate_student(checkpoint, benchmark, query_mode, variant, videos, output=output)
