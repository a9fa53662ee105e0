"""The warm worker's own parts: settings carried into a forked run, and heartbeats that stop on time.

The worker end to end (a round through the pool, crashed batches) is in test_pool.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pseudotrack.flows import warm_worker


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
    with warm_worker.prompt_heartbeats(engine):
        deadline = time.monotonic() + 5
        while not engine.beats and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine.beats) == 1  # one when the run starts; the next would be 30 s later
    assert time.monotonic() - started < 1.0  # Prefect's own waited for its 1 s sleep to end


def test_no_heartbeats_for_a_final_run_or_when_turned_off():
    final = FakeEngine(seconds=30, final=True)
    with warm_worker.prompt_heartbeats(final):
        time.sleep(0.05)
    assert final.beats == []
    off = FakeEngine(seconds=None)
    with warm_worker.prompt_heartbeats(off):
        time.sleep(0.05)
    assert off.beats == []


def test_this_prefect_has_what_the_prompt_heartbeats_replace(monkeypatch):
    """A Prefect upgrade that moves these fails here, not silently in every worker's runs."""
    import prefect.flow_engine as engine_module

    monkeypatch.setattr(engine_module, "_send_heartbeats", engine_module._send_heartbeats)
    assert warm_worker._install_prompt_heartbeats()
    assert engine_module._send_heartbeats is warm_worker.prompt_heartbeats


@pytest.mark.parametrize("missing", ["_send_heartbeats", "MINIMUM_HEARTBEAT_INTERVAL"])
def test_another_prefect_keeps_its_own_heartbeats(monkeypatch, missing):
    import prefect.flow_engine as engine_module

    monkeypatch.setattr(engine_module, "_send_heartbeats", engine_module._send_heartbeats)
    monkeypatch.delattr(engine_module, missing)
    assert not warm_worker._install_prompt_heartbeats()
    if missing != "_send_heartbeats":
        assert engine_module._send_heartbeats is not warm_worker.prompt_heartbeats
