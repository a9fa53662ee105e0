"""One typed configuration object per labelling round.

Everything a round does is decided by a `RoundConfig`, so the same object
drives the CLI, the Prefect flow parameters and the tests, and a round can be
reproduced from the copy saved under `runs/<round>/config.json`.
Defaults follow the CoTracker3 recipe (DESIGN.md, "The recipe's defaults").
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg")
MISSING_CAPTION_POLICIES = ("keep", "drop", "fail")


def has_userinfo(uri: str | None) -> bool:
    """Whether a URI carries credentials before its host: scheme://user:password@host/...

    AWS secret keys hold '/' and '+', and people paste them unencoded, so a ':' anywhere before the
    first '@' counts too (a bucket or prefix with both is refused: the message says why).
    """
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://(.*)$", str(uri or ""), re.DOTALL)
    if not match or "@" not in match.group(1):
        return False
    before = match.group(1).partition("@")[0]
    return ":" in before or "/" not in before


def dataclass_from_dict(cls, data: dict, what: str):
    """Build a config dataclass from saved JSON, refusing keys it does not know (a typo must not pass silently)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} configuration keys: {', '.join(unknown)}")
    return cls(**data)


@dataclass
class RoundConfig:
    """A labelling round: where videos come from, where results go, and the recipe.

    teachers: registry names, optionally `name=checkpoint_path` to name a file
    (e.g. a student checkpoint becoming the next round's teacher).
    videos: label at most this many eligible videos, taken in a stable order so
    a larger round contains a smaller one and reuses its labels.
    """

    bucket: str
    workspace: str
    round_id: str | None = None
    videos: int | None = None
    teachers: list[str] = field(default_factory=lambda: ["lk"])
    teachers_per_clip: int = 1
    checkpoints: str | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int = 1
    device: str = "auto"
    teacher_batch: int | None = None  # clips per teacher forward; None: 4 on a GPU, 1 on the CPU
    # worker processes for a label batch's CPU stages (decode, SIFT, encode); None: the cores minus one, 0: none
    cpu_workers: int | None = None
    # clips (§3.1): 384x512, 64 frames for an online student, random stride 1..4
    height: int = 384
    width: int = 512
    num_frames: int = 64
    max_stride: int = 4
    min_frames: int | None = None  # shorter clips fail; default min(16, num_frames)
    # queries (App. A): SIFT on 8 keyframes biased to the start, 384 tracks per clip
    num_queries: int = 384
    num_keyframes: int = 8
    # keyframe t is drawn with weight exp(-bias * t / T): early queries give longer tracks; 0 is uniform
    query_start_bias: float = 3.0
    # a keyframe with fewer SIFT points fails the clip; None: a quarter of its share, 0: only the total counts
    query_min_per_keyframe: int | None = None
    # SIFT on keyframes shrunk by this factor, points mapped back (a quarter of the CPU time); 1.0: full size
    query_sift_scale: float = 0.5
    # caption filter
    rules: str | None = None
    captions: str | None = None
    missing_caption: str | None = None  # None: the rules file decides
    # shards
    shard_max_bytes: int = 512 * 1024 * 1024
    shard_max_samples: int = 256
    retry_failed: bool = False
    # a batch's claims on its videos (storage/claims.py) last this long unless renewed (every quarter lease)
    claim_lease_seconds: float = 600.0
    # orchestration: "local" runs batches in this process; "pool" sends each to the label-batch deployment
    executor: str = "local"
    deployment: str | None = None  # default "label-batch/label-batch"

    def __post_init__(self) -> None:
        if self.min_frames is None:
            self.min_frames = min(16, self.num_frames)
        self.validate()

    def validate(self) -> None:
        problems = []
        if not self.bucket:
            problems.append("bucket is empty: give a local directory or s3://bucket/prefix")
        if not self.workspace:
            problems.append("workspace is empty: give a local directory or s3://bucket/prefix")
        for name in ("bucket", "workspace", "captions"):
            if has_userinfo(getattr(self, name)):  # the config is saved and sent to Prefect: no secrets in it
                problems.append(
                    f"the {name} URI carries credentials (user:password@): remove them and give credentials "
                    "through AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or another standard AWS setting"
                )
        if not self.teachers:
            problems.append("no teachers configured: pass at least one, e.g. --teacher lk")
        if self.teachers_per_clip < 1 or self.teachers_per_clip > max(1, len(self.teachers)):
            problems.append(
                f"teachers_per_clip={self.teachers_per_clip} must be between 1 and the number of "
                f"teachers ({len(self.teachers)})"
            )
        if self.teacher_batch is not None and self.teacher_batch < 1:
            problems.append(f"teacher_batch={self.teacher_batch} must be at least 1 (or unset for the default)")
        if self.cpu_workers is not None and self.cpu_workers < 0:
            problems.append(
                f"cpu_workers={self.cpu_workers} must be 0 (CPU stages in the batch's own process), a positive "
                "number of worker processes, or unset for the host's cores minus one"
            )
        if not self.claim_lease_seconds > 0:
            problems.append(f"claim_lease_seconds={self.claim_lease_seconds} must be a positive number of seconds")
        if self.videos is not None and self.videos < 1:
            problems.append(f"videos={self.videos} must be a positive number (or unset for all)")
        for name in ("batch_size", "workers", "num_frames", "num_queries", "num_keyframes", "max_stride"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.query_min_per_keyframe is not None and self.query_min_per_keyframe < 0:
            problems.append(f"query_min_per_keyframe={self.query_min_per_keyframe} must be 0 or more (or unset)")
        if not 0 < self.query_sift_scale <= 1:
            problems.append(f"query_sift_scale={self.query_sift_scale} must be above 0 and at most 1 (full size)")
        if self.query_start_bias < 0:
            problems.append(f"query_start_bias={self.query_start_bias} must be 0 (uniform keyframes) or more")
        if self.height % 2 or self.width % 2 or self.height < 16 or self.width < 16:
            problems.append(f"label resolution {self.height}x{self.width} must be even and at least 16x16")
        if not 1 <= self.min_frames <= self.num_frames:
            problems.append(f"min_frames={self.min_frames} must be between 1 and num_frames={self.num_frames}")
        if self.missing_caption is not None and self.missing_caption not in MISSING_CAPTION_POLICIES:
            problems.append(
                f"missing_caption={self.missing_caption!r}: choose one of {', '.join(MISSING_CAPTION_POLICIES)}"
            )
        if self.executor not in ("local", "pool"):
            problems.append(f"executor={self.executor!r}: choose local (in this process) or pool (label-batch runs)")
        if self.round_id is not None:
            from .storage.layout import validate_round_id

            try:
                validate_round_id(self.round_id)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("invalid round configuration: " + "; ".join(problems))

    def teacher_entries(self) -> list[tuple[str, str | None]]:
        """(name, explicit checkpoint or None) for each configured teacher."""
        entries = []
        for entry in self.teachers:
            name, _, path = entry.partition("=")
            entries.append((name.strip(), path.strip() or None))
        return entries

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> RoundConfig:
        return dataclass_from_dict(cls, data, "round")

    @classmethod
    def from_json_file(cls, path: str | Path) -> RoundConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
