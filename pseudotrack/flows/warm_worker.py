"""A process worker for the `gpu` pool whose flow runs start warm: forked from a preloaded server.

`prefect worker start --pool gpu` starts every flow run as a new Python
process that imports Prefect, pseudotrack, torch, OpenCV and decord before it
labels its first video: several seconds per batch, which at 32 videos a batch
is most of a round's orchestration overhead (bench/bench_orchestration.py).
This worker is the same process worker (same pool type, job template, job
variables and crash reporting) except that a flow run's process is forked from
a multiprocessing fork server that imported all of that once, so it starts in
milliseconds. It polls every second unless PREFECT_WORKER_QUERY_SECONDS says
otherwise, and asks for the next run as soon as one ends, so a GPU whose batch
finished does not wait for the next poll. In the child, Prefect's engine waits
for nothing that has ended (warm_child.py: heartbeats, the suspension observer,
started while the run loads, and one TLS context for all API clients), and a
deployment with nothing to pull loads its flow from its entrypoint without
reading the deployment again. (Cancelling a running batch goes through
Prefect's engine in the child, without the process worker's control channel;
that path is not tested.)

    python -m pseudotrack.flows.warm_worker --pool gpu --work-queue label

Each flow run still gets its own process: a batch that crashes or leaks takes
only itself down, and CUDA is initialised in the child, never in the fork
server (CUDA does not survive a fork). A job whose deployment sets the
`command` job variable runs that command as a plain process worker would.
Prefect settings given as job variables (env) are re-read in the child; Python
modules the preload imported keep the fork server's import-time state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import warnings
from typing import Any

from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from pydantic import PrivateAttr

from . import warm_child

# what a label-batch run imports; more with --preload (e.g. a teacher module of your own)
PRELOAD = (
    "pseudotrack.flows.warm_fork_server",
    "prefect.workers.process",  # a forked child re-runs the worker's main module: its imports, done once
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.deployments.steps.pull",
    "pseudotrack.flows.label_batch",
    "pseudotrack.flows.train_student",
    "pseudotrack.tasks.decode",
    "pseudotrack.tasks.queries",
    "pseudotrack.teachers.lk",
    "pseudotrack.teachers.cotracker3",
    "pseudotrack.teachers.cotracker2",
    "pseudotrack.teachers.tapir",
)


DEFAULT_QUERY_SECONDS = 1.0


def _run_engine(flow_run_id: str, env: dict[str, str | None], cwd: str) -> None:
    """In the forked child: become the process `python -m prefect.engine <id>` would have been."""
    import runpy

    import prefect.engine

    changed = _settings_changed(env)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.chdir(cwd)
    if changed:  # the job's Prefect settings, not the fork server's (0.25 s: only when they differ)
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    warm_child.install_prompt_heartbeats()
    if warm_child.install_prompt_suspension_observer():
        warm_child.start_early(flow_run_id)  # its connecting overlaps loading the run
    sys.argv = ["prefect.engine", flow_run_id]
    try:
        runpy.run_path(prefect.engine.__file__, run_name="__main__")
    finally:
        warm_child.stop_early()
        _drain()  # a multiprocessing child skips atexit, where Prefect flushes its logs and events


def _settings_changed(env: dict[str, str | None]) -> bool:
    """Whether the job sets a Prefect setting (PREFECT_*) other than the fork server read at its start.

    PREFECT__* names (the flow run id) are the engine's arguments, read from the environment
    directly, not settings.
    """
    return any(
        name.startswith("PREFECT_") and not name.startswith("PREFECT__") and os.environ.get(name) != value
        for name, value in env.items()
    )


def _drain() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        # blocks here: no event loop runs in this thread; best effort, the run's state is already reported
        with contextlib.suppress(Exception):
            service.drain_all(timeout=10)


class WarmJobConfiguration(ProcessJobConfiguration):
    """The process worker's job configuration, also noting a deployment's entrypoint when nothing is pulled."""

    _entrypoint: str | None = PrivateAttr(default=None)

    def prepare_for_flow_run(self, flow_run: Any, deployment: Any = None, *args: Any, **kwargs: Any) -> None:
        super().prepare_for_flow_run(flow_run, deployment, *args, **kwargs)
        self._entrypoint = local_entrypoint(deployment)


def local_entrypoint(deployment: Any) -> str | None:
    """The deployment's entrypoint if loading its flow needs nothing but the import (else None).

    Given as PREFECT__FLOW_ENTRYPOINT, it spares the run the engine's second read of
    the deployment (the worker has just read it) and its storage step, which for a
    deployment without pull steps, storage or path is a no-op; a deployment with any of
    them loads its flow as Prefect always does.
    """
    if deployment is None or not getattr(deployment, "entrypoint", None) or ":" not in deployment.entrypoint:
        return None
    if deployment.pull_steps or deployment.storage_document_id or deployment.path:
        return None
    return deployment.entrypoint


def warm_worker_class() -> type[ProcessWorker]:
    """The worker class, made on demand: Prefect registers worker classes by pool type when they are
    defined, and this one shares `process` with ProcessWorker, so only the worker process should define it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "has key 'process' that matches existing registered type"

        class WarmProcessWorker(ProcessWorker):
            """ProcessWorker that forks flow runs from a preloaded fork server instead of exec'ing Python."""

            _description = "Process worker whose flow runs fork from a preloaded server (pseudotrack)."
            job_configuration = WarmJobConfiguration

            async def run(
                self,
                flow_run: Any,
                configuration: ProcessJobConfiguration,
                task_status: Any = None,
            ) -> ProcessWorkerResult:
                if configuration._command_configured:  # the deployment asked for its own command
                    return await super().run(flow_run, configuration, task_status)
                import tempfile
                from pathlib import Path

                with tempfile.TemporaryDirectory(suffix="prefect") as tmp:
                    cwd = str(Path(configuration.working_dir or tmp).resolve())
                    env = dict(configuration.env)
                    entrypoint = getattr(configuration, "_entrypoint", None)
                    if entrypoint and "PREFECT__FLOW_ENTRYPOINT" not in env:
                        env["PREFECT__FLOW_ENTRYPOINT"] = entrypoint
                    context = multiprocessing.get_context("forkserver")
                    process = context.Process(
                        target=_run_engine,
                        args=(str(flow_run.id), env, cwd),
                        name=f"flow-{flow_run.id}",
                    )
                    process.start()
                    if task_status is not None:
                        task_status.started(process.pid)
                    await asyncio.get_running_loop().run_in_executor(None, process.join)
                return ProcessWorkerResult(status_code=process.exitcode or 0, identifier=str(process.pid))

            async def _submit_run_and_capture_errors(self, flow_run: Any, task_status: Any = None) -> Any:
                result = await super()._submit_run_and_capture_errors(flow_run, task_status)
                if isinstance(result, ProcessWorkerResult) and self._runs_task_group is not None:
                    # the run's slot is free now (its final state is on the server, the worker's limit
                    # released): ask for the next batch at once rather than at the next poll
                    self._runs_task_group.start_soon(self._poll_now)
                return result

            async def _poll_now(self) -> None:
                try:
                    await self.get_and_submit_flow_runs()
                except Exception as exc:  # the regular poll is still there; this one only saves time
                    self._logger.debug("immediate poll after a run failed: %s", exc)

    return WarmProcessWorker


def start_fork_server(preload: list[str]) -> None:
    """Start the fork server and wait for its imports, so they are paid before the first run, not during it."""
    multiprocessing.set_forkserver_preload(preload)
    probe = multiprocessing.get_context("forkserver").Process(target=_ready)
    probe.start()  # the server forks the probe only once its preload is done
    probe.join()


def _ready() -> None:
    """A child that does nothing: its start proves the fork server is up and preloaded."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="work pool of type process, e.g. gpu")
    parser.add_argument("--work-queue", action="append", help="queue to poll (repeatable); default: all")
    parser.add_argument("--name", help="worker name; default: a random one")
    parser.add_argument("--limit", type=int, help="flow runs this worker runs at once; default: no limit")
    parser.add_argument("--prefetch-seconds", type=float, help="how early to pick up scheduled runs")
    parser.add_argument("--preload", action="append", default=[], help="another module to import in the fork server")
    args = parser.parse_args(argv)

    # a GPU whose batch finished idles until the worker's next poll: poll every second unless told otherwise
    # (Prefect's default is 10 s)
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(DEFAULT_QUERY_SECONDS))
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    start_fork_server([*PRELOAD, *args.preload])

    async def serve() -> None:
        async with warm_worker_class()(
            work_pool_name=args.pool,
            work_queues=args.work_queue,
            name=args.name,
            limit=args.limit,
            prefetch_seconds=args.prefetch_seconds,
            create_pool_if_not_found=False,
        ) as worker:
            print(f"warm worker {worker.name!r} polling pool {args.pool!r}", flush=True)
            await worker.start()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
