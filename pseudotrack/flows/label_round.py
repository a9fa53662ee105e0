"""The `label-round` flow: discover -> caption filter -> label batches -> shards -> catalog.

The flow only orchestrates; each stage is a plain function in `tasks/`. It
refuses to start (before touching any video) when the bucket is missing, the
workspace is not writable, or a teacher has no checkpoint. It then recovers
shards committed by an interrupted run, plans only what is new or changed,
and fans label batches out to a bounded pool of workers.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from ..config import RoundConfig
from ..errors import ConfigError
from ..faults import fault_point
from ..storage.catalog import Catalog, fold_quietly
from ..storage.layout import new_round_id
from ..storage.uri import open_workspace
from ..tasks.caption_filter import CaptionRules, filter_captions
from ..tasks.caption_prefetch import CaptionPrefetch
from ..tasks.discover import Discovery, VideoItem, batches, discover_task, pending
from ..tasks.labelling import BatchResult, PlannedVideo, label_batch, resolve_checkpoints
from ..tasks.shards import recover_committed as _recover_committed
from .round_calibration import calibrate_round, read_calibration
from .summary import RoundSummary, artifact_key, next_steps

# on_progress(event, payload): "planned", then "labelled"/"failed"/"filtered" (on quality) per video, then "done"
OnProgress = Callable[[str, dict], None]


@task(name="label-batch", cache_policy=NO_CACHE)  # no retries here: the store's policy is the only one
def label_batch_task(
    videos: list[PlannedVideo],
    config: RoundConfig,
    checkpoints: dict[str, str | None],
    bucket,
    workspace,
    catalog,
    on_video: Callable[[str, dict], None] | None = None,
) -> BatchResult:
    return label_batch(videos, config, checkpoints, bucket, workspace, catalog, on_video)


def _ignore(event: str, payload: dict) -> None:
    return None


def _in_flow() -> bool:
    return FlowRunContext.get() is not None


def recover_committed(workspace, catalog: Catalog) -> int:
    """Catalogue the samples of shards (of any round) whose manifest exists but whose events a crash lost."""
    return _recover_committed(workspace, catalog)


def plan_round(
    config: RoundConfig,
    bucket,
    videos: list[VideoItem],
    all_keys: list[str],
    done: dict[str, str],
    captions: CaptionPrefetch | None = None,
) -> tuple[list[PlannedVideo], list[dict], int]:
    """Walk videos in stable order: (to label, filter/caption rows to record, reused count).

    With `config.videos = N` the walk stops once N videos passed the caption
    filter (labelled earlier or to be labelled now), so a larger round holds a
    smaller one. captions: the caption stage started while the bucket was listed (`start_captions`);
    None starts it here.
    """
    if captions is None:
        with start_captions(config, bucket, sidecars=False) as captions:
            return plan_round(config, bucket, videos, all_keys, done, captions)
    rules = captions.rules
    index = captions.index(all_keys)
    judged = captions.judged()
    todo_all, _ = pending(videos, done)
    todo_keys = {v.key for v in todo_all}
    planned: list[PlannedVideo] = []
    rows: list[dict] = []
    eligible = reused = 0
    limit = config.videos
    # captions are read a chunk at a time, so a small round reads few sidecars; without a limit, big chunks
    chunk = max(256, 2 * limit) if limit else 8192
    for start in range(0, len(videos), chunk):
        part = videos[start : start + chunk]
        verdicts = filter_captions([v.key for v in part], index, rules, config.missing_caption, judged)
        for video, verdict in zip(part, verdicts, strict=True):
            if limit is not None and eligible >= limit:
                return planned, rows, reused
            is_new = video.key in todo_keys
            if video.problem:  # a key that cannot be read safely: a failed row, never a silent skip
                if is_new:
                    rows.append(_row(video, "failed", caption=None, stage="discover", reason=video.problem))
                continue
            if verdict.failure:
                if is_new:
                    rows.append(_row(video, "failed", caption=None, stage="caption", reason=verdict.failure))
                continue
            if not verdict.keep:
                if is_new:
                    rows.append(_row(video, "filtered", caption=verdict.caption, filter_rule=verdict.rule))
                continue
            eligible += 1
            if is_new:
                planned.append(PlannedVideo(video.key, video.size, video.etag, verdict.caption))
            else:
                reused += 1
    return planned, rows, reused


def start_captions(config: RoundConfig, bucket, *, sidecars: bool = True) -> CaptionPrefetch:
    """The round's caption stage, begun now: its manifest is read and judged, and (unless the round is
    capped at N videos, which reads only the captions it walks) its sidecars are read as the listing shows
    them. A rules file that cannot be read stops the round here, before the listing."""
    rules = CaptionRules.load(config.rules)
    return CaptionPrefetch(bucket, config.captions, rules, sidecars=sidecars and config.videos is None)


def _row(video: VideoItem, status: str, **extra) -> dict:
    return {"video_key": video.key, "size": video.size, "etag": video.etag, "status": status, **extra}


def _summary_markdown(summary: RoundSummary) -> str:
    lines = [
        f"# Round `{summary.round_id}`",
        "",
        "| state | videos |",
        "|---|---|",
        f"| labelled | {summary.labelled} |",
        f"| filtered | {summary.filtered} |",
        f"| failed | {summary.failed} |",
        f"| reused from earlier runs | {summary.reused} |",
        "",
        f"{len(summary.shards)} shards, {summary.seconds:.1f} s, "
        f"{(summary.labelled + summary.failed) / max(summary.seconds, 1e-9) * 3600:.0f} videos/hour",
    ]
    for title, counts in (
        ("teacher", summary.teachers),
        ("failure reason", summary.failure_reasons),
        ("filter rule", summary.filter_rules),
        ("left to another run", summary.skipped),
    ):
        if counts:
            lines += ["", f"| {title} | videos |", "|---|---|"]
            lines += [f"| {_md_escape(k)} | {v} |" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    lines += _calibration_markdown(summary.calibration)
    if summary.next_steps:
        lines += ["", "## Next", "", *(f"- {_md_escape(step)}" for step in summary.next_steps)]
    return "\n".join(lines)


def _calibration_markdown(calibration: dict[str, dict]) -> list[str]:
    if not calibration:
        return []
    lines = ["", "| teacher (calibration) | δ_avg | AJ | OA |", "|---|---|---|---|"]
    for name, c in sorted(calibration.items()):
        if c.get("error"):
            lines.append(f"| {_md_escape(name)} | not calibrated: {_md_escape(c['error'])} | | |")
        else:
            cells = [f"{c[k]:.3f}" if c.get(k) is not None else "–" for k in CALIBRATION_FIGURES]
            lines.append(f"| {_md_escape(name)} | {' | '.join(cells)} |")
    return lines


CALIBRATION_FIGURES = ("delta_avg", "average_jaccard", "occlusion_accuracy")


def _md_escape(text: str) -> str:
    return re.sub(r"([|\\`*_<>\[\]])", r"\\\1", text)


def run_round(
    config: RoundConfig, discovery: Discovery | None = None, on_progress: OnProgress | None = None
) -> RoundSummary:
    """The whole round; inside a Prefect flow run, batches become task runs and progress artifacts.

    discovery: the videos to consider, when the caller listed the bucket already (the bucket watcher
    passes only the new and changed ones); None lists the bucket.
    on_progress: called in this process as the round plans and as each video ends (see OnProgress).
    """
    notify = on_progress or _ignore
    started = time.perf_counter()
    bucket, workspace = open_workspace(config)
    checkpoints = resolve_checkpoints(config)
    if config.round_id is None:
        config.round_id = new_round_id()
    round_id = config.round_id
    summary = RoundSummary(round_id)
    workspace.write_bytes(f"runs/{round_id}/config.json", config.to_json().encode("utf-8"))
    catalog = Catalog(workspace)
    log = get_run_logger() if _in_flow() else None

    summary.recovered = recover_committed(workspace, catalog)
    fault_point("round.recovered")
    # the done set and the captions are read while the bucket is listed (seconds each on S3)
    with start_captions(config, bucket, sidecars=discovery is None) as captions, ThreadPoolExecutor(1) as pool:
        done_set = pool.submit(catalog.done, statuses=("labelled", "filtered") if config.retry_failed else None)
        if discovery is None:
            listing = discover_task if _in_flow() else discover_task.fn
            discovery = listing(bucket, on_page=captions.add)
        done = done_set.result()
        fault_point("round.discovered")
        summary.discovered = len(discovery.videos)
        if not discovery.videos and log:
            log.warning("no videos found in %s", config.bucket)
        planned, rows, summary.reused = plan_round(config, bucket, discovery.videos, discovery.all_keys, done, captions)
    if rows:
        catalog.append([dict(r, round_id=round_id, batch_id="plan") for r in rows])
    fault_point("round.planned")
    for row in rows:
        if row["status"] == "filtered":
            summary.filtered += 1
            summary.filter_rules[row["filter_rule"]] = summary.filter_rules.get(row["filter_rule"], 0) + 1
        else:
            summary.failed += 1
            key = f"{row['stage']}: {row['reason']}"
            summary.failure_reasons[key] = summary.failure_reasons.get(key, 0) + 1
    summary.planned = len(planned)
    # written now so the dashboard knows the round's size while it runs, and again at the end
    workspace.write_bytes(f"runs/{round_id}/summary.json", _json(summary.to_dict()))
    notify(
        "planned",
        {"round_id": round_id, "total": len(planned), "filtered": summary.filtered, "reused": summary.reused},
    )
    if log:
        log.info(
            "round %s: %d videos found, %d to label, %d filtered, %d reused",
            round_id,
            summary.discovered,
            len(planned),
            summary.filtered,
            summary.reused,
        )

    progress_id = None
    if _in_flow():
        progress_id = create_progress_artifact(
            0.0, key=artifact_key("label-progress", round_id), description=f"labelling progress of {round_id}"
        )

    work = batches(planned, config.batch_size)
    if config.executor == "pool":
        results, failures = _run_pool(config, work, checkpoints, catalog, progress_id, notify)
        summary.calibration = read_calibration(workspace, round_id)  # the first batch on a worker wrote it
    else:
        # only when there is something to label: a watcher's tick with nothing new costs nothing
        summary.calibration = calibrate_round(config, checkpoints, workspace) if planned else {}
        if summary.calibration:
            workspace.write_bytes(f"runs/{round_id}/summary.json", _json(summary.to_dict()))
        results, failures = _run_local(config, work, checkpoints, bucket, workspace, catalog, progress_id, notify)
    for result in results:
        summary.labelled += result.labelled
        summary.failed += result.failed
        summary.filtered += result.filtered
        summary.filter_rules = dict(Counter(summary.filter_rules) + Counter(result.filter_rules))
        summary.shards += result.shards
        summary.teachers = dict(Counter(summary.teachers) + Counter(result.teachers))
        summary.failure_reasons = dict(Counter(summary.failure_reasons) + Counter(result.reasons))
        for stage, seconds in result.stage_seconds.items():
            summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
        summary.skipped = dict(Counter(summary.skipped) + Counter(result.skipped))
    summary.failed_batches = failures
    summary.next_steps = next_steps(summary)
    summary.seconds = time.perf_counter() - started
    fault_point("round.summary")
    workspace.write_bytes(f"runs/{round_id}/summary.json", _json(summary.to_dict()))
    if _in_flow():
        if progress_id:
            update_progress_artifact(progress_id, 100.0)
        create_markdown_artifact(
            _summary_markdown(summary),
            key=artifact_key("label-summary", round_id),
            description=f"summary of labelling round {round_id}",
        )
        from .events import emit_round_finished

        emit_round_finished(summary, workspace.uri())  # starts training through train-student's trigger
    notify("done", summary.to_dict())
    if failures:
        raise BatchesFailed(summary)
    return summary


class BatchesFailed(RuntimeError):
    """Some batches failed past their retries; their videos stay unrecorded and a re-run labels them."""

    def __init__(self, summary: RoundSummary):
        self.summary = summary
        details = "; ".join(f"{b['batch_id']}: {b['error']}" for b in summary.failed_batches[:5])
        super().__init__(
            f"round {summary.round_id}: {len(summary.failed_batches)} batch(es) failed ({details}). "
            f"Everything else is committed; run the round again with --round-id {summary.round_id} to resume."
        )


def _run_local(config, work, checkpoints, bucket, workspace, catalog, progress_id, notify):
    """Batches in this process: task runs on a bounded thread pool inside a flow, plain calls outside."""
    results: list[BatchResult] = []
    failures: list[dict] = []
    args = (config, checkpoints, bucket, workspace, catalog, notify)
    if not _in_flow():
        for batch in work:
            try:
                results.append(label_batch_task.fn(batch, *args))
            except Exception as exc:
                failures.append(_batch_failure(config, batch, exc))
            fold_quietly(catalog)
        return results, failures
    futures = {label_batch_task.submit(batch, *args): batch for batch in work}
    for done_count, future in enumerate(as_completed(list(futures)), start=1):
        try:
            results.append(future.result())
        except Exception as exc:
            failures.append(_batch_failure(config, futures[future], exc))
        fold_quietly(catalog)  # one file per batch: folded as the round goes, so `status` stays fast
        if progress_id:
            update_progress_artifact(progress_id, 100.0 * done_count / len(futures))
    return results, failures


def _batch_failure(config: RoundConfig, batch: list[PlannedVideo], exc: BaseException) -> dict:
    from ..tasks.labelling import batch_id_for

    return {
        "batch_id": batch_id_for(config.round_id or "", [v.key for v in batch]),
        "videos": len(batch),
        "error": f"{type(exc).__name__}: {exc}",
    }


def _run_pool(config, work, checkpoints, catalog, progress_id, notify):
    """Each batch as a flow run of the `label-batch` deployment (flows/label_batch.py: idempotent, resumable)."""
    from .label_batch import run_batches_on_pool

    def on_progress(fraction: float) -> None:
        if progress_id:
            update_progress_artifact(progress_id, 100.0 * fraction)

    return run_batches_on_pool(config, work, checkpoints, catalog, notify, on_progress)


def _json(obj) -> bytes:
    import json

    return json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")


@flow(name="label-round", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def label_round(config: RoundConfig, on_progress: OnProgress | None = None) -> dict:
    """Label a bucket of videos into WebDataset shards with frozen teachers (a Prefect flow run).

    on_progress: an in-process callback (not stored with the run; a deployment run leaves it unset).
    """
    return run_round(config, on_progress=on_progress).to_dict()


def run_label_round_flow(config: RoundConfig, on_progress: OnProgress | None = None) -> dict:
    """Run `label-round` as a Prefect flow run with `config.workers` batches at a time."""
    runner = ThreadPoolTaskRunner(max_workers=max(1, config.workers))
    return label_round.with_options(task_runner=runner)(config, on_progress)


__all__ = [
    "ConfigError",
    "RoundConfig",
    "RoundSummary",
    "OnProgress",
    "label_round",
    "run_label_round_flow",
    "run_round",
]
