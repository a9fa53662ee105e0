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
# how a source frame becomes the label size (tasks/decode.py): scale whole, random crop at its aspect, or either
RESIZE_MODES = ("squeeze", "crop", "mixed")


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


LOCAL_BATCH_SIZE = 32  # in process a batch costs next to nothing beyond its videos
# through the pool each batch is a label-batch flow run, a fresh process on a stock worker: its fixed cost is
# spread over this many videos (README, "Batches on stock workers"; bench/bench_orchestration.py)
POOL_BATCH_SIZE = 512


def _help(text: str, option: str | None = None) -> dict:
    """A field's command-line help (and option name when it is not --field-name): the CLI reads it from here."""
    return {"help": text, "option": option} if option else {"help": text}


@dataclass
class RoundConfig:
    """A labelling round: where videos come from, where results go, and the recipe.

    teachers: registry names, optionally `name=checkpoint_path` to name a file
    (e.g. a student checkpoint becoming the next round's teacher).
    videos: label at most this many eligible videos, taken in a stable order so
    a larger round contains a smaller one and reuses its labels.
    """

    bucket: str = field(metadata=_help("Source videos: a local directory or s3://bucket/prefix."))
    workspace: str = field(
        metadata=_help("Where the catalog, shards and reports go: a local directory or s3://bucket/prefix.")
    )
    round_id: str | None = field(
        default=None,
        metadata=_help(
            "Name of the round ([A-Za-z0-9_-]); reuse one to resume it. Default: a new name "
            "(watch: watch-<time>, or the round a crashed run left)."
        ),
    )
    videos: int | None = field(
        default=None, metadata=_help("Label at most this many eligible videos (stable order). Default: all.")
    )
    teachers: list[str] = field(
        default_factory=lambda: ["lk"],
        metadata=_help(
            "Teacher name, repeatable, optionally NAME=CHECKPOINT. Known: lk, cotracker3_online, "
            "cotracker3_offline, cotracker2, tapir, bootstapir.",
            option="--teacher",
        ),
    )
    teachers_per_clip: int = field(default=1, metadata=_help("Teachers run on each clip, chosen at random."))
    checkpoints: str | None = field(
        default=None, metadata=_help("Directory holding the official checkpoint files of the neural teachers.")
    )
    seed: int = field(default=0, metadata=_help("Seed for strides, keyframes, queries and teacher choice."))
    # videos per label batch; None: LOCAL_BATCH_SIZE in process, POOL_BATCH_SIZE through the pool
    batch_size: int | None = field(
        default=None,
        metadata=_help(
            f"Videos per label batch (the unit of work). Default: {LOCAL_BATCH_SIZE} in process, "
            f"{POOL_BATCH_SIZE} through the pool."
        ),
    )
    workers: int = field(default=1, metadata=_help("Label batches run at the same time in this process."))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    teacher_batch: int | None = field(  # clips per teacher forward; None: 4 on a GPU, 1 on the CPU
        default=None,
        metadata=_help("Clips per teacher forward pass (halved on out-of-memory). Default: 4 on a GPU, 1 on CPU."),
    )
    # worker processes for a label batch's CPU stages (decode, SIFT, encode); None: the cores minus one, 0: none
    cpu_workers: int | None = field(
        default=None,
        metadata=_help(
            "Worker processes for a label batch's CPU stages (decode, SIFT, encode), ahead of the teacher. "
            "Default: the cores minus one, shared by the --workers batches run at once; 0: all in the batch's "
            "own process."
        ),
    )
    # clips (§3.1): 384x512, 64 frames for an online student, random stride 1..4
    height: int = field(default=384, metadata=_help("Clip height in pixels (even)."))
    width: int = field(default=512, metadata=_help("Clip width in pixels (even)."))
    num_frames: int = field(
        default=64, metadata=_help("Frames per clip (64 for an online student, up to 80 offline).", option="--frames")
    )
    max_stride: int = field(default=4, metadata=_help("Frame stride is drawn from 1..max-stride."))
    resize: str = field(
        default="mixed",
        metadata=_help(
            "How frames become the clip size: squeeze (whole frame), crop (random crop at the video's aspect) "
            "or mixed (either, per video, as the authors' loader)."
        ),
    )
    min_frames: int | None = field(  # shorter clips fail; default min(16, num_frames)
        default=None, metadata=_help("Videos with fewer frames fail. Default: min(16, frames).")
    )
    # queries (App. A): SIFT on 8 keyframes biased to the start, 384 tracks per clip
    num_queries: int = field(default=384, metadata=_help("Query points (tracks) per clip.", option="--queries"))
    num_keyframes: int = field(default=8, metadata=_help("Keyframes SIFT samples queries on.", option="--keyframes"))
    # keyframe t is drawn with weight exp(-bias * t / T): early queries give longer tracks; 0 is uniform
    query_start_bias: float = field(
        default=3.0, metadata=_help("Keyframe t is drawn with weight exp(-bias*t/T): early queries last; 0: uniform.")
    )
    # a keyframe with fewer SIFT points fails the clip; None: a quarter of its share, 0: only the total counts
    query_min_per_keyframe: int | None = field(
        default=None,
        metadata=_help("A keyframe with fewer SIFT points fails the clip. Default: a quarter of its share; 0: off."),
    )
    # SIFT on keyframes shrunk by this factor, points mapped back (a quarter of the CPU time); 1.0: full size
    query_sift_scale: float = field(
        default=0.5,
        metadata=_help("SIFT runs on keyframes shrunk by this factor, points mapped back to full size; 1: full size."),
    )
    # caption filter
    rules: str | None = field(
        default=None, metadata=_help("Caption rules file (TOML). Default: the packaged CoTracker3 rules.")
    )
    captions: str | None = field(
        default=None, metadata=_help("Caption manifest (JSONL/CSV/Parquet). Default: captions.* in the bucket.")
    )
    missing_caption: str | None = field(  # None: the rules file decides
        default=None, metadata=_help("Videos without a caption: keep, drop or fail. Default: the rules file's.")
    )
    # shards
    shard_max_bytes: int = field(default=512 * 1024 * 1024, metadata=_help("A shard closes at this many bytes."))
    shard_max_samples: int = field(default=256, metadata=_help("A shard closes at this many samples."))
    retry_failed: bool = field(
        default=False, metadata=_help("Label again the videos that failed in earlier runs (unchanged ones too).")
    )
    # a batch's claims on its videos (storage/claims.py) last this long unless renewed (every quarter lease)
    claim_lease_seconds: float = field(
        default=600.0, metadata=_help("A batch's claim on its videos lapses after this long unless renewed.")
    )
    # label quality (tasks/quality.py): the forward-backward check runs on this fraction of clips (drawn per
    # video from the seed); tracks scored below min_track_quality are kept in the shard but not supervised;
    # a video whose mean score is below min_sample_quality is filtered ("quality: <value> < S"); None: off
    quality_sample: float = field(
        default=0.05,
        metadata=_help(
            "Fraction of clips whose labels are also checked forward-backward (doubles their teacher time)."
        ),
    )
    min_track_quality: float | None = field(
        default=None,
        metadata=_help(
            "Tracks scored below this (0..1) stay in the shard, flagged, and are not supervised. Default: off."
        ),
    )
    min_sample_quality: float | None = field(
        default=None,
        metadata=_help(
            "A video whose mean track score is below this (0..1) is filtered with the reason. Default: off."
        ),
    )
    # each round labels this many generated scenes with each teacher and records δ_avg, AJ and OA (0: off)
    calibration_scenes: int = field(
        default=3,
        metadata=_help("Generated scenes each teacher is calibrated on per round (δ_avg, AJ, OA); 0 turns it off."),
    )
    # orchestration: "local" runs batches in this process; "pool" sends each to the label-batch deployment
    executor: str = field(
        default="local",
        metadata=_help(
            "local: batches run in this process; pool: each batch is a flow run of the label-batch "
            "deployment (needs a Prefect server and workers)."
        ),
    )
    deployment: str | None = field(  # default "label-batch/label-batch"
        default=None, metadata=_help("Deployment of --executor pool. Default: label-batch/label-batch.")
    )

    def __post_init__(self) -> None:
        if self.min_frames is None:
            self.min_frames = min(16, self.num_frames)
        if self.batch_size is None:
            self.batch_size = POOL_BATCH_SIZE if self.executor == "pool" else LOCAL_BATCH_SIZE
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
        if self.resize not in RESIZE_MODES:
            problems.append(
                f"resize={self.resize!r}: choose squeeze (whole frame scaled to the clip size), crop (a random "
                "crop at the video's own aspect) or mixed (either, drawn per video)"
            )
        if self.missing_caption is not None and self.missing_caption not in MISSING_CAPTION_POLICIES:
            problems.append(
                f"missing_caption={self.missing_caption!r}: choose one of {', '.join(MISSING_CAPTION_POLICIES)}"
            )
        for name, optional in (("quality_sample", False), ("min_track_quality", True), ("min_sample_quality", True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value!r} must be a number between 0 and 1" + (" (or unset)" * optional))
        if isinstance(self.calibration_scenes, bool) or not isinstance(self.calibration_scenes, int):
            problems.append(f"calibration_scenes={self.calibration_scenes!r} must be a whole number (0: off)")
        elif self.calibration_scenes < 0:
            problems.append(f"calibration_scenes={self.calibration_scenes} must be 0 (off) or more")
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
