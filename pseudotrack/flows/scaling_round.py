"""The `scaling-round` and `scaling-study` flows: the paper's Figure 1 (metrics against the number of videos).

A scaling round for size N labels the first N eligible videos of the bucket
(`RoundConfig.videos = N`: stable order, counted after the caption filter, so a
larger round holds a smaller one and reuses its labels); a video that fails to
label (a broken file) does not count, so the round takes the next eligible
ones until N are labelled or the bucket runs out. It trains a student on
exactly those N videos' labels, and evaluates it (TAP-Vid AJ, δ_avg, OA).
Results, table and figure give the number of videos actually labelled. A study
runs one scaling round per size, smallest first, then writes into the workspace

    scaling/<study>/n<N>.json      one size's result (a re-run with the same settings reuses it)
    scaling/<study>/results.json   every size, the starting checkpoint's metrics, the settings
    scaling/<study>/table.md       the same as a table
    scaling/<study>/figure1.png    AJ, δ_avg and OA against the number of videos (log axis)

Round ids come from the size (`scale-n<N>`), so a study run again resumes its
rounds; students train under `<train.output>/n<N>` and resume from their last
checkpoint. The training set of size N is found in the catalog, not by round:
the labels of the first N eligible videos may sit in shards of several rounds
(the smaller sizes', or a watcher's), and only those shards are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from ..config import RoundConfig, dataclass_from_dict
from ..errors import ConfigError
from ..storage.layout import manifest_key, validate_round_id
from ..storage.uri import open_store
from ..student.train import TrainConfig
from .scaling_plot import METRICS
from .summary import artifact_key

SCALING = "scaling"
PAPER_SIZES = (100, 1000, 5000, 15000, 30000, 100000)

# on_progress(event, payload): the study's "size", "stage", "train", "eval" and "skipped" events and, while a size
# is labelled, its round's events ("planned", "labelled", "failed", "done"; flows/label_round.py)
OnProgress = Callable[[str, dict], None]


def _ignore(event: str, payload: dict) -> None:
    return None


def _in_flow() -> bool:
    return FlowRunContext.get() is not None


# --------------------------------------------------------------------------- configuration


@dataclass
class EvalSettings:
    """How each student is evaluated: the synthetic benchmark (generated, exact ground truth) or a TAP-Vid path.

    resize_to / one_query_at_a_time: the TAP-Vid protocol (256x256, one query per call) by default;
    cheaper settings are for smoke tests and are reported with the results.
    synthetic_*: the generated scenes (seeds from `seed`, never those of demo buckets).
    """

    benchmark: str = "synthetic"
    videos: int = 8
    query_mode: str = "first"
    resize_to: tuple[int, int] | None = (256, 256)
    one_query_at_a_time: bool = True
    seed: int = 1000
    synthetic_frames: int = 24
    synthetic_size: tuple[int, int] = (256, 256)
    synthetic_points: int = 64

    def __post_init__(self) -> None:
        self.resize_to = tuple(self.resize_to) if self.resize_to is not None else None  # type: ignore[assignment]
        self.synthetic_size = tuple(self.synthetic_size)  # type: ignore[assignment]
        problems = []
        if self.query_mode not in ("first", "strided"):
            problems.append(f"query_mode={self.query_mode!r}: choose first or strided")
        if self.videos < 1:
            problems.append(f"videos={self.videos} must be at least 1")
        if self.benchmark != "synthetic" and not Path(self.benchmark).exists():
            problems.append(f"benchmark {self.benchmark!r} is neither 'synthetic' nor an existing TAP-Vid path")
        if problems:
            raise ConfigError("invalid evaluation settings: " + "; ".join(problems))


@dataclass
class ScalingConfig:
    """One scaling round (or, with a list of sizes, a study): the labelling round, the training, the evaluation.

    round:  the labelling round; its `videos` and `round_id` are set per size.
    train:  the student training; its `output` is the folder under which each size trains (`n<N>/`),
            its `workspace` must be the round's; `steps` None trains one step per video at batch 32.
    eval:   how each student is evaluated.
    videos: N of this scaling round (a study sets it per size).
    study:  the name of the study's folder under `scaling/` in the workspace.
    """

    round: RoundConfig
    train: TrainConfig
    eval: EvalSettings = field(default_factory=EvalSettings)
    videos: int | None = None
    study: str = "study"
    round_prefix: str = "scale-n"

    def __post_init__(self) -> None:
        problems = []
        if self.train.workspace != self.round.workspace:
            problems.append(
                f"train.workspace={self.train.workspace!r} differs from round.workspace={self.round.workspace!r}: "
                "the student trains on the round's shards"
            )
        if self.videos is not None and self.videos < 1:
            problems.append(f"videos={self.videos} must be a positive number of videos")
        for name, value in (("study", self.study), ("round_prefix", self.round_prefix + "1")):
            try:
                validate_round_id(value)
            except ValueError:
                problems.append(f"{name}={value!r}: use letters, digits, '_' and '-' only")
        if problems:
            raise ConfigError("invalid scaling configuration: " + "; ".join(problems))

    def for_size(self, videos: int) -> ScalingConfig:
        return replace(self, videos=videos)

    def round_id(self) -> str:
        return f"{self.round_prefix}{self.size()}"

    def round_config(self) -> RoundConfig:
        return replace(self.round, videos=self.size(), round_id=self.round_id())

    def train_config(self) -> TrainConfig:
        return replace(self.train, output=str(Path(self.train.output) / f"n{self.size()}"), rounds=None)

    def size(self) -> int:
        if self.videos is None:
            raise ConfigError("a scaling round needs its number of videos (ScalingConfig.videos)")
        return self.videos

    def to_dict(self) -> dict:
        return {
            "round": asdict(self.round),
            "train": self.train.to_dict(),
            "eval": asdict(self.eval),
            "videos": self.videos,
            "study": self.study,
            "round_prefix": self.round_prefix,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ScalingConfig:
        data = dict(data)
        for name, build in (
            ("round", RoundConfig.from_dict),
            ("train", TrainConfig.from_dict),
            ("eval", lambda d: dataclass_from_dict(EvalSettings, d, "evaluation")),
        ):
            if isinstance(data.get(name), dict):
                data[name] = build(data[name])
        return dataclass_from_dict(cls, data, "scaling")

    @classmethod
    def from_json_file(cls, path: str | Path) -> ScalingConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- the training set of a size


def first_eligible(round_config: RoundConfig) -> list:
    """The first N eligible videos of the bucket (PlannedVideo: key, size, ETag), as a round of N plans them.

    Nothing is written: the plan is made against an empty done set, so every video counts as new.
    """
    from ..tasks.discover import discover
    from .label_round import plan_round

    bucket = open_store(round_config.bucket)
    discovery = discover(bucket)
    planned, _, _ = plan_round(round_config, bucket, discovery.videos, discovery.all_keys, {})
    return planned


def label_size(config: ScalingConfig, on_progress: OnProgress | None = None) -> tuple[RoundConfig, list, dict]:
    """Label the first eligible videos until N of them are labelled: (round config, videos walked, counts).

    A round of N eligible videos may label fewer (a broken file fails); the round is run again over
    as many more eligible videos as it fell short, which reuses what it did and labels only the new
    ones, until N are labelled or the bucket has no more eligible videos. Counts sum the passes.
    """
    from .events import training_follows
    from .label_round import run_label_round_flow, run_round

    notify = on_progress or _ignore
    size = config.size()
    round_config = config.round_config()
    counts: dict[str, int] = {}
    while True:
        # inside a flow the round is a child flow run, so the UI shows it on its own; its completion event
        # says this flow trains on it, so train-student's trigger does not train a second student (events.py)
        with training_follows():
            if _in_flow():
                summary = run_label_round_flow(round_config, on_progress)
            else:
                summary = run_round(round_config, on_progress=on_progress).to_dict()
        for name in ("labelled", "filtered", "failed"):
            counts[name] = counts.get(name, 0) + summary[name]
        counts.setdefault("reused", summary["reused"])  # the first pass's: later ones reuse their own labels
        videos = first_eligible(round_config)
        short = size - len(labelled_videos(config.round.workspace, videos))
        if short <= 0 or len(videos) < (round_config.videos or 0):
            return round_config, videos, counts
        notify("stage", {"videos": size, "stage": "labelling more", "short": short, "round_id": config.round_id()})
        round_config = replace(round_config, videos=len(videos) + short)


def labelled_videos(workspace_uri: str, videos: list) -> dict[str, str]:
    """{video key: shard} of `videos` whose latest catalog event is `labelled` with the listed ETag."""
    from ..storage.catalog import Catalog

    wanted = {v.key: v.etag for v in videos}
    latest = Catalog(open_store(workspace_uri)).latest().select(["video_key", "etag", "status", "shard_id"])
    columns = latest.to_pydict()
    return {
        key: shard
        for key, etag, status, shard in zip(
            columns["video_key"], columns["etag"], columns["status"], columns["shard_id"], strict=True
        )
        if status == "labelled" and shard and wanted.get(key) == etag
    }


def training_shards(workspace_uri: str, videos: list) -> tuple[list, dict]:
    """(ShardRefs holding the labels of `videos`, counts): found through the catalog's latest state.

    A video counts if its latest event is `labelled` with the listed ETag; a shard also holding
    labels of other videos (a watcher's round mixing old and new) is read whole, and `extra`
    says how many such samples came along.
    """
    from ..student.data import ShardRef

    store = open_store(workspace_uri)
    found = labelled_videos(workspace_uri, videos)
    labelled = len(found)
    shards: dict[str, int] = {}
    for shard in found.values():
        shards[shard] = shards.get(shard, 0) + 1
    refs = []
    for shard in sorted(shards):
        manifest = json.loads(store.read_bytes(manifest_key(shard)))
        refs.append(ShardRef(store.uri(shard), int(manifest["count"])))
    counts = {"videos": len(videos), "labelled": labelled, "extra": sum(r.count for r in refs) - labelled}
    return refs, counts


# --------------------------------------------------------------------------- evaluation


def benchmark_clips(settings: EvalSettings) -> list:
    from .train_student import benchmark_videos

    return benchmark_videos(
        settings.benchmark,
        settings.videos,
        seed=settings.seed,
        num_frames=settings.synthetic_frames,
        size=settings.synthetic_size,
        num_points=settings.synthetic_points,
    )


def evaluate_checkpoint(
    checkpoint: str, config: ScalingConfig, clips: list, size: int = 0, on_progress: OnProgress | None = None
) -> dict:
    """AJ, δ_avg, OA (and the per-threshold numbers) of one checkpoint under the study's protocol.

    size: the number of videos it was trained on, for progress reports (0: the starting checkpoint).
    """
    notify = on_progress or _ignore
    from .train_student import evaluate_student

    s = config.eval

    def progress(done: int, total: int) -> None:
        notify("eval", {"videos": size, "done": done, "total": total})

    report = evaluate_student(
        checkpoint,
        s.benchmark,
        s.query_mode,
        config.train.variant,
        s.videos,
        device=config.train.device,
        clips=clips,
        resize_to=s.resize_to,
        one_query_at_a_time=s.one_query_at_a_time,
        progress=progress,
    )
    return {"metrics": report["metrics"], "protocol": report["info"]["protocol"], "videos": report["videos"]}


# --------------------------------------------------------------------------- one size


def _fingerprint(config: ScalingConfig, shards: list) -> str:
    """What a size's result depends on: a re-run with the same settings and training set reuses it."""
    data = config.to_dict()
    data["round"] = {k: v for k, v in data["round"].items() if k not in ("workers", "executor", "deployment")}
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("workers", "checkpoint_every", "log_every")}
    data.pop("study")
    data["shards"] = [[r.url, r.count] for r in shards]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def result_key(config: ScalingConfig) -> str:
    return f"{SCALING}/{config.study}/n{config.size()}.json"


def run_scaling_round(config: ScalingConfig, clips: list | None = None, on_progress: OnProgress | None = None) -> dict:
    """Label N videos, train a student on their labels, evaluate it; returns (and saves) the size's result."""
    notify = on_progress or _ignore
    from ..student.train import run_training

    started = time.perf_counter()
    size = config.size()
    workspace = open_store(config.round.workspace)
    workspace.check_writable()

    notify("stage", {"videos": size, "stage": "labelling", "round_id": config.round_id()})
    round_config, videos, round_summary = label_size(config, on_progress)
    train_config = config.train_config()
    output = Path(train_config.output)
    snapshot = output / "scaling_shards.json"
    if snapshot.is_file():  # fixed at the first start, as the trainer's own snapshot: a resume sees the same data
        saved = json.loads(snapshot.read_text())
        from ..student.data import ShardRef

        shards = [ShardRef(r["url"], int(r["count"])) for r in saved["shards"]]
        counts = saved["counts"]
    else:
        shards, counts = training_shards(config.round.workspace, videos)
    if not shards:
        raise ConfigError(
            f"scaling round n{size}: none of the first {len(videos)} eligible videos has labels "
            f"(round {round_config.round_id}: {round_summary['failed']} failed); see `pseudotrack status`"
        )
    fingerprint = _fingerprint(config, shards)
    key = result_key(config)
    if workspace.exists(key):
        previous = json.loads(workspace.read_bytes(key))
        if previous.get("fingerprint") == fingerprint:
            notify("stage", {"videos": size, "stage": "reused", "round_id": config.round_id()})
            return previous
    if not snapshot.is_file():
        output.mkdir(parents=True, exist_ok=True)
        rows = [{"url": r.url, "count": r.count} for r in shards]
        snapshot.write_text(json.dumps({"shards": rows, "counts": counts}, indent=1))

    notify("stage", {"videos": size, "stage": "training", "labelled": counts["labelled"], "shards": len(shards)})

    def on_log(row: dict) -> None:
        notify("train", {"videos": size, **row})

    trained = run_training(train_config, on_log=on_log, shards=shards)
    if not trained.export_path:
        raise RuntimeError(f"scaling round n{size}: training stopped at step {trained.steps} before the end")

    notify("stage", {"videos": size, "stage": "evaluating"})
    clips = clips if clips is not None else benchmark_clips(config.eval)
    evaluation = evaluate_checkpoint(trained.export_path, config, clips, size, on_progress)
    result = {
        "videos": size,
        "eligible": len(videos),
        "labelled": counts["labelled"],
        "extra_samples": counts["extra"],
        "round_id": round_config.round_id,
        "round": round_summary,
        "shards": len(shards),
        "train_steps": trained.steps,
        "final_loss": trained.final_loss,
        "export_path": trained.export_path,
        "metrics": evaluation["metrics"],
        "protocol": evaluation["protocol"],
        "benchmark": config.eval.benchmark,
        "benchmark_videos": evaluation["videos"],
        "fingerprint": fingerprint,
        "seconds": time.perf_counter() - started,
    }
    workspace.write_bytes(key, json.dumps(result, indent=2, sort_keys=True, default=str).encode("utf-8"))
    if _in_flow():
        create_markdown_artifact(
            table_markdown([result], None),
            key=artifact_key("scaling-round", config.study, f"n{size}"),
            description=f"scaling round of {size} videos",
        )
    notify("stage", {"videos": size, "stage": "done", "metrics": evaluation["metrics"]})
    return result


# --------------------------------------------------------------------------- a study


def parse_sizes(text: str | list[int]) -> list[int]:
    """'100,1000,5000' -> [100, 1000, 5000], sorted and without repeats; a bad entry is a ConfigError."""
    items = text if isinstance(text, list) else [t.strip() for t in str(text).split(",") if t.strip()]
    sizes = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"size {item!r} is not a whole number of videos (e.g. --sizes 100,1000,5000)") from None
        if value < 1:
            raise ConfigError(f"size {value} must be at least 1 video")
        sizes.append(value)
    if not sizes:
        raise ConfigError("no sizes given: pass e.g. --sizes 100,1000,5000")
    return sorted(set(sizes))


def run_scaling_study(config: ScalingConfig, sizes: list[int], on_progress: OnProgress | None = None) -> dict:
    """A scaling round per size (smallest first, each reusing the smaller ones' labels), then table and figure."""
    notify = on_progress or _ignore
    from .scaling_plot import figure_png

    sizes = parse_sizes(sizes)
    started = time.perf_counter()
    workspace = open_store(config.round.workspace)
    workspace.check_writable()
    clips = benchmark_clips(config.eval)  # the same clips for every size and the baseline
    baseline = None
    if config.train.init_checkpoint:
        notify("stage", {"videos": 0, "stage": "baseline", "checkpoint": config.train.init_checkpoint})
        baseline = evaluate_checkpoint(config.train.init_checkpoint, config, clips, 0, on_progress)
    rows: list[dict] = []
    skipped: list[int] = []
    for i, size in enumerate(sizes):
        if rows and rows[-1]["labelled"] < rows[-1]["videos"]:  # the bucket ran out: larger sizes repeat it
            skipped = sizes[i:]
            notify("skipped", {"sizes": skipped, "eligible": rows[-1]["eligible"], "labelled": rows[-1]["labelled"]})
            break
        notify("size", {"videos": size, "index": i + 1, "count": len(sizes)})
        if _in_flow():
            rows.append(scaling_round(config.for_size(size), on_progress))
        else:
            rows.append(run_scaling_round(config.for_size(size), clips, on_progress))
    prefix = f"{SCALING}/{config.study}/"
    results = {
        "study": config.study,
        "benchmark": config.eval.benchmark,
        "query_mode": config.eval.query_mode,
        "baseline": baseline,
        "init_checkpoint": config.train.init_checkpoint,
        "rows": rows,
        "skipped_sizes": skipped,
        "config": config.to_dict(),
        "seconds": time.perf_counter() - started,
    }
    table = table_markdown(rows, baseline, title=f"Scaling study `{config.study}` on {config.eval.benchmark}")
    workspace.write_bytes(prefix + "results.json", json.dumps(results, indent=2, default=str).encode("utf-8"))
    workspace.write_bytes(prefix + "table.md", table.encode("utf-8"))
    workspace.write_bytes(prefix + "figure1.png", figure_png(rows, baseline, config.study, config.eval.benchmark))
    results["uris"] = {name: workspace.uri(prefix + name) for name in ("results.json", "table.md", "figure1.png")}
    results["table"] = table
    if _in_flow():
        create_markdown_artifact(table, key=artifact_key("scaling-study", config.study), description="Figure 1 table")
    return results


def _fmt(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def table_markdown(rows: list[dict], baseline: dict | None, title: str = "Scaling study") -> str:
    """One row per size: videos, labelled, steps, then AJ, δ_avg, OA in percent (as the paper reports them)."""
    lines = [
        f"# {title}",
        "",
        "| videos | labelled | train steps | AJ | δ_avg | OA |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    if baseline is not None:
        m = baseline["metrics"]
        lines.append(f"| 0 (start) | — | — | {' | '.join(_fmt(m.get(k)) for k in METRICS.values())} |")
    for row in rows:
        m = row["metrics"]
        cells = " | ".join(_fmt(m.get(k)) for k in METRICS.values())
        lines.append(f"| {row['videos']} | {row['labelled']} | {row['train_steps']} | {cells} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- flows


@flow(name="scaling-round", log_prints=True)
def scaling_round(config: ScalingConfig, on_progress: OnProgress | None = None) -> dict:
    """Label N videos (stable order, reusing smaller rounds), train a student on them, evaluate it."""
    return run_scaling_round(config, on_progress=on_progress)


@flow(name="scaling-study", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def scaling_study(config: ScalingConfig, sizes: list[int], on_progress: OnProgress | None = None) -> dict:
    """Figure 1 for this data: a scaling round per size, then a table and a plot of AJ, δ_avg, OA.

    on_progress: an in-process callback (OnProgress; not stored with the run).
    """
    return run_scaling_study(config, sizes, on_progress)
