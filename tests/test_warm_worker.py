"""The warm worker's own parts: settings carried into a forked run, heartbeats and the suspension observer
that stop on time, one TLS context for API clients, and loading a flow from its entrypoint.

The worker end to end (a round through the pool, crashed batches) is in test_pool.py.
"""

from __future__ import annotations

import ssl
import threading
import time
from types import SimpleNamespace

import pytest

from pseudotrack.flows import warm_child, warm_worker


def test_a_job_changing_a_prefect_setting_makes_the_child_reread_settings(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    same = {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "PREFECT__FLOW_RUN_ID": "abc", "OTHER": "x"}
    assert not warm_worker._settings_changed(same)  # the run id is an argument, not a setting
    assert warm_worker._settings_changed(dict(same, PREFECT_API_URL="http://10.0.0.5:4200/api"))
    assert warm_worker._settings_changed(dict(same, PREFECT_LOGGING_LEVEL="DEBUG"))
    assert warm_worker._settings_changed({"PREFECT_API_URL": None})  # the job removes one


class FakeEngine:
    """What prompt_heartbeats needs of Prefect's flow-run engine, recording each beat."""

    def __init__(self, seconds: int | None, final: bool = False):
        self.heartbeat_seconds = seconds
        self.beats: list[float] = []
        state = SimpleNamespace(is_final=lambda: final)
        self.flow_run = SimpleNamespace(state=state)
        self.logger = SimpleNamespace(debug=lambda *a, **k: None)

    def _build_heartbeat_event_template(self):
        return {"resource": 1}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        assert resource == {"resource": 1} and related == []
        self.beats.append(time.monotonic())


def test_heartbeats_beat_at_start_and_stop_at_once():
    engine = FakeEngine(seconds=30)
    started = time.monotonic()
    with warm_child.prompt_heartbeats(engine):
        deadline = time.monotonic() + 5
        while not engine.beats and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine.beats) == 1  # one when the run starts; the next would be 30 s later
    assert time.monotonic() - started < 1.0  # Prefect's own waited for its 1 s sleep to end


def test_no_heartbeats_for_a_final_run_or_when_turned_off():
    final = FakeEngine(seconds=30, final=True)
    with warm_child.prompt_heartbeats(final):
        time.sleep(0.05)
    assert final.beats == []
    off = FakeEngine(seconds=None)
    with warm_child.prompt_heartbeats(off):
        time.sleep(0.05)
    assert off.beats == []


def test_this_prefect_has_what_the_prompt_heartbeats_replace(monkeypatch):
    """A Prefect upgrade that moves these fails here, not silently in every worker's runs."""
    import prefect.flow_engine as engine_module

    monkeypatch.setattr(engine_module, "_send_heartbeats", engine_module._send_heartbeats)
    assert warm_child.install_prompt_heartbeats()
    assert engine_module._send_heartbeats is warm_child.prompt_heartbeats


@pytest.mark.parametrize("missing", ["_send_heartbeats", "MINIMUM_HEARTBEAT_INTERVAL"])
def test_another_prefect_keeps_its_own_heartbeats(monkeypatch, missing):
    import prefect.flow_engine as engine_module

    monkeypatch.setattr(engine_module, "_send_heartbeats", engine_module._send_heartbeats)
    monkeypatch.delattr(engine_module, missing)
    assert not warm_child.install_prompt_heartbeats()
    if missing != "_send_heartbeats":
        assert engine_module._send_heartbeats is not warm_child.prompt_heartbeats


# ----------------------------------------------------------------------------- suspension observer


def _pending_flow_run(name: str):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    @flow(name="warm-suspension-probe")
    def probe() -> None: ...

    with get_client(sync_client=True) as client:
        return client.create_flow_run(probe, name=name, state=Pending())


def _suspend(flow_run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Suspended

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Suspended(timeout_seconds=600), force=True)


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_an_early_observer_keeps_a_suspension_for_the_engine_and_stops_at_once(prefect_server):
    """Against a real server: a suspension seen before the engine binds its request reaches the request."""
    from prefect._flow_run_suspension import FlowRunSuspensionRequest

    run = _pending_flow_run("early-observer")
    observer = warm_child.SuspensionObserver(run.id, polling_interval=1.0).start()
    try:
        assert observer.ready.wait(30), "the observer never watched the run"
        _suspend(run.id)
        assert _wait_for(lambda: observer._seen is not None, 30), "the suspension was not noticed"
        request = FlowRunSuspensionRequest()
        observer.bind(request)
        assert request.is_requested() and request.get_state().name == "Suspended"
    finally:
        started = time.monotonic()
        observer.stop()
    assert time.monotonic() - started < 1.0  # Prefect's own looked for its stop every 0.2 s, then joined
    assert not observer._thread.is_alive()


def test_the_engine_takes_over_the_early_observer_and_sees_a_later_suspension(prefect_server, monkeypatch):
    from prefect._flow_run_suspension import FlowRunSuspensionRequest

    monkeypatch.setattr(warm_child, "_early", None)
    run = _pending_flow_run("engine-observer")
    early = warm_child.start_early(str(run.id))
    request = FlowRunSuspensionRequest()
    with warm_child.prompt_suspension_observer(run.id, request):
        assert warm_child._early is None and early.ready.is_set()  # taken over, and watching before the run
        _suspend(run.id)
        assert _wait_for(request.is_requested, 30), "the suspension did not reach the engine's request"
    assert not early._thread.is_alive()


def test_an_early_observer_for_another_run_is_stopped_not_used(monkeypatch):
    stopped = []
    other = SimpleNamespace(flow_run_id="other", polling_interval=10.0, stop=lambda: stopped.append(True))
    monkeypatch.setattr(warm_child, "_early", other)
    made = []

    class Recording(warm_child.SuspensionObserver):
        def start(self):
            made.append(self)
            self.ready.set()
            return self

        def stop(self) -> None:
            made.append("stopped")

    monkeypatch.setattr(warm_child, "SuspensionObserver", Recording)
    request = SimpleNamespace(mark_requested=lambda state: None)
    with warm_child.prompt_suspension_observer("mine", request):
        assert stopped == [True] and made[0].flow_run_id == "mine" and made[0]._request is request
    assert made[-1] == "stopped"


def test_this_prefect_has_what_the_prompt_suspension_observer_replaces(monkeypatch):
    import prefect.flow_engine as engine_module

    monkeypatch.setattr(engine_module, "observe_flow_run_suspension", engine_module.observe_flow_run_suspension)
    assert warm_child.install_prompt_suspension_observer()
    assert engine_module.observe_flow_run_suspension is warm_child.prompt_suspension_observer
    monkeypatch.delattr(engine_module, "observe_flow_run_suspension")
    assert not warm_child.install_prompt_suspension_observer()


# ----------------------------------------------------------------------------- TLS context and entrypoint


@pytest.fixture
def restored_clients(monkeypatch):
    """Prefect's client classes as they were, after the test (share_api_tls_context changes them)."""
    from prefect.client import orchestration

    for cls in (orchestration.PrefectClient, orchestration.SyncPrefectClient):
        monkeypatch.setattr(cls, "__init__", cls.__init__)
    return orchestration


def test_api_clients_share_one_verified_tls_context(restored_clients, monkeypatch):
    from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    built: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    assert warm_child.share_api_tls_context()
    assert len(built) == 1  # at once: in the fork server, before any run
    shared = built[0]
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
    clients = [cls("http://127.0.0.1:9/api") for cls in (restored_clients.SyncPrefectClient,) * 2]
    clients.append(restored_clients.PrefectClient("http://127.0.0.1:9/api"))
    assert len(built) == 1  # three clients, no new context
    own = ssl.create_default_context()
    restored_clients.SyncPrefectClient("http://127.0.0.1:9/api", httpx_settings={"verify": own})
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        restored_clients.SyncPrefectClient("http://127.0.0.1:9/api")
    assert built[-1].verify_mode == ssl.CERT_NONE  # Prefect's own unverified context, not the shared one
    assert warm_child.share_api_tls_context()  # a second call wraps nothing twice
    assert restored_clients.SyncPrefectClient.__init__.__wrapped__.__name__ == "__init__"
    assert not hasattr(restored_clients.SyncPrefectClient.__init__.__wrapped__, "_shares_tls_context")


def test_the_shared_tls_context_is_built_once_across_threads(restored_clients):
    assert warm_child.share_api_tls_context()
    errors: list[BaseException] = []

    def make() -> None:
        try:
            restored_clients.SyncPrefectClient("http://127.0.0.1:9/api")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _deployment(**fields):
    base = {
        "entrypoint": "pseudotrack.flows.label_batch:label_batch_flow",
        "pull_steps": [],
        "storage_document_id": None,
        "path": None,
    }
    return SimpleNamespace(**{**base, **fields})


def test_a_deployment_with_nothing_to_pull_loads_from_its_entrypoint():
    assert warm_worker.local_entrypoint(_deployment()) == "pseudotrack.flows.label_batch:label_batch_flow"
    assert warm_worker.local_entrypoint(_deployment(pull_steps=None)) is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"pull_steps": [{"prefect.deployments.steps.git_clone": {"repository": "https://example.com/r.git"}}]},
        {"storage_document_id": "0b5a7f7e-0000-0000-0000-000000000000"},
        {"path": "/srv/flows"},
        {"entrypoint": None},
        {"entrypoint": "flows.label"},  # a module path: Prefect imports it after pull steps
    ],
)
def test_a_deployment_with_code_to_fetch_loads_as_prefect_does(fields):
    assert warm_worker.local_entrypoint(_deployment(**fields)) is None
    assert warm_worker.local_entrypoint(None) is None
