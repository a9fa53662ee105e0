"""prefect.yaml read without a server, its parts checked with Prefect's public types: five deployments on the cpu
and gpu pools, entrypoints that load, parameters each flow accepts, limits, the schedule and the trigger;
and the round events that trigger matches.

The same file deployed to a real server, with a worker and rounds through the pool, is tests/test_pool.py.
"""

from __future__ import annotations

import json
import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest
import yaml

from pseudotrack.config import LOCAL_BATCH_SIZE, POOL_BATCH_SIZE, RoundConfig, dataclass_from_dict
from pseudotrack.flows.events import ROUND_COMPLETED, round_payload, round_resource
from pseudotrack.flows.label_batch import batch_parameters
from pseudotrack.flows.summary import RoundSummary, next_steps
from pseudotrack.tasks.labelling import PlannedVideo

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    # deployment: (flow name, work pool, work queue)
    "label-round": ("label-round", "cpu", None),
    "label-batch": ("label-batch", "gpu", "label"),
    "train-student": ("train-student", "gpu", "train"),
    "scaling-round": ("scaling-round", "gpu", "train"),
    "watch-bucket": ("watch-bucket", "cpu", None),
}


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    """The file's deployments, their limits checked with Prefect's public types (tests/test_pool.py deploys the
    file itself with `prefect deploy --all`, which validates the whole of it)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert raw["pull"] == [], "workers import pseudotrack by module name; no code pull step"
    for deployment in raw["deployments"]:
        if "concurrency_limit" in deployment:
            ConcurrencyLimitConfig.model_validate(deployment["concurrency_limit"])
    return {d["name"]: d for d in raw["deployments"]}


def test_five_deployments_on_their_pools_and_queues(deployments):
    assert set(deployments) == set(EXPECTED)
    for name, (_, pool, queue) in EXPECTED.items():
        work_pool = deployments[name]["work_pool"]
        assert work_pool["name"] == pool, name
        assert work_pool.get("work_queue_name") == queue, name


def test_limits_and_the_watch_schedule(deployments):
    batch = deployments["label-batch"]["concurrency_limit"]
    assert batch["limit"] >= 1 and batch["collision_strategy"] == "ENQUEUE"  # batches wait, none is dropped
    assert deployments["train-student"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    watch = deployments["watch-bucket"]
    assert watch["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}  # never two watches
    (schedule,) = watch["schedules"]
    assert schedule["cron"] == "0 * * * *" and schedule["timezone"] == "UTC"
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # a cron Prefect accepts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entrypoint_loads_and_its_parameters_fit_the_flow(deployments, name, tmp_path):
    from prefect.flows import load_flow_from_entrypoint

    deployment = deployments[name]
    flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
    assert flow.name == EXPECTED[name][0]
    parameters = deployment.get("parameters", {})
    if name == "label-batch":  # no defaults: each run gets what the round sends
        assert not parameters
        round_config = RoundConfig(bucket=str(tmp_path / "b"), workspace="s3://labels/ws", round_id="r1")
        parameters = batch_parameters(round_config, [PlannedVideo("a.mp4", 10, "etag-a", "a dog")], {"lk": None})
        assert parameters["config"]["bucket"] == (tmp_path / "b").as_uri()  # absolute: workers run elsewhere
    flow.validate_parameters(parameters)  # what a worker does before running the flow
    if "config" in parameters:  # dataclass configs: refuse keys they do not know, as a saved config would be
        config_type = typing.get_type_hints(flow.fn)["config"]
        assert is_dataclass(config_type)
        build = getattr(config_type, "from_dict", None)
        config = build(parameters["config"]) if build else dataclass_from_dict(config_type, parameters["config"], name)
        assert is_dataclass(config)


def test_pool_rounds_default_to_larger_batches_than_local_ones(deployments, tmp_path):
    """A label-batch run starts a fresh process on a stock worker, so pool batches are larger (README)."""
    assert POOL_BATCH_SIZE > LOCAL_BATCH_SIZE
    bucket, workspace = str(tmp_path / "b"), str(tmp_path / "w")
    assert RoundConfig(bucket, workspace, executor="pool").batch_size == POOL_BATCH_SIZE
    assert RoundConfig(bucket, workspace).batch_size == LOCAL_BATCH_SIZE
    assert RoundConfig(bucket, workspace, executor="pool", batch_size=8).batch_size == 8  # asked for: kept
    # the deployments that send batches to the pool use its default
    for name in ("label-round", "watch-bucket"):
        assert deployments[name]["parameters"]["config"]["batch_size"] == POOL_BATCH_SIZE, name
    assert deployments["scaling-round"]["parameters"]["config"]["round"]["batch_size"] == POOL_BATCH_SIZE


def test_train_student_trigger_matches_the_round_event(deployments):
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    (spec,) = deployments["train-student"]["triggers"]
    trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(dict(spec, name="t"))  # as prefect deploy does
    assert trigger.expect == {ROUND_COMPLETED}

    from prefect.events.schemas.events import matches as label_matches

    def fires(**resource_args) -> bool:
        resource = round_resource("r1", "s3://b/ws", **resource_args)
        return all(label_matches(expected, resource.get(label, "")) for label, expected in trigger.match.root.items())

    assert fires(new_labels=True, trained_by_caller=False)
    assert not fires(new_labels=False, trained_by_caller=False)  # a round that labelled nothing new
    assert not fires(new_labels=True, trained_by_caller=True)  # a scaling round trains on its round itself
    # what the trigger passes: templates of the event, rendered by the server (tests/test_pool.py renders them)
    config = spec["parameters"]["config"]
    assert config["workspace"] == "{{ event.payload.workspace }}"
    assert config["rounds"] == "{{ [event.payload.round_id] }}"
    assert "event.payload.round_id" in config["output"]


def test_round_event_carries_uris_and_counts_never_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-this-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADONOTLEAK")
    summary = RoundSummary("r7", labelled=3, failed=1, filtered=2, shards=["shards/r7/a-000000.tar"])
    resource = round_resource("r7", "s3://labels/ws", new_labels=True, trained_by_caller=False)
    payload = round_payload(summary, "s3://labels/ws")
    assert resource["prefect.resource.id"] == "pseudotrack.round.r7"
    assert payload == {
        "round_id": "r7",
        "workspace": "s3://labels/ws",
        "labelled": 3,
        "failed": 1,
        "filtered": 2,
        "reused": 0,
        "recovered": 0,
        "shards": 1,
        "failed_batches": 0,
        "seconds": 0.0,
    }
    text = json.dumps([resource, payload])
    assert "do-not-leak-this-secret" not in text and "AKIADONOTLEAK" not in text
    assert all(isinstance(v, str) for v in resource.values())  # Prefect resource labels are strings


def test_a_summary_with_failures_says_how_to_resume_and_retry():
    """Issue 18: the round's summary names --round-id for unfinished batches and --retry-failed for failed videos."""
    assert next_steps(RoundSummary("clean", labelled=3)) == []
    (videos,) = next_steps(RoundSummary("r2", labelled=3, failed=2))
    assert "2 video(s) failed" in videos and "--retry-failed" in videos
    batches, videos = next_steps(RoundSummary("r3", failed=1, failed_batches=[{"batch_id": "b1"}]))
    assert "1 batch(es)" in batches and "--round-id r3" in batches and "--retry-failed" in videos


def test_a_round_event_says_whether_its_caller_trains_on_it(prefect_server):
    """What train-student's trigger relies on to stay out of scaling rounds, through Prefect's own emitter
    (its events worker needs an API, else it starts a temporary one; the events themselves are captured)."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from pseudotrack.flows.events import ROUND_FAILED, emit_round_finished, training_follows

    EventsWorker.set_client_override(AssertingEventsClient)
    worker = EventsWorker.instance()
    try:
        emit_round_finished(RoundSummary("plain", labelled=2), "s3://b/ws")
        with training_follows():
            emit_round_finished(RoundSummary("scaling", labelled=2), "s3://b/ws")
        emit_round_finished(RoundSummary("nothing-new", reused=5), "s3://b/ws")
        emit_round_finished(RoundSummary("broken", labelled=1, failed_batches=[{"batch_id": "b1"}]), "s3://b/ws")
        worker.drain()
        events = {e.resource.id.rsplit(".", 1)[1]: e for e in AssertingEventsClient.last.events}
    finally:
        EventsWorker.set_client_override(None)
    labels = {
        k: (e.event, e.resource["pseudotrack.new-labels"], e.resource["pseudotrack.trained-by-caller"])
        for k, e in events.items()
    }
    assert labels == {
        "plain": (ROUND_COMPLETED, "true", "false"),
        "scaling": (ROUND_COMPLETED, "true", "true"),
        "nothing-new": (ROUND_COMPLETED, "false", "false"),
        "broken": (ROUND_FAILED, "false", "false"),
    }
    assert events["plain"].payload["labelled"] == 2 and events["plain"].payload["workspace"] == "s3://b/ws"
