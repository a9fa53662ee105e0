"""The `label-batch` flow, and the driver that fans a round's batches out to it on the `gpu` pool.

`pseudotrack round --executor pool` sends each batch here as a flow run of the
`label-batch` deployment, so throughput grows with the number of GPU workers
and the pool's (and the deployment's) concurrency limit caps simultaneous GPU
batches. The worker opens the stores itself (only URIs travel in the
parameters, never clients or credentials), writes its shards and catalog
events directly, and leaves its tally in `runs/<round>/batches/<batch>.json`
for the round to sum up, since flow results are not persisted.

Batches go out through Prefect's public `run_deployment` (with `timeout=0`,
so the round sends them all and then polls their states with the client: a
failed child run does not fail the round's flow run, so the round reads each
child's final state itself). Re-running a round never duplicates a batch run:
each run is named and keyed `<round>-<batch>-<attempt>`, so a resend of the
same attempt gets the run the server already has. A run still in flight from
an earlier attempt is waited for, not sent again; a finished one whose videos
are still unrecorded (it failed, crashed or was cancelled) is followed by a
new run, the next attempt, with this attempt's parameters: runs are never
forced back into a runnable state. Runs of the round under other batch ids
(an earlier attempt planned differently) are waited for before anything is
sent, and their videos taken out of the plan, so no video is ever labelled by
two runs at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ..config import RoundConfig
from ..storage.catalog import Catalog, fold_quietly
from ..storage.layout import runs_prefix
from ..storage.uri import open_store, open_workspace
from ..tasks.labelling import BatchResult, PlannedVideo, batch_id_for, label_batch
from .round_calibration import calibrate_round
from .summary import calibration_key

DEPLOYMENT = "label-batch/label-batch"
READ_CHUNK = 200  # flow runs per read: the API's default page size
CATALOG_POLL_SECONDS = 10.0


def round_tag(round_id: str) -> str:
    """The tag every batch run of a round carries, to find them again (also in the UI's filter)."""
    return f"pseudotrack-round:{round_id}"


def batch_result_key(round_id: str, batch_id: str) -> str:
    return f"{runs_prefix(round_id)}batches/{batch_id}.json"


def run_batch(config: RoundConfig, videos: list[PlannedVideo], checkpoints: dict[str, str | None]) -> dict:
    bucket, workspace = open_workspace(config)
    if videos and config.calibration_scenes and not workspace.exists(calibration_key(config.round_id or "")):
        # the pool's round process has no teachers: the first batch calibrates them, on its worker's
        # device, once per round (batches starting together may each do it; the last write stays)
        calibrate_round(config, checkpoints, workspace)
    result = asdict(label_batch(videos, config, checkpoints, bucket, workspace, Catalog(workspace)))
    workspace.write_bytes(
        batch_result_key(config.round_id or "", result["batch_id"]), json.dumps(result, sort_keys=True).encode()
    )
    return result


@flow(name="label-batch", log_prints=True)
def label_batch_flow(config: RoundConfig, videos: list[PlannedVideo], checkpoints: dict[str, str | None]) -> dict:
    """Label one batch of a round (a child flow run of `label-round --executor pool`)."""
    started = time.perf_counter()
    result = run_batch(config, videos, checkpoints)
    log = get_run_logger()
    log.info(
        "batch %s: %d labelled, %d failed in %.1f s",
        result["batch_id"],
        result["labelled"],
        result["failed"],
        time.perf_counter() - started,
    )
    if result["reasons"]:
        rows = "\n".join(f"| {reason} | {count} |" for reason, count in sorted(result["reasons"].items()))
        create_markdown_artifact(f"| failure | videos |\n|---|---|\n{rows}", description="failures of this batch")
    return result


# --------------------------------------------------------------------------- the round's side


def batch_parameters(config: RoundConfig, videos: list[PlannedVideo], checkpoints: dict[str, str | None]) -> dict:
    """Flow-run parameters a worker elsewhere can act on: absolute store URIs and checkpoint paths.

    A worker runs in its own directory (the process worker's is a temporary
    one), so a relative path given on the command line would point nowhere there.
    """
    data = asdict(config)
    data["bucket"] = open_store(config.bucket).uri()
    data["workspace"] = open_store(config.workspace).uri()
    data["teachers"] = [_absolute_teacher(entry) for entry in config.teachers]
    for name in ("checkpoints", "rules", "captions"):
        if data[name] and "://" not in data[name]:
            data[name] = str(Path(data[name]).expanduser().resolve())
    paths = {name: str(Path(path).expanduser().resolve()) if path else None for name, path in checkpoints.items()}
    return {"config": data, "videos": [asdict(v) for v in videos], "checkpoints": paths}


def _absolute_teacher(entry: str) -> str:
    name, sep, path = entry.partition("=")
    return f"{name}={Path(path.strip()).expanduser().resolve()}" if sep and path.strip() else entry


def run_batches_on_pool(
    config: RoundConfig,
    work: list[list[PlannedVideo]],
    checkpoints: dict[str, str | None],
    catalog: Catalog,
    notify: Callable[[str, dict], None] = lambda event, payload: None,
    on_progress: Callable[[float], None] | None = None,
    poll_seconds: float = 1.0,
) -> tuple[list[BatchResult], list[dict]]:
    """Each batch as a flow run of the `label-batch` deployment; returns (results, failed batches).

    A child that does not complete is a failed batch (with its run's name, state
    and message), never a silent gap: the round's summary lists it and the
    round raises. Progress per video comes from the catalog, which the
    children write.
    """
    from prefect.client.orchestration import get_client

    assert config.round_id, "the round id is fixed before batches are sent"
    deployment = config.deployment or DEPLOYMENT
    log = _logger()
    with get_client(sync_client=True) as client:
        _check_deployment(client, deployment)
        work = _settle_earlier_runs(client, config, work, catalog, poll_seconds, log)
        runs = _submit(client, config, deployment, work, checkpoints, log)
        states = _wait(client, config, runs, catalog, notify, on_progress, poll_seconds, log)
    return _collect(config, runs, states, catalog)


def _check_deployment(client, deployment: str):
    """The deployment's id; a round sent to a server without it stops before any batch, saying what to do."""
    from prefect.exceptions import ObjectNotFound

    from ..errors import ConfigError

    try:
        return client.read_deployment_by_name(deployment).id
    except ObjectNotFound:
        raise ConfigError(
            f"deployment {deployment!r} does not exist on the Prefect API at {client.api_url}: run "
            "`prefect deploy --all` from the repository root (with PREFECT_API_URL set), or use --executor local"
        ) from None


def _logger():
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        return get_run_logger()
    import logging

    return logging.getLogger(__name__)


def _read_runs(client, flow_run_filter) -> list:
    from prefect.client.schemas.sorting import FlowRunSort

    found, offset = [], 0
    while True:
        page = client.read_flow_runs(
            flow_run_filter=flow_run_filter, sort=FlowRunSort.ID_DESC, limit=READ_CHUNK, offset=offset
        )
        found += page
        if len(page) < READ_CHUNK:
            return found
        offset += READ_CHUNK


def _round_runs(client, round_id: str, in_flight_only: bool = False) -> list:
    """The round's batch runs (any attempt), found by their tag."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import TERMINAL_STATES

    state = FlowRunFilterState(type=FlowRunFilterStateType(not_any_=list(TERMINAL_STATES))) if in_flight_only else None
    return _read_runs(client, FlowRunFilter(tags=FlowRunFilterTags(all_=[round_tag(round_id)]), state=state))


def batch_prefix(round_id: str, batch_id: str) -> str:
    """What every attempt's run name of a batch starts with."""
    return f"{round_id}-{batch_id}"


def run_name(round_id: str, batch_id: str, attempt: int) -> str:
    """A batch run's name and idempotency key: one run per attempt at the batch, whoever sends it."""
    return f"{batch_prefix(round_id, batch_id)}-{attempt}"


def split_run_name(name: str) -> tuple[str, int]:
    """(batch prefix, attempt) of a run name; a name without an attempt (an older version's) is attempt 0."""
    prefix, _, attempt = name.rpartition("-")
    return (prefix, int(attempt)) if prefix and attempt.isdigit() else (name, 0)


def _settle_earlier_runs(client, config, work, catalog, poll_seconds, log) -> list[list[PlannedVideo]]:
    """Wait for runs of this round still in flight under batch ids not in this plan; re-plan what they did."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    planned = {batch_prefix(config.round_id, batch_id_for(config.round_id, [v.key for v in b])) for b in work}
    in_flight = _round_runs(client, config.round_id, in_flight_only=True)
    stale = [run.id for run in in_flight if split_run_name(run.name)[0] not in planned]
    if not stale:
        return work
    log.warning(
        "round %s: waiting for %d batch run(s) of an earlier attempt before sending new ones",
        config.round_id,
        len(stale),
    )
    while stale:
        time.sleep(poll_seconds)
        still = _read_runs(client, FlowRunFilter(id=FlowRunFilterId(any_=stale)))
        stale = [run.id for run in still if not (run.state and run.state.is_final())]
    recorded = {
        (key, etag)
        for key, etag, status in zip(
            *(catalog.latest(config.round_id)[c].to_pylist() for c in ("video_key", "etag", "status")), strict=True
        )
        if status in ("labelled", "failed")
    }
    left = [v for batch in work for v in batch if (v.key, v.etag) not in recorded]
    return [left[i : i + config.batch_size] for i in range(0, len(left), config.batch_size)]


def _submit(client, config, deployment, work, checkpoints, log) -> dict:
    """One run per batch through `run_deployment`; returns {run id: (name, batch id, videos)}.

    An earlier attempt's run of the batch still in flight is waited for instead of sending another.
    An earlier run that finished leaves the batch's videos unrecorded (else they would not be planned),
    so the batch gets a new run, keyed with the next attempt number. The runs are not linked as
    subflows (that costs a placeholder task run a batch); the round's tag finds them, in the UI too.
    """
    from prefect.deployments import run_deployment

    latest: dict[str, tuple[int, object]] = {}
    for run in _round_runs(client, config.round_id):
        prefix, attempt = split_run_name(run.name)
        if prefix not in latest or attempt > latest[prefix][0]:
            latest[prefix] = (attempt, run)
    runs = {}
    started = time.perf_counter()
    for batch in work:
        batch_id = batch_id_for(config.round_id, [v.key for v in batch])
        attempt, earlier = latest.get(batch_prefix(config.round_id, batch_id), (0, None))
        if earlier is not None and not (earlier.state and earlier.state.is_final()):
            log.info(
                "batch %s: waiting for flow run %s, still in flight from an earlier attempt", batch_id, earlier.name
            )
            runs[earlier.id] = (earlier.name, batch_id, batch)
            continue
        if earlier is not None:
            log.info(
                "batch %s: flow run %s ended %s without its videos recorded; sending attempt %d",
                batch_id,
                earlier.name,
                earlier.state.name,
                attempt + 1,
            )
        name = run_name(config.round_id, batch_id, attempt + 1)
        flow_run = run_deployment(
            deployment,
            parameters=batch_parameters(config, batch, checkpoints),
            flow_run_name=name,
            timeout=0,
            tags=[round_tag(config.round_id)],
            idempotency_key=name,
            as_subflow=False,
        )
        runs[flow_run.id] = (name, batch_id, batch)
    log.info("round %s: sent %d batch runs in %.2f s", config.round_id, len(runs), time.perf_counter() - started)
    return runs


def _wait(client, config, runs, catalog, notify, on_progress, poll_seconds, log) -> dict:
    """Poll the children's states (one request per 200 runs) until all are final.

    Per-video progress comes from the catalog, read when a child finished or every
    CATALOG_POLL_SECONDS: the catalog grows with the round, the states do not.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    keys = {v.key for _, _, batch in runs.values() for v in batch}
    seen: set[str] = set()
    states: dict = {}
    finals_read = -1
    catalog_read = time.monotonic()
    warned_late = False
    while True:
        open_ids = [run_id for run_id in runs if run_id not in states or not states[run_id].is_final()]
        for start in range(0, len(open_ids), READ_CHUNK):
            ids = open_ids[start : start + READ_CHUNK]
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))):
                if run.state is not None:
                    states[run.id] = run.state
        finals = sum(1 for run_id in runs if run_id in states and states[run_id].is_final())
        if finals != finals_read or time.monotonic() - catalog_read > CATALOG_POLL_SECONDS:
            if finals != finals_read:
                fold_quietly(catalog)  # the children append a file per batch; the round folds them
            latest = catalog.latest(config.round_id)
            for key, status in zip(latest["video_key"].to_pylist(), latest["status"].to_pylist(), strict=True):
                # a planned video is 'filtered' here only on its quality score (caption verdicts are not planned)
                if key in keys and key not in seen and status in ("labelled", "failed", "filtered"):
                    seen.add(key)
                    notify(status, {"video_key": key})
            finals_read, catalog_read = finals, time.monotonic()
        if on_progress:
            on_progress(finals / max(1, len(runs)))
        if finals == len(runs):
            return states
        late = sum(1 for state in states.values() if state.name == "Late")
        if late and not warned_late:
            log.warning(
                "round %s: %d batch run(s) late: all slots of %s's pool and queue are busy, or no worker polls them",
                config.round_id,
                late,
                config.deployment or DEPLOYMENT,
            )
            warned_late = True
        time.sleep(poll_seconds)


def _collect(config, runs, states, catalog) -> tuple[list[BatchResult], list[dict]]:
    """The completed children's tallies, and a failure for each child that did not complete (a failed,
    crashed or cancelled child run does not fail the round's flow run: its state is read here)."""
    workspace = catalog.store
    results, failures = [], []
    for run_id, (name, batch_id, batch) in runs.items():
        state = states[run_id]
        if not state.is_completed():
            message = f": {state.message}" if state.message else ""
            error = f"flow run {name} ({run_id}) ended {state.name}{message}"
            failures.append({"batch_id": batch_id, "videos": len(batch), "error": error, "flow_run_id": str(run_id)})
            continue
        try:
            tally = json.loads(workspace.read_bytes(batch_result_key(config.round_id, batch_id)))
        except FileNotFoundError:
            error = f"flow run {name} ({run_id}) completed but left no {batch_result_key(config.round_id, batch_id)}"
            failures.append({"batch_id": batch_id, "videos": len(batch), "error": error, "flow_run_id": str(run_id)})
            continue
        known = {f.name for f in fields(BatchResult)}  # a worker of another version may report more or less
        results.append(BatchResult(**{k: v for k, v in tally.items() if k in known}))
    return results, failures
