"""WebDataset shard writing and reading, with a manifest per shard as its commit marker.

A shard is written to a local temporary tar, uploaded whole (an atomic rename
locally, a single PUT or multipart upload on S3), and only then is its JSON
manifest written beside it. Readers and the catalog count a shard only once
its manifest exists, so a crash at any point never exposes half a shard. The
manifest also carries the catalog rows of its samples, so a round that dies
between committing a shard and writing the catalog can recover them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from .. import __version__
from ..faults import fault_point
from ..storage.layout import MANIFEST_SUFFIX, is_manifest, manifest_key, shard_key, shards_prefix
from ..teachers.base import TeacherOutput
from .clip_codec import CLIP_FIELD, LEGACY_CLIP_FIELDS
from .quality import quality_field

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One labelled clip, as stored in a shard (DESIGN.md "Shards")."""

    key: str
    clip: bytes  # encoded frames exactly as the teachers saw them (clip_codec.encode_clip), field CLIP_FIELD
    queries: np.ndarray  # float32 [N, 3] (t, x, y)
    labels: dict[str, TeacherOutput]  # teacher name -> its pseudo-labels
    meta: dict = field(default_factory=dict)
    # teacher name -> per-track quality scores float32 [N] (tasks/quality.py); field `<teacher>.quality.npy`.
    # Shards written before scores existed have none: readers treat their quality as unknown, never as zero.
    quality: dict[str, np.ndarray] = field(default_factory=dict)

    def to_record(self) -> dict:
        record: dict = {
            "__key__": self.key,
            CLIP_FIELD: self.clip,
            "queries.npy": np.asarray(self.queries, np.float32),
        }
        for name, out in self.labels.items():
            record[f"{name}.tracks.npy"] = out.tracks
            record[f"{name}.visibility.npy"] = out.visibility
            record[f"{name}.confidence.npy"] = out.confidence
            if name in self.quality:
                record[quality_field(name)] = np.asarray(self.quality[name], np.float32)
        record["json"] = json.dumps(to_jsonable(self.meta), sort_keys=True).encode("utf-8")
        return record


def to_jsonable(value):
    """JSON has no numpy scalars or arrays; convert them (webdataset's json encoder rejects them)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class CommittedShard:
    key: str  # object key of the tar in the workspace
    manifest_key: str
    sample_keys: list[str]
    num_bytes: int
    rows: list[dict]  # catalog rows of the samples, shard_id filled in


class ShardSink:
    """Collects samples of one label batch into shards under `shards/<round>/<batch_id>-NNNNNN.tar`.

    Each batch has its own name pattern, so concurrent writers never collide, and
    the names are deterministic, so a re-run of the same batch overwrites rather
    than duplicates.
    """

    def __init__(
        self,
        workspace,
        round_id: str,
        batch_id: str,
        max_bytes: int = 512 * 1024 * 1024,
        max_samples: int = 256,
        keep: Callable[[str], bool] | None = None,
    ):
        self.workspace = workspace
        self.keep = keep  # video key -> whether the batch still holds its claim (storage/claims.py)
        self.round_id = round_id
        self.batch_id = batch_id
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self._index = 0
        self._tmpdir = tempfile.TemporaryDirectory(prefix="pseudotrack-shard-")
        self._writer: wds.TarWriter | None = None
        self._path: Path | None = None
        self._samples: list[str] = []
        self._rows: list[dict] = []
        self._teachers: Counter = Counter()
        self._bytes = 0

    def _open(self) -> None:
        self._path = Path(self._tmpdir.name) / f"shard-{self._index:04d}.tar"
        self._writer = wds.TarWriter(str(self._path))
        self._samples, self._rows, self._teachers, self._bytes = [], [], Counter(), 0

    def add(self, sample: Sample, row: dict) -> list[CommittedShard]:
        """Write one sample; returns the shard it completed, if any.

        A sample whose claim the batch lost (it froze for a whole lease and another
        batch took the video over) is not written: that batch labels it.
        """
        if self.keep is not None and not self.keep(row["video_key"]):
            log.warning("not writing %s: its claim passed to another batch, which labels it", row["video_key"])
            return []
        if self._writer is None:
            self._open()
        assert self._writer is not None
        record = sample.to_record()
        self._writer.write(record)
        fault_point("shard.sample_written")  # crash tests: a tar half written, in a local temporary folder
        self._bytes += sum(len(v) if isinstance(v, bytes) else getattr(v, "nbytes", 0) for v in record.values())
        self._samples.append(sample.key)
        self._teachers.update(list(sample.labels))
        self._rows.append(row)
        if len(self._samples) >= self.max_samples or self._bytes >= self.max_bytes:
            return [self._commit()]
        return []

    def close(self) -> list[CommittedShard]:
        try:
            return [self._commit()] if self._writer is not None else []
        finally:
            self._tmpdir.cleanup()

    def abort(self) -> None:
        """Drop the shard in progress: nothing of it becomes visible."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmpdir.cleanup()

    def _commit(self) -> CommittedShard:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        self._writer = None
        fault_point("shard.closed")
        key = shard_key(self.round_id, self.batch_id, self._index)
        self._index += 1
        size = self._path.stat().st_size
        digest = _sha256(self._path)
        self.workspace.put_file(str(self._path), key)
        fault_point("shard.uploaded")  # crash tests: the tar is there, its manifest (the commit) is not
        # event ids fixed by the shard, so a recovery after a crash cannot double an event
        rows = [dict(row, shard_id=key, event_id=f"{key}#{i}") for i, row in enumerate(self._rows)]
        manifest = {
            "shard": key,
            "round_id": self.round_id,
            "samples": self._samples,
            "count": len(self._samples),
            "teachers": dict(self._teachers),
            "bytes": size,
            "sha256": digest,
            "created_at": time.time(),
            "pseudotrack_version": __version__,
            "rows": to_jsonable(rows),
        }
        marker = manifest_key(key)
        self.workspace.write_bytes(marker, json.dumps(manifest, indent=1).encode("utf-8"))
        fault_point("shard.committed")  # crash tests: committed, its catalog events not yet written
        os.unlink(self._path)
        return CommittedShard(key, marker, list(self._samples), size, rows)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def committed_shards(workspace, round_id: str | None = None) -> list[dict]:
    """Manifests of the committed shards (of one round, or all), sorted by shard key."""
    manifests = []
    for info in workspace.list(shards_prefix(round_id)):
        if is_manifest(info.key):
            manifests.append(json.loads(workspace.read_bytes(info.key)))
    return sorted(manifests, key=lambda m: m["shard"])


def recover_committed(workspace, catalog) -> int:
    """Catalogue the samples of committed shards, of any round, whose catalog events a crash lost.

    Runs before a round plans (and in a batch that took over another's claims), so a video whose
    shard was committed is never labelled again, whichever round runs next. Only manifests of
    shards the catalog has never heard of are read. The rows keep the event ids fixed when the
    shard was committed, so a recovery racing the shard's own writer doubles nothing (the catalog
    keeps one event per id), and their commit time, so they sort where they happened.
    """
    known = catalog.shard_ids()
    rows: list[dict] = []
    for info in workspace.list(shards_prefix()):
        if not is_manifest(info.key) or info.key[: -len(MANIFEST_SUFFIX)] in known:
            continue
        try:
            manifest = json.loads(workspace.read_bytes(info.key))
        except FileNotFoundError:
            continue
        for row in manifest.get("rows", []):
            rows.append(dict(row, created_at=row.get("created_at") or manifest.get("created_at")))
    if rows:
        catalog.append(rows)
    return len(rows)


def decode_sample(raw: dict) -> dict:
    """A raw webdataset record -> {key, clip, queries, labels: {teacher: {tracks, visibility, confidence}}, meta}.

    A teacher's labels also hold `quality` (float32 [N] scores) when the shard has them; shards
    written before the scores existed have no such key (unknown quality, see `sample_track_quality`).

    `clip` is the stored clip's bytes (clip_codec.decode_clip_bytes reads them), from the field
    CLIP_FIELD or, in shards written before it, the field `mp4` (an MJPEG AVI).
    """
    clip_fields = (CLIP_FIELD, *LEGACY_CLIP_FIELDS)
    clip = next((raw[name] for name in clip_fields if name in raw), None)
    if clip is None:
        raise ValueError(f"sample {raw.get('__key__')!r} has no clip (none of the fields {', '.join(clip_fields)})")
    out: dict = {"key": raw["__key__"], "clip": clip, "labels": {}}
    for name, value in raw.items():
        if name.startswith("__") or name in clip_fields:
            continue
        if name == "json":
            out["meta"] = json.loads(value)
        elif name == "queries.npy":
            out["queries"] = np.load(io.BytesIO(value), allow_pickle=False)
        elif name.endswith(".npy"):
            teacher, field_name, _ = name.split(".")
            out["labels"].setdefault(teacher, {})[field_name] = np.load(io.BytesIO(value), allow_pickle=False)
    return out


def read_shard(url: str) -> Iterator[dict]:
    """Iterate the decoded samples of one shard (local path or s3:// URL)."""
    if url.startswith("s3://"):
        from ..storage.s3 import register_s3_gopen

        register_s3_gopen()
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False)
    for raw in dataset:
        yield decode_sample(raw)


def sample_track_quality(sample: dict, teacher: str) -> np.ndarray | None:
    """A decoded sample's per-track scores of one teacher, float32 [N]; None when unknown (older shards)."""
    scores = sample.get("labels", {}).get(teacher, {}).get("quality")
    return None if scores is None else np.asarray(scores, np.float32)
