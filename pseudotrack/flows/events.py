"""Prefect events a labelling round emits when it ends, so that other work can start on its own.

`train-student`'s deployment trigger (prefect.yaml) listens for
`pseudotrack.round.completed` on resources `pseudotrack.round.<round id>`
whose label `pseudotrack.new-labels` is "true" and `pseudotrack.trained-by-caller`
is "false", and starts a training run on that round's shards: a round that
labelled nothing new (an hourly watch of an unchanged bucket) trains nothing,
and neither does a round whose caller trains on it itself (a scaling round
labels inside `training_follows()`). A round with failed batches emits
`pseudotrack.round.failed` instead, for notifications; it is resumed, not
trained on.

The event carries the workspace URI and counts only. URIs name where data is,
never how to reach it: credentials stay in each worker's own AWS settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.events import Event

    from .summary import RoundSummary

ROUND_COMPLETED = "pseudotrack.round.completed"
ROUND_FAILED = "pseudotrack.round.failed"

_TRAINED_BY_CALLER: ContextVar[bool] = ContextVar("pseudotrack_trained_by_caller", default=False)


@contextmanager
def training_follows() -> Iterator[None]:
    """Rounds finished inside this block are trained on by the caller: their events say so, so that
    train-student's trigger does not start a second training on the same labels."""
    token = _TRAINED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _TRAINED_BY_CALLER.reset(token)


def round_resource(round_id: str, workspace_uri: str, new_labels: bool, trained_by_caller: bool) -> dict[str, str]:
    """The round as a Prefect resource; label values are strings, as Prefect requires."""
    return {
        "prefect.resource.id": f"pseudotrack.round.{round_id}",
        "prefect.resource.name": round_id,
        "pseudotrack.workspace": workspace_uri,
        "pseudotrack.new-labels": "true" if new_labels else "false",
        "pseudotrack.trained-by-caller": "true" if trained_by_caller else "false",
    }


def round_payload(summary: RoundSummary, workspace_uri: str) -> dict:
    return {
        "round_id": summary.round_id,
        "workspace": workspace_uri,
        "labelled": summary.labelled,
        "failed": summary.failed,
        "filtered": summary.filtered,
        "reused": summary.reused,
        "recovered": summary.recovered,
        "shards": len(summary.shards),
        "failed_batches": len(summary.failed_batches),
        "seconds": round(summary.seconds, 3),
    }


def emit_round_finished(summary: RoundSummary, workspace_uri: str) -> Event | None:
    """`pseudotrack.round.completed` (or `.failed` when batches failed) for `summary`; None if events are off.

    Inside a flow run Prefect relates the event to the run, its flow and its
    deployment, so the UI shows which run finished the round.
    """
    from prefect.events import emit_event

    new_labels = summary.labelled + summary.recovered > 0
    return emit_event(
        ROUND_FAILED if summary.failed_batches else ROUND_COMPLETED,
        resource=round_resource(
            summary.round_id, workspace_uri, new_labels and not summary.failed_batches, _TRAINED_BY_CALLER.get()
        ),
        payload=round_payload(summary, workspace_uri),
    )
