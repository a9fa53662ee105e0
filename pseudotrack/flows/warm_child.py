"""What a warm worker's forked flow run changes in Prefect's engine, so that a batch ends when its work ends.

A label batch is a whole flow run: at 32 videos a batch, every tenth of a second
the engine spends around the batch is 3 ms per video of orchestration overhead
(bench/bench_orchestration.py). Three of Prefect's per-run costs are waits or
repeated set-up, not work, and are changed here, only in the warm worker's
processes:

- the heartbeat thread sleeps in one-second steps and is joined when the run ends
  (`prompt_heartbeats`: the same beats, a wait that ends when told);
- the suspension observer's thread checks for its stop every 0.2 s and is joined
  when the run ends (`prompt_suspension_observer`: the same observer, stopped at once);
- every API client parses the CA bundle again to build its TLS context, 65 ms each
  and four clients a run (`share_api_tls_context`: one context per bundle, built
  once in the fork server).

Each replacement is installed only if this Prefect still has the hooks it relies
on (tests/test_warm_worker.py fails when an upgrade moves them); otherwise the
run keeps Prefect's own behaviour and only the saving is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ssl
import threading
from collections.abc import Iterator
from typing import Any

# ----------------------------------------------------------------------------- heartbeats


@contextlib.contextmanager
def prompt_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Prefect's flow-run heartbeats, stopping the moment the run ends.

    Prefect's own heartbeat thread sleeps in one-second steps and the engine joins it
    when the run ends, so every run finished up to a second late: half a second per
    batch on average, 15 ms a video at 32 videos a batch.
    The beats are the same: one when the run starts, then one every heartbeat interval,
    none once the run's state is final; only the wait ends as soon as it is told to.
    """
    from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL

    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    seconds = max(seconds, MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            state = engine.flow_run.state if engine.flow_run else None
            if state is not None and state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)

    # the run's context (its settings, so its API URL) goes with the thread, as Prefect's own does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install_prompt_heartbeats() -> bool:
    """Use `prompt_heartbeats` in this process if this Prefect has the hooks it relies on."""
    import prefect.flow_engine as engine_module

    base = getattr(engine_module, "BaseFlowRunEngine", None)
    needed = ("heartbeat_seconds", "_build_heartbeat_event_template", "_emit_flow_run_heartbeat")
    present = all(hasattr(engine_module, name) for name in ("_send_heartbeats", "MINIMUM_HEARTBEAT_INTERVAL"))
    if not present or not all(hasattr(base, name) for name in needed):
        return False  # another Prefect: keep its heartbeats as they are
    engine_module._send_heartbeats = prompt_heartbeats
    return True


# ----------------------------------------------------------------------------- suspension observer


class SuspensionObserver:
    """Prefect's suspension observer for one flow run, on its own thread, told to stop rather than polled.

    Like Prefect's: the observer (events stream, polling if the stream is down) runs
    on its own thread and event loop, and the run starts once it watches the flow run,
    so a suspension asked for at any time reaches the run. Prefect's thread looks for
    its stop every 0.2 s and is joined when the run ends (0.16 s a batch measured);
    this one wakes on the stop itself. It can also start before the engine asks for
    it (`start_early`), so that connecting to the events stream overlaps loading the
    run; a suspension seen before the engine hands over its request is kept for it.
    """

    def __init__(self, flow_run_id: Any, polling_interval: float = 10.0) -> None:
        self.flow_run_id = flow_run_id
        self.polling_interval = polling_interval
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._request: Any = None
        self._seen: Any = None  # a suspended state seen before a request was bound
        self._thread: threading.Thread | None = None

    def bind(self, suspension_request: Any) -> None:
        with self._lock:
            self._request = suspension_request
            seen, self._seen = self._seen, None
        if seen is not None:
            suspension_request.mark_requested(seen)

    def _mark_suspended(self, flow_run_id: Any, state: Any) -> None:
        from prefect._flow_run_suspension import mark_flow_run_suspension_requested

        if mark_flow_run_suspension_requested(flow_run_id, state):
            return
        with self._lock:
            if self._request is None:
                self._seen = state
                return
            request = self._request
        request.mark_requested(state)

    def start(self) -> SuspensionObserver:
        from prefect.logging.loggers import get_logger

        logger = get_logger("flow_run_suspension")

        async def observe() -> None:
            from prefect._internal.observers import FlowRunSuspendingObserver

            observer = FlowRunSuspendingObserver(
                on_suspended=self._mark_suspended, polling_interval=self.polling_interval
            )
            async with observer:
                await observer.watch_flow_run_id(self.flow_run_id)
                self.ready.set()
                await asyncio.get_running_loop().run_in_executor(None, self._stop.wait)

        def run() -> None:
            try:
                asyncio.run(observe())
            except Exception:
                logger.debug("Flow run suspension observer exited with an exception", exc_info=True)
            finally:
                self.ready.set()

        # the context (settings, so the API URL) goes with the thread, as in Prefect's
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


_early: SuspensionObserver | None = None


def start_early(flow_run_id: str) -> SuspensionObserver:
    """Start this flow run's suspension observer now; the engine's request for one will take it over."""
    from uuid import UUID

    global _early
    _early = SuspensionObserver(UUID(flow_run_id)).start()
    return _early


def stop_early() -> None:
    """Stop an observer started early that the engine never took over (a run it did not get to)."""
    global _early
    observer, _early = _early, None
    if observer is not None:
        observer.stop()


@contextlib.contextmanager
def prompt_suspension_observer(
    flow_run_id: Any, suspension_request: Any, polling_interval: float = 10.0
) -> Iterator[None]:
    """What the engine enters around a deployment's flow run: the observer started early, or a new one."""
    global _early
    observer, _early = _early, None
    if observer is None or observer.flow_run_id != flow_run_id or observer.polling_interval != polling_interval:
        if observer is not None:
            observer.stop()
        observer = SuspensionObserver(flow_run_id, polling_interval).start()
    observer.bind(suspension_request)
    observer.ready.wait()
    try:
        yield
    finally:
        observer.stop()


def install_prompt_suspension_observer() -> bool:
    """Use `prompt_suspension_observer` in this process if this Prefect has the hooks it relies on."""
    import prefect.flow_engine as engine_module

    try:
        from prefect._flow_run_suspension import mark_flow_run_suspension_requested  # noqa: F401
        from prefect._internal.observers import FlowRunSuspendingObserver
    except ImportError:
        return False
    if not hasattr(engine_module, "observe_flow_run_suspension") or not hasattr(
        FlowRunSuspendingObserver, "watch_flow_run_id"
    ):
        return False
    engine_module.observe_flow_run_suspension = prompt_suspension_observer
    return True


# ----------------------------------------------------------------------------- TLS context of API clients


def share_api_tls_context() -> bool:
    """Give every Prefect API client of this process one verified TLS context per CA bundle.

    Prefect builds a new `ssl.SSLContext` for each API client it creates and loads
    the whole CA bundle into it; a flow run creates four clients. Called in the fork
    server, the context is built there once and every forked run reuses it. A client
    given its own `verify`, or running with PREFECT_API_TLS_INSECURE_SKIP_VERIFY, is
    left as Prefect makes it; a CA bundle changed on disk is read by a restarted worker.
    """
    from prefect.client import orchestration
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    classes = [getattr(orchestration, name, None) for name in ("PrefectClient", "SyncPrefectClient")]
    if not all(isinstance(cls, type) for cls in classes) or not hasattr(orchestration, "certifi"):
        return False
    contexts: dict[str, ssl.SSLContext] = {}
    lock = threading.Lock()

    def verified_context() -> ssl.SSLContext | None:
        if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
            return None
        cafile = PREFECT_API_SSL_CERT_FILE.value() or orchestration.certifi.where()
        with lock:
            if cafile not in contexts:
                contexts[cafile] = ssl.create_default_context(cafile=cafile)
            return contexts[cafile]

    for cls in classes:
        if getattr(cls.__init__, "_shares_tls_context", False):
            continue
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self: Any, api: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            settings = dict(kwargs.pop("httpx_settings", None) or {})
            if "verify" not in settings and (context := verified_context()) is not None:
                settings["verify"] = context
            _original(self, api, *args, httpx_settings=settings, **kwargs)

        __init__._shares_tls_context = True  # type: ignore[attr-defined]
        cls.__init__ = __init__
    verified_context()  # now, in the fork server, so that no run pays for it
    return True
