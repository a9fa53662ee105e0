"""Where things live in a workspace, and the names we give them, decided in one place.

Workspace layout (DESIGN.md "Layout"):

    catalog/events/<utc>-<uuid>.parquet      append-only catalog events (storage/catalog.py)
    catalog/snapshots/<utc>-<uuid>.parquet   compacted events
    shards/<round>/<batch>-000000.tar        WebDataset shards, one pattern per writer
    shards/<round>/<batch>-000000.tar.json   the shard's manifest, its commit marker
    runs/<round>/                            config and summary of a round
    runs/<round>/batches/<batch>.json        a pool batch's tally for its round (flows/label_batch.py)
    claims/<hash>/<generation>.json          per-video claims of running batches (storage/claims.py)
    watch/state.parquet, watch/lease/        the bucket watcher's listing and lease (flows/watch_bucket.py)
    reports/                                 evaluation and scaling reports

Names end up inside object keys, WebDataset sample keys and Prefect artifact
keys, so they are restricted to characters all three accept.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

CATALOG = "catalog"
SHARDS = "shards"
RUNS = "runs"
REPORTS = "reports"
MANIFEST_SUFFIX = ".json"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,96}")
# WebDataset keys end at the first dot of the base name; '/' would be a folder inside the tar.
_SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def validate_round_id(round_id: str) -> str:
    """Round ids become folder names and artifact keys; refuse what would break either."""
    if not isinstance(round_id, str) or not _NAME.fullmatch(round_id):
        raise ValueError(f"round id {round_id!r} is not valid: use 1-96 characters of letters, digits, '_' and '-'")
    return round_id


def validate_batch_id(batch_id: str) -> str:
    if not isinstance(batch_id, str) or not _NAME.fullmatch(batch_id):
        raise ValueError(f"batch id {batch_id!r} is not valid: use 1-96 characters of letters, digits, '_' and '-'")
    return batch_id


def new_round_id(now: datetime | None = None) -> str:
    """`round-YYYYmmdd-HHMMSS-xxxx`: sorts by start time; a random tail parts rounds started together."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("round-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def catalog_prefix() -> str:
    return f"{CATALOG}/"


def shards_prefix(round_id: str | None = None) -> str:
    """All shards, or one round's shards (always ending in '/', so 'r1' never matches 'r10')."""
    return f"{SHARDS}/{validate_round_id(round_id)}/" if round_id else f"{SHARDS}/"


def runs_prefix(round_id: str) -> str:
    return f"{RUNS}/{validate_round_id(round_id)}/"


def reports_prefix() -> str:
    return f"{REPORTS}/"


def shard_pattern(round_id: str, batch_id: str) -> str:
    """A `%d` pattern for one writer; the batch id keeps concurrent writers apart (DESIGN.md pitfalls)."""
    return f"{shards_prefix(round_id)}{validate_batch_id(batch_id)}-%06d.tar"


def shard_key(round_id: str, batch_id: str, index: int) -> str:
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return shard_pattern(round_id, batch_id) % index


def manifest_key(shard: str) -> str:
    """The manifest sits beside its shard: `x.tar` -> `x.tar.json`."""
    if not shard.endswith(".tar"):
        raise ValueError(f"shard key {shard!r} must end in .tar")
    return shard + MANIFEST_SUFFIX


def is_manifest(key: str) -> bool:
    return key.endswith(".tar" + MANIFEST_SUFFIX)


def round_of_shard(key: str) -> str | None:
    """'shards/<round>/x.tar' -> '<round>'; None for keys outside the shards folder."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == SHARDS else None


def sample_key(source_key: str, etag: str = "", clip_index: int = 0) -> str:
    """A WebDataset-safe key: a hash of the source key and ETag, then the clip index.

    Hashing keeps keys free of dots and slashes whatever the video is called, and the
    ETag in the hash gives a changed video a new key, so old and new labels never mix.
    Same scheme as tasks/labelling.py used first, so existing shards keep their keys.
    """
    if clip_index < 0:
        raise ValueError(f"clip index must be >= 0, got {clip_index}")
    digest = hashlib.sha256(f"{source_key}\0{etag}".encode()).hexdigest()[:24]
    return f"{digest}_{clip_index:02d}"


def is_sample_key(key: str) -> bool:
    return bool(_SAMPLE_KEY.fullmatch(key))
