"""The `label-batch` flow: one batch of a round, run by a worker of the `gpu` pool.

`pseudotrack round --executor pool` sends each batch here as a flow run of the
`label-batch` deployment, so throughput grows with the number of GPU workers
and the pool's concurrency limit caps simultaneous GPU batches. The worker
opens the stores itself (only URIs travel in the parameters, never clients or
credentials) and writes its shards and catalog events directly.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ..config import RoundConfig
from ..storage.catalog import Catalog
from ..tasks.labelling import PlannedVideo, label_batch

DEPLOYMENT = "label-batch/label-batch"


def run_batch(config: RoundConfig, videos: list[PlannedVideo], checkpoints: dict[str, str | None]) -> dict:
    from .label_round import open_workspace

    bucket, workspace = open_workspace(config)
    result = label_batch(videos, config, checkpoints, bucket, workspace, Catalog(workspace))
    return asdict(result)


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
