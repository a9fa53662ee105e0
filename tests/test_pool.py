"""Production orchestration end to end: a real Prefect server, prefect.yaml deployed with `prefect deploy --all`,
a process worker on the `gpu` pool, and `pseudotrack round --executor pool` sending each batch there.

Checked: the five deployments and train-student's trigger as the server holds them; a round through the pool
on `prefect worker start` (catalog, shards, a child flow run per batch); the trigger starting a training run
with the round's workspace and id; a re-run creating no child run; crashed batches failing the round with a
message naming them, and a re-run resuming each in one new flow run (its next attempt), at most the queue's limit
at once, after which a third run sends nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.demo import write_demo_bucket
from pseudotrack.render import shard_url
from pseudotrack.storage.catalog import Catalog
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.shards import committed_shards, read_shard

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENTS = ("label-round", "label-batch", "train-student", "scaling-round", "watch-bucket")
LABEL_QUEUE_LIMIT = 1  # below the rounds' batch counts, so the cap is seen working
# tiny clips: the round's cost is orchestration, which is what this file is about
CLIP = [
    "--frames",
    "16",
    "--height",
    "96",
    "--width",
    "128",
    "--queries",
    "48",
    "--keyframes",
    "4",
    "--max-stride",
    "1",
]
CRASH = "python -c \"import sys; sys.exit('simulated loss of a GPU worker')\""

runner = CliRunner()


WORKERS = {  # the stock process worker, as the README starts it
    "plain": [PREFECT, "worker", "start", "--pool", "gpu", "--work-queue", "label"],
}
READY = {"plain": "started"}


@dataclass
class Stack:
    """The deployed server, and one worker on the gpu pool's `label` queue, of the kind a test asks for."""

    api_url: str
    students: Path
    folder: Path
    env: dict
    worker: subprocess.Popen | None = None
    kind: str | None = None

    def use_worker(self, kind: str, wait: bool = True) -> Path:
        """Start a worker of `kind` (stopping another kind); returns its log."""
        log_path = self.folder / f"worker-{kind}.log"
        if self.kind == kind and self.worker is not None and self.worker.poll() is None:
            return log_path
        self.stop_worker()
        with open(log_path, "wb") as log:
            self.worker = subprocess.Popen(
                WORKERS[kind],
                cwd=REPO,
                env=dict(
                    self.env, PREFECT_WORKER_QUERY_SECONDS="1", PYTHONUNBUFFERED="1", PREFECT_LOGGING_LEVEL="INFO"
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.kind = kind
        if wait:
            _wait_for_line(log_path, READY[kind], self.worker, timeout=120)
        return log_path

    def stop_worker(self) -> None:
        if self.worker is not None:
            _stop(self.worker)
        self.worker = self.kind = None


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{path.read_text()[-3000:]}")
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.3)
    raise RuntimeError(f"no {text!r} from the worker in {timeout:.0f} s:\n{path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started: the worker and its flow-run processes
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(prefect_server: str, tmp_path_factory) -> Iterator[Stack]:
    """Pools and queues, `prefect deploy --all` of prefect.yaml, and a worker on the gpu pool's `label` queue."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    tmp = tmp_path_factory.mktemp("pool")
    students = tmp / "students"
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp / "home"))
    with get_client(sync_client=True) as client:
        template = ProcessWorker.get_default_base_job_template()
        for pool in ("cpu", "gpu"):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        for queue, limit in (("label", LABEL_QUEUE_LIMIT), ("train", 1)):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=queue, work_pool_name="gpu", concurrency_limit=limit)
        client.create_variable(VariableCreate(name="pseudotrack_students_dir", value=str(students)))
    stack = Stack(prefect_server, students, tmp, env)
    try:
        log = stack.use_worker("plain", wait=False)  # it starts while prefect.yaml deploys
        deployed = subprocess.run(
            [PREFECT, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-4000:]
        _wait_for_line(log, READY["plain"], stack.worker, timeout=120)
        yield stack
    finally:
        stack.stop_worker()
        with get_client(sync_client=True) as client:  # leave the session's server as we found it
            for name in DEPLOYMENTS:
                try:
                    deployment = client.read_deployment_by_name(f"{name}/{name}")
                except ObjectNotFound:
                    continue
                client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
                client.delete_deployment(deployment.id)
            client.delete_variable_by_name("pseudotrack_students_dir")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """6 generated clips (2 with captions the filter drops) and a broken file: 4 labelled, 2 filtered, 1 failed."""
    root = tmp_path_factory.mktemp("pool-bucket")
    write_demo_bucket(root, videos=6, frames=20, height=96, width=128, seed=3, broken=1)
    return root


def _round(bucket: Path, workspace: Path, round_id: str, batch_size: int):
    args = ["round", "--bucket", str(bucket), "--workspace", str(workspace), "--executor", "pool"]
    return runner.invoke(app, [*args, "--round-id", round_id, "--batch-size", str(batch_size), *CLIP])


def _runs(**filters) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterTags

    flow_run_filter = FlowRunFilter(tags=FlowRunFilterTags(all_=[filters["tag"]])) if "tag" in filters else None
    deployment_filter = (
        DeploymentFilter(name=DeploymentFilterName(any_=[filters["deployment"]])) if "deployment" in filters else None
    )
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=flow_run_filter, deployment_filter=deployment_filter)


def _batch_runs(round_id: str) -> list:
    from pseudotrack.flows.label_batch import round_tag

    return _runs(tag=round_tag(round_id))


def _training_runs(round_id: str) -> list:
    return [r for r in _runs(deployment="train-student") if r.parameters["config"].get("rounds") == [round_id]]


def _wait_for(what, timeout: float = 30.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(every)


def _states(workspace: Path) -> dict[str, str]:
    return {r["video_key"]: r["status"] for r in Catalog(open_store(str(workspace))).latest().to_pylist()}


def test_deploy_all_holds_five_deployments_limits_schedule_and_trigger(stack: Stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        got = {name: client.read_deployment_by_name(f"{name}/{name}") for name in DEPLOYMENTS}
        automations = client.read_automations()
    assert {n: (d.work_pool_name, d.work_queue_name) for n, d in got.items()} == {
        "label-round": ("cpu", "default"),
        "label-batch": ("gpu", "label"),
        "train-student": ("gpu", "train"),
        "scaling-round": ("gpu", "train"),
        "watch-bucket": ("cpu", "default"),
    }
    assert all(d.pull_steps == [] for d in got.values())
    # the round builds label-batch's parameters; users' deployments keep the server's check
    assert {n: d.enforce_parameter_schema for n, d in got.items()} == dict.fromkeys(DEPLOYMENTS, True) | {
        "label-batch": False
    }
    assert got["label-batch"].global_concurrency_limit.limit == 16
    assert got["label-batch"].concurrency_options.collision_strategy.value == "ENQUEUE"
    assert got["train-student"].global_concurrency_limit.limit == 1
    watch = got["watch-bucket"]
    assert (
        watch.global_concurrency_limit.limit == 1 and watch.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    )
    assert [s.schedule.cron for s in watch.schedules] == ["0 * * * *"] and watch.schedules[0].active
    (trigger,) = [
        a for a in automations if a.actions and getattr(a.actions[0], "deployment_id", None) == got["train-student"].id
    ]
    assert trigger.trigger.expect == {"pseudotrack.round.completed"}
    assert trigger.trigger.match.root["pseudotrack.new-labels"] == "true"


def test_round_through_the_pool_then_training_starts_and_a_rerun_adds_no_runs(stack: Stack, bucket, tmp_path):
    """`prefect worker start --pool gpu`, as the README starts it."""
    stack.use_worker("plain")
    workspace = tmp_path / "ws"
    result = _round(bucket, workspace, "pool-a", batch_size=5)
    assert result.exit_code == 0, result.output
    states = _states(workspace)
    assert sorted(states.values()) == ["failed", "filtered", "filtered", "labelled", "labelled", "labelled", "labelled"]
    assert states["broken_00.mp4"] == "failed"
    # shards: every labelled video once, with its lk labels, committed by the workers
    store = open_store(str(workspace))
    rows = {r["sample_key"]: r for r in Catalog(store).latest().to_pylist() if r["status"] == "labelled"}
    samples = {}
    for manifest in committed_shards(store, "pool-a"):
        for sample in read_shard(shard_url(store, manifest["shard"])):
            assert sample["key"] not in samples
            samples[sample["key"]] = sample
    assert set(samples) == set(rows)
    for key, sample in samples.items():
        assert sample["meta"]["source_key"] == rows[key]["video_key"] and sample["meta"]["teachers"] == ["lk"]
        assert sample["labels"]["lk"]["tracks"].shape == (sample["meta"]["num_frames"], 48, 2)
    summary = json.loads(store.read_bytes("runs/pool-a/summary.json"))
    assert summary["labelled"] == 4 and summary["failed"] == 1 and summary["failed_batches"] == []
    assert len(summary["next_steps"]) == 1 and "--retry-failed" in summary["next_steps"][0]  # the broken file
    assert summary["teachers"] == {"lk": 4} and summary["stage_seconds"]["teacher"] > 0  # the workers' own tallies

    # one child flow run for the one batch (5 videos to label in a batch of 5), sent to the worker's queue
    runs = _batch_runs("pool-a")
    assert len(runs) == 1 and runs[0].state.is_completed() and runs[0].work_queue_name == "label"
    assert runs[0].parameters["config"]["workspace"] == workspace.as_uri()
    assert sorted(v["key"] for v in runs[0].parameters["videos"]) == sorted(
        k for k, state in states.items() if state in ("labelled", "failed")
    )

    # the round's completion event started a training run on its shards (train queue: no worker runs it here)
    (training,) = _wait_for(lambda: _training_runs("pool-a"))
    assert training.parameters["config"]["workspace"] == workspace.as_uri()
    assert training.parameters["config"]["output"] == f"{stack.students}/pool-a"
    assert training.parameters["config"]["init_checkpoint"] == "/models/scaled_online.pth"
    assert training.work_queue_name == "train" and training.state.is_scheduled()

    # the same round again: nothing left to label, no child run created, and no second training
    result = _round(bucket, workspace, "pool-a", batch_size=5)
    assert result.exit_code == 0, result.output
    assert "planned 0 videos to label" in " ".join(result.output.split())
    assert sorted(r.id for r in _batch_runs("pool-a")) == sorted(r.id for r in runs)
    events = _wait_for(lambda: len(_round_events("pool-a")) >= 2 and _round_events("pool-a"))
    assert [e.resource["pseudotrack.new-labels"] for e in events] == ["true", "false"]
    time.sleep(3)  # the server evaluates triggers as events arrive; give a wrong second run time to appear
    assert len(_training_runs("pool-a")) == 1


def _last_attempt(run) -> tuple:
    """(taken from the queue, finished) of a run's last attempt: the time it held a slot of its queue.

    Not start_time: a run resumed after a crash keeps the start time of its first attempt."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = sorted(client.read_flow_run_states(run.id), key=lambda st: st.timestamp)
    taken = [st.timestamp for st in states if st.type.value == "PENDING" and st.name == "Pending"][-1]
    return taken, run.end_time


def _round_events(round_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(resource=EventResourceFilter(id=[f"pseudotrack.round.{round_id}"])), limit=50
        )
    return sorted(page.events, key=lambda e: e.occurred)


def test_a_crashed_batch_fails_the_round_and_a_rerun_resumes_it_in_new_runs(stack: Stack, bucket, tmp_path):
    """A deployment's own `command` that dies at once crashes each batch; a re-run sends each crashed batch once
    more as a new flow run (its next attempt), and a third run sends nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from pseudotrack.flows.label_batch import split_run_name

    stack.use_worker("plain")
    workspace = tmp_path / "ws"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("label-batch/label-batch")
        client.update_deployment(deployment.id, DeploymentUpdate(job_variables={"command": CRASH}))
        try:
            result = _round(bucket, workspace, "pool-b", batch_size=3)
        finally:
            client.update_deployment(deployment.id, DeploymentUpdate(job_variables={}))
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "2 batch(es) failed" in output and "Crashed" in output, output
    assert "--round-id pool-b to resume" in output
    crashed = _batch_runs("pool-b")
    assert len(crashed) == 2 and all(r.state.is_crashed() for r in crashed)
    assert sorted(split_run_name(r.name)[1] for r in crashed) == [1, 1]
    summary = json.loads(open_store(str(workspace)).read_bytes("runs/pool-b/summary.json"))
    assert sorted(b["flow_run_id"] for b in summary["failed_batches"]) == sorted(str(r.id) for r in crashed)
    assert any("--round-id pool-b" in step for step in summary["next_steps"])
    assert "labelled" not in _states(workspace).values()  # nothing half-done: the crashed batches wrote nothing
    assert [e.event for e in _wait_for(lambda: _round_events("pool-b"))] == ["pseudotrack.round.failed"]

    result = _round(bucket, workspace, "pool-b", batch_size=3)
    assert result.exit_code == 0, result.output
    runs = _batch_runs("pool-b")
    resumed = [r for r in runs if r.id not in {c.id for c in crashed}]
    # one new run per crashed batch, its second attempt; the crashed runs are left as they ended
    assert sorted(split_run_name(r.name) for r in resumed) == sorted((split_run_name(r.name)[0], 2) for r in crashed), [
        r.name for r in runs
    ]
    assert all(r.state.is_completed() for r in resumed)
    assert all(r.state.is_crashed() for r in runs if r.id in {c.id for c in crashed})
    spans = sorted(_last_attempt(r) for r in resumed)  # two batches, never more at once than the queue allows
    assert max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans) == LABEL_QUEUE_LIMIT, spans
    assert sorted(_states(workspace).values()) == [
        "failed",
        "filtered",
        "filtered",
        "labelled",
        "labelled",
        "labelled",
        "labelled",
    ]
    result = _round(bucket, workspace, "pool-b", batch_size=3)  # all recorded: no run sent, none duplicated
    assert result.exit_code == 0, result.output
    assert sorted(r.id for r in _batch_runs("pool-b")) == sorted(r.id for r in runs)
