"""Security: no pickled code runs, shards hold no pickles, credentials leak nowhere, the dashboard shows data as text.

- Checkpoints: a file carrying a pickled object whose `__reduce__` would run code is refused by every
  teacher's loader, the student's and the training resume, and the code never runs (it would make a folder).
- Shards: every member a round writes is one of the documented fields, none a pickle; `read_shard`
  refuses object arrays and ignores pickle members without unpickling them.
- Credentials: a real round through the CLI, on S3 (SeaweedFS) with distinctive fake AWS credentials and a
  real Prefect server; the CLI's output, the Prefect logs, artifacts, flow and task runs (and the
  server's database file itself), every workspace object (Parquet and tar members decoded) and the
  dashboard's pages are searched for them. A URI carrying user:password@ is refused without echoing it.
- Dashboard: the page over that round shows a caption and a key full of markup as text.
  (Binding 127.0.0.1 by default and refusing every method but GET/HEAD: tests/test_dashboard.py.)
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import videos  # tests/videos.py
from seaweedfs import LEAK_ACCESS_KEY as ACCESS_KEY  # distinctive credentials the test S3 server accepts
from seaweedfs import LEAK_SECRET_KEY as SECRET_KEY
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.config import RoundConfig
from pseudotrack.dashboard import app as dash
from pseudotrack.errors import CheckpointError, ConfigError
from pseudotrack.flows.label_round import run_round
from pseudotrack.storage.uri import open_store
from pseudotrack.tasks.shards import committed_shards, read_shard
from pseudotrack.teachers.base import create_teacher, teacher_names, teacher_spec

PACKAGE = Path(__file__).resolve().parents[1] / "pseudotrack"
SECRETS = (ACCESS_KEY, SECRET_KEY, "pseudotrackSuperSecret")
MARKUP_KEY = "clips/<img src=x onerror=alert(1)> dog.mp4"
MARKUP_CAPTION = '<script>document.title="pwned"</script> a dog runs & <b>jumps</b>'
SMALL = dict(height=96, width=128, num_frames=16, min_frames=8, num_queries=32, num_keyframes=4)


class RunsCode:
    """Unpickling this calls os.mkdir(marker): proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def armed_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose tensors look fine and which also holds a RunsCode object."""
    torch.save({"state_dict": {"weight": torch.zeros(2, 2)}, "payload": RunsCode(marker)}, path)
    return path


# --------------------------------------------------------------------------- (a) checkpoints


def test_armed_checkpoints_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "code-ran"
    probe = armed_checkpoint(tmp_path / "probe.pth", marker)
    torch.load(probe, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.is_dir()
    marker.rmdir()

    from pseudotrack.student.model import build_student
    from pseudotrack.student.train import load_training_checkpoint

    neural = [n for n in teacher_names() if teacher_spec(n).needs_checkpoint]
    assert {"cotracker3_online", "cotracker3_offline", "cotracker2", "tapir", "bootstapir"} <= set(neural)
    loaders = {}
    for name in neural:  # under an official file name, in case a loader looks at it
        path = armed_checkpoint(tmp_path / f"{name}-{teacher_spec(name).checkpoint_names[0]}", marker)
        loaders[f"teacher {name}"] = lambda name=name, path=path: create_teacher(name, path).setup("cpu")
    for variant in ("online", "offline"):
        path = armed_checkpoint(tmp_path / f"student-{variant}.pth", marker)
        loaders[f"student {variant}"] = lambda variant=variant, path=path: build_student(variant, checkpoint=path)
    resume = armed_checkpoint(tmp_path / "step-10.pt", marker)
    loaders["training resume"] = lambda: load_training_checkpoint(resume)
    for what, load in loaders.items():
        with pytest.raises((CheckpointError, pickle.UnpicklingError)) as info:
            load()
        # refused by torch's weights-only unpickler, which names the global it would not call
        assert "mkdir" in str(info.value) and "weights" in str(info.value).lower(), (what, str(info.value)[:300])
        assert not marker.exists(), f"{what} ran the checkpoint's code"


def dotted(node: ast.AST) -> str:
    """`torch.jit.load` for the expression torch.jit.load; "" for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and dotted(n.func) == name]


def test_no_loader_can_unpickle_code():
    """Every torch.load in the package passes weights_only=True; numpy never allows pickles; pickle.load
    only reads TAP-Vid benchmark files (their published format), never checkpoints or shards."""
    torch_loads = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in calls(tree, "torch.load"):
            torch_loads += 1
            flags = {k.arg: k.value for k in node.keywords}
            assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                f"{path.name}:{node.lineno} calls torch.load without weights_only=True"
            )
        for node in [*calls(tree, "np.load"), *calls(tree, "numpy.load")]:
            flags = {k.arg: k.value for k in node.keywords}
            assert not (isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value), (
                f"{path.name}:{node.lineno} lets numpy unpickle"
            )
        for name in ("pickle.load", "pickle.loads", "torch.jit.load"):
            if list(calls(tree, name)):
                assert path.relative_to(PACKAGE).as_posix() == "student/benchmarks.py", f"{name} in {path}"
    assert torch_loads >= 2  # checkpoints.read_state_dict and train.load_training_checkpoint


# --------------------------------------------------------------------------- (b) shards


def small_bucket(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"clip_{i}.mp4").write_bytes(videos.mp4_bytes(videos.translating_frames(24, 96, 128, 1.5, -0.5, i)))
    (root / "broken.mp4").write_bytes(videos.ftyp_then_garbage())
    return root


def is_pickle(data: bytes) -> bool:
    """Pickle protocols 2-5 start with PROTO; older ones with an opcode and end with STOP."""
    return (len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5) or (
        data[:1] in (b"(", b"]", b"}") and data[-1:] == b"."
    )


def test_shards_hold_only_documented_fields_and_no_pickles(tmp_path):
    bucket = small_bucket(tmp_path / "bucket")
    workspace = str(tmp_path / "ws")
    run_round(RoundConfig(bucket=str(bucket), workspace=workspace, round_id="safe", **SMALL))
    store = open_store(workspace)
    manifests = committed_shards(store, "safe")
    assert sum(m["count"] for m in manifests) == 3
    fields = ("tracks", "visibility", "confidence", "quality")  # quality: per-track scores (README, Formats)
    allowed = {"clip.mkv", "json", "queries.npy"} | {f"lk.{f}.npy" for f in fields}
    members = 0
    for manifest in manifests:
        with tarfile.open(store.local_path(manifest["shard"])) as tar:
            for member in tar.getmembers():
                assert member.isfile(), member.name
                key, _, field = member.name.partition(".")
                assert key in manifest["samples"] and field in allowed, member.name
                data = tar.extractfile(member).read()
                assert not is_pickle(data), member.name
                if field.endswith(".npy"):
                    stream = io.BytesIO(data)
                    version = np.lib.format.read_magic(stream)
                    assert version in ((1, 0), (2, 0)), (member.name, version)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                    _, _, dtype = (read_header or np.lib.format.read_array_header_2_0)(stream)
                    assert not dtype.hasobject, member.name
                    np.load(io.BytesIO(data), allow_pickle=False)
                elif field == "json":
                    json.loads(data)
                else:
                    assert data[:4] == b"\x1a\x45\xdf\xa3"  # Matroska
                members += 1
        assert json.loads(store.read_bytes(manifest["shard"] + ".json"))["shard"] == manifest["shard"]
    assert members == 3 * len(allowed)


def test_read_shard_never_unpickles(tmp_path):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(RunsCode(marker))
    clip = videos.mp4_bytes(videos.translating_frames(8, 64, 64, 1, 0))

    def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def npy(array: np.ndarray) -> bytes:
        out = io.BytesIO()
        np.save(out, array, allow_pickle=True)
        return out.getvalue()

    ignored = tmp_path / "ignored.tar"
    with tarfile.open(ignored, "w") as tar:
        member(tar, "k1.mp4", clip)
        member(tar, "k1.json", b"{}")
        member(tar, "k1.queries.npy", npy(np.zeros((2, 3), np.float32)))
        for field in ("pyd", "pickle", "pkl", "lk.extra.pyd"):
            member(tar, f"k1.{field}", payload)
    (sample,) = read_shard(str(ignored))
    assert set(sample) == {"key", "clip", "labels", "meta", "queries"} and not marker.exists()

    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        member(tar, "k2.mp4", clip)
        member(tar, "k2.json", b"{}")
        member(tar, "k2.lk.tracks.npy", npy(np.array([RunsCode(marker)], dtype=object)))
    with pytest.raises(ValueError, match="allow_pickle"):
        list(read_shard(str(hostile)))
    assert not marker.exists()


# --------------------------------------------------------------------------- (c) credentials, (d) dashboard


def assert_clean(data: bytes | str, where: str) -> None:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, f"a credential ({secret[:8]}...) reached {where}"
        if isinstance(data, bytes):
            for encoding in ("utf-16-le", "utf-16-be"):
                assert secret.encode(encoding) not in data, f"a credential reached {where} ({encoding})"


def scan_workspace(store, prefix: str = "") -> int:
    """Every object, with Parquet columns and tar members decoded (compression would hide a raw match)."""
    scanned = 0
    for info in store.list(prefix):
        data = store.read_bytes(info.key)
        assert_clean(data, info.key)
        if info.key.endswith(".parquet"):
            assert_clean(json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str), info.key)
        elif info.key.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    assert_clean(tar.extractfile(member).read(), f"{info.key}:{member.name}")
        scanned += 1
    return scanned


def scan_prefect(prefect_db: list[Path]) -> dict[str, list[str]]:
    """Every flow run (its parameters), task run, log and artifact the server holds, page by page, then its
    database files byte by byte; returns the flow-run names, log messages and artifact keys seen."""
    from conftest import _drain_prefect_workers
    from prefect.client.orchestration import get_client

    _drain_prefect_workers()
    seen: dict[str, list[str]] = {"flow runs": [], "task runs": [], "logs": [], "artifacts": []}
    with get_client(sync_client=True) as client:
        readers = {
            "flow runs": (client.read_flow_runs, lambda r: r.name),
            "task runs": (client.read_task_runs, lambda r: r.name),
            "logs": (client.read_logs, lambda r: r.message),
            "artifacts": (client.read_artifacts, lambda r: r.key or ""),
        }
        for what, (read, label) in readers.items():
            offset = 0
            while page := read(limit=200, offset=offset):
                for item in page:
                    assert_clean(item.model_dump_json(), f"{what}: {label(item)}")
                    seen[what].append(label(item))
                offset += len(page)
    stored = b"".join(path.read_bytes() for path in prefect_db)
    assert_clean(stored, "the Prefect server's database")  # also what the client API above does not show
    assert b"label-summary-secrets" in stored  # the files scanned are the ones that recorded this round
    return seen


def test_credentials_reach_no_log_artifact_file_or_page(
    s3_uri, prefect_server, tmp_path, tmp_path_factory, monkeypatch
):
    import boto3

    bucket_uri, workspace_uri = s3_uri + "/videos", s3_uri + "/workspace"
    name, _, prefix = bucket_uri[len("s3://") :].partition("/")
    client = boto3.client("s3")
    clips = {f"clips/dog_{i}.mp4": videos.translating_frames(24, 96, 128, 1.5, -0.5, i) for i in range(2)}
    clips[MARKUP_KEY] = videos.translating_frames(24, 96, 128, 1, 1, 9)
    for key, frames in clips.items():
        client.put_object(Bucket=name, Key=f"{prefix}/{key}", Body=videos.mp4_bytes(frames))
    client.put_object(Bucket=name, Key=f"{prefix}/clips/broken.mp4", Body=videos.ftyp_then_garbage())
    manifest = "\n".join(
        json.dumps({"key": k, "caption": MARKUP_CAPTION if k == MARKUP_KEY else "a dog runs"}) for k in clips
    )
    client.put_object(Bucket=name, Key=f"{prefix}/captions.jsonl", Body=manifest.encode())

    # the distinctive credentials are the only ones in the environment from here on
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [
        str(Path(sys.executable).with_name("pseudotrack")),
        "round",
        "--bucket",
        bucket_uri,
        "--workspace",
        workspace_uri,
        "--round-id",
        "secrets",
        "--frames",
        "16",
        "--height",
        "96",
        "--width",
        "128",
        "--queries",
        "32",
        "--keyframes",
        "4",
        "--verbose",  # Prefect's logs go to the console too
    ]
    done = subprocess.run(command, capture_output=True, env=env, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output.decode(errors="replace")[-3000:]
    assert b"labelled" in done.stdout and b"round secrets" in output
    assert_clean(output, "the CLI's output")

    store = open_store(workspace_uri)
    assert scan_workspace(store) >= 6  # config, summary, catalog events, a shard and its manifest
    prefect_db = sorted(tmp_path_factory.getbasetemp().glob("prefect-home*/prefect.db*"))
    assert prefect_db, "the Prefect server's database file was not found"
    deadline = time.monotonic() + 60  # the server stores logs a moment after the client ships them
    seen = scan_prefect(prefect_db)
    while not any("round secrets" in message for message in seen["logs"]):
        assert time.monotonic() < deadline, "the round's logs never reached the Prefect server"
        time.sleep(1)
        seen = scan_prefect(prefect_db)
    assert {"label-progress-secrets", "label-summary-secrets"} <= set(seen["artifacts"])
    assert seen["task runs"]

    # the dashboard over that workspace, with the credentials in its environment
    server, thread, url = dash.start_in_thread(dash.Dashboard(workspace_uri))
    try:
        pages = {}
        for path in ("", "api/summary", "dashboard.js"):
            with urllib.request.urlopen(url + path, timeout=60) as response:
                pages[path] = response.read()
            assert_clean(pages[path], f"the dashboard's /{path}")
        previews = json.loads(pages["api/summary"])["previews"]
        assert len(previews) == 3
        for preview in previews:
            with urllib.request.urlopen(f"{url}preview/{preview['sample_key']}.png", timeout=60) as response:
                assert_clean(response.read(), "a preview image")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    page = pages[""].decode()
    # (d) a caption and a key full of markup, labelled by a real round, are shown as text
    assert page.count("<script") == 1 and "<b>jumps" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt; dog.mp4" in page


def test_uris_with_credentials_are_refused_without_echoing_them(tmp_path):
    uri = f"s3://{ACCESS_KEY}:{SECRET_KEY}@some-bucket/videos"
    with pytest.raises(ConfigError) as info:
        RoundConfig(bucket=uri, workspace=str(tmp_path / "ws"))  # before any flow run could record it
    assert "credentials" in str(info.value)
    assert_clean(str(info.value), "the configuration error")
    with pytest.raises(ConfigError) as info:
        open_store(uri)
    assert "s3://some-bucket/videos" in str(info.value)
    assert_clean(str(info.value), "the storage error")
    runner = CliRunner()
    for args in (
        ["round", "--bucket", uri, "--workspace", str(tmp_path / "ws")],
        ["round", "--bucket", str(tmp_path), "--workspace", uri],
        ["status", "--workspace", uri],
        ["dashboard", "--workspace", uri, "--port", "0"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "credentials" in " ".join(result.output.split())
        assert_clean(result.output, f"pseudotrack {args[0]}")
    assert not (tmp_path / "ws").exists()
