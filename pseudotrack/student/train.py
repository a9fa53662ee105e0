"""Fine-tune a CoTracker3 student on pseudo-label shards: one loop you can read top to bottom.

The recipe (§3.3, App. A, App. C): AdamW at lr 5e-5 with cosine decay and no
warm-up, gradient clipping, bf16 autocast on GPU, DDP under `torchrun`, the
separate visibility/confidence head frozen, and about as many steps as
training videos at 32 clips per step.

Exact resume. A checkpoint holds the model, optimiser, scheduler, step, every
random generator the process owns, and each rank's loader position
(`data.LoaderState`), all as tensors and plain Python values so that
`torch.load(weights_only=True)` reads it (it refuses numpy scalars). A run
killed after a checkpoint and started again with the same configuration ends
with the same weights as a run that was never interrupted; SIGTERM (a
scheduler's pre-emption) writes a checkpoint at the next step boundary first.

Metrics go to TensorBoard event files under `<output>/tensorboard`, to
`metrics.jsonl` beside them (easy to read without TensorBoard), and to an
`on_log` hook that the Prefect flow and the CLI use for artifacts and progress.
After a resume both drop what was logged past the checkpoint, so the curves
show each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import dataclass_from_dict
from ..errors import ConfigError
from .data import ClipSpec, LoaderState, ShardRef, make_loader, shard_refs
from .loss import offline_supervision_mask, online_supervision_mask, track_loss
from .model import Student, build_student, export_student

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXPORT_NAME = "student.pth"
METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SCALARS = ("loss", "lr", "grad_norm", "clips_per_second")
CONFIG_NAME = "config.json"
SHARDS_NAME = "shards.json"


@dataclass
class TrainConfig:
    """One student training run. Defaults follow the CoTracker3 recipe for pseudo-labels.

    workspace:        where the shards are (local directory or s3://)
    output:           local directory for checkpoints, metrics and the exported student
    rounds:           labelling rounds whose committed shards to train on; None: all
    init_checkpoint:  official CoTracker3 file or one of our exports; None starts from random
                      weights (tests and benchmarks only)
    variant:          "online" (sliding windows, forward only) or "offline" (one window)
    model_size:       "full" (the published architecture) or "tiny" (CPU tests)
    steps:            optimiser steps; None: as many as training videos (App. C)
    batch_size:       clips per optimiser step over all ranks (the recipe's 32)
    micro_batch_size: clips per forward on one rank; the rest is gradient accumulation
    num_frames:       clip length (online) or longest clip (offline)
    min_frames:       offline random trim lower bound; None: num_frames // 2 offline
    loss_scale:       the authors multiply the track loss by 0.05 before clipping at 10;
                      kept so that clipping acts as in their runs
    resume:           continue from the newest checkpoint in `output` (off: refuse a used folder)
    min_track_quality: tracks whose label quality score (tasks/quality.py) is below this are not
                      supervised; None: each sample's round threshold (--min-track-quality), if any
    quality_weighting: weigh each track's loss by its quality score (floor 0.05); off by default.
                      Samples of shards without scores are weighed equally either way
    """

    workspace: str
    output: str
    rounds: list[str] | None = None
    init_checkpoint: str | None = None
    variant: str = "online"
    model_size: str = "full"
    steps: int | None = None
    batch_size: int = 32
    micro_batch_size: int = 1
    num_frames: int = 64
    min_frames: int | None = None
    num_tracks: int = 384
    max_stride: int = 1
    iters: int = 4
    lr: float = 5e-5
    weight_decay: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 10.0
    loss_scale: float = 0.05
    huber_delta: float = 6.0
    gamma: float = 0.8
    occluded_weight: float = 0.2
    amp: bool = True
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = True
    min_track_quality: float | None = None
    quality_weighting: bool = False

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        problems = []
        if not self.workspace:
            problems.append("workspace is empty: give the labelling workspace (local directory or s3://)")
        if not self.output:
            problems.append("output is empty: give a local directory for checkpoints")
        if self.variant not in ("online", "offline"):
            problems.append(f"variant={self.variant!r}: choose online or offline")
        if self.model_size not in ("full", "tiny"):
            problems.append(f"model_size={self.model_size!r}: choose full or tiny")
        for name in (
            "batch_size",
            "micro_batch_size",
            "num_frames",
            "num_tracks",
            "max_stride",
            "iters",
            "checkpoint_every",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps={self.steps} must be at least 1 (or unset: one step per video)")
        if self.batch_size % self.micro_batch_size:
            problems.append(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        if self.min_frames is not None and not 2 <= self.min_frames <= self.num_frames:
            problems.append(f"min_frames={self.min_frames} must be between 2 and num_frames={self.num_frames}")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be positive")
        if self.min_track_quality is not None and not (
            isinstance(self.min_track_quality, (int, float)) and 0.0 <= self.min_track_quality <= 1.0
        ):
            problems.append(f"min_track_quality={self.min_track_quality!r} must be a number between 0 and 1")
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    def clip_spec(self, height: int, width: int) -> ClipSpec:
        min_frames = self.min_frames
        if self.variant == "offline" and min_frames is None:
            min_frames = max(2, self.num_frames // 2)
        if self.variant == "online":
            min_frames = self.num_frames  # the online student trains on clips of one length (§3.3)
        return ClipSpec(
            self.num_frames,
            self.num_tracks,
            height,
            width,
            self.max_stride,
            min_frames,
            self.min_track_quality,
            self.quality_weighting,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    first_loss: float
    export_path: str
    checkpoint_path: str
    metrics_path: str
    resumed_from: int = 0
    seconds: float = 0.0
    clips_per_second: float = 0.0
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- distributed set-up


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group `torchrun` describes in the environment; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


# --------------------------------------------------------------------------- schedule, RNG, checkpoints


def cosine_factor(step: int, total: int) -> float:
    """Learning-rate multiplier: cosine from 1 at step 0 to 0 at `total`, no warm-up (App. A)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def default_steps(num_videos: int, batch_size: int) -> int:
    """App. C trains for about as many steps as there are videos, at 32 clips per step."""
    return max(1, round(num_videos * 32 / batch_size))


def rng_state() -> dict:
    """Every generator this process owns, as tensors and plain Python values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(output: Path) -> list[Path]:
    """Saved training checkpoints, newest step first."""
    folder = output / CHECKPOINT_DIR
    return sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def save_atomic(obj: dict, path: Path) -> None:
    """A crash while saving must never leave a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_training_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the step


def move_batch(batch: dict, device: torch.device) -> dict:
    """uint8 [B, T, H, W, 3] clips become float [B, T, 3, H, W] 0..255 on the device (the model normalises).

    The channel move happens on the device: on the loader's CPU it was a third of a clip's preparation.
    """
    out = dict(batch)
    out["video"] = batch["video"].to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().contiguous()
    for name in ("queries", "tracks", "visible", "valid", "weights", "occluded_supervised"):
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    return out


def compute_loss(model: torch.nn.Module, batch: dict, config: TrainConfig) -> torch.Tensor:
    """Unscaled track loss of one micro-batch (shapes in `data.collate`)."""
    windows = model(batch["video"], batch["queries"], iters=config.iters)  # video [B, T, 3, H, W] float
    num_frames = batch["video"].shape[1]
    if config.variant == "online":
        supervised = online_supervision_mask(batch["queries"][..., 0], num_frames, batch["valid"])
    else:
        supervised = offline_supervision_mask(batch["valid"], num_frames)
    return track_loss(
        windows,
        batch["tracks"],
        batch["visible"],
        supervised,
        batch["occluded_supervised"],
        config.huber_delta,
        config.gamma,
        config.occluded_weight,
        batch["weights"] if config.quality_weighting and "weights" in batch else None,
    )


# --------------------------------------------------------------------------- the loop


def run_training(
    config: TrainConfig,
    on_log: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
    shards: list[ShardRef] | None = None,
) -> TrainResult:
    """Train (or resume training) the student described by `config`; every rank of a DDP run calls it.

    stop_at: return after this many steps as if the job had been stopped there
    (a checkpoint is written first); the next call resumes from it.
    """
    started = time.perf_counter()
    ddp = init_distributed(config.device)
    device = resolve_device(config.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    output = Path(config.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    shards = shards if shards is not None else _shard_snapshot(config, output, ddp)
    if not shards:
        raise ConfigError(
            f"no committed shards in {config.workspace} (rounds {config.rounds or 'all'}): run a labelling round first"
        )
    total_steps = config.steps or default_steps(sum(s.count for s in shards), config.batch_size)
    accumulation = _accumulation(config, ddp)
    if ddp.is_main:  # what `torchrun -m pseudotrack.student.train <output>/config.json` reads
        save_text_atomic(output / CONFIG_NAME, json.dumps(config.to_dict(), indent=2, sort_keys=True))

    run = _start(config, ddp, device, output, total_steps)
    model: torch.nn.Module = run.student
    if ddp.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            run.student, device_ids=[device.index] if device.type == "cuda" else None
        )
    height, width = run.student.resolution
    loader = make_loader(
        shards,
        config.clip_spec(height, width),
        config.micro_batch_size,
        config.seed,
        rank=ddp.rank,
        num_workers=config.workers,
        state=run.loader_state,
        pin_memory=device.type == "cuda",
    )
    batches: Iterator[dict] = iter(loader)
    metrics_file = output / METRICS_NAME
    writer = _open_metric_writers(output, run.resumed_from) if ddp.is_main else None
    stop_requested = {"flag": False}
    previous_handler = _install_sigterm(stop_requested)
    history: list[dict] = []
    last_ckpt = str(run.resumed_path or "")
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    end = total_steps if stop_at is None else min(stop_at, total_steps)
    try:
        model.train()
        while run.step < end:
            loss, grad_norm = _train_step(model, batches, run, config, accumulation, device)
            run.step += 1
            window_loss += loss
            window_steps += 1
            if run.step % config.log_every == 0 or run.step == end:
                if ddp.world_size > 1:
                    dist.all_reduce(window_loss, op=dist.ReduceOp.AVG)
                seconds = time.perf_counter() - window_start
                row = {
                    "step": run.step,
                    "total_steps": total_steps,
                    "loss": float(window_loss) / window_steps,
                    "lr": run.optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "clips_per_second": window_steps * config.batch_size / max(seconds, 1e-9),
                    "time": time.time(),
                }
                history.append(row)
                if ddp.is_main:
                    with open(metrics_file, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    for name in SCALARS:
                        writer.add_scalar(f"train/{name}", row[name], run.step, walltime=row["time"])
                    writer.flush()
                    if on_log is not None:
                        on_log(row)
                window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            stop_now = _any_rank(stop_requested["flag"], device, ddp)
            if run.step % config.checkpoint_every == 0 or run.step == end or stop_now:
                last_ckpt = _save_checkpoint(output, run, config, ddp, total_steps)
            if stop_now:
                log.warning("stopped by SIGTERM at step %d; run again to resume", run.step)
                break
    finally:
        if writer is not None:
            writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    _check_frozen(run)
    finished = run.step >= total_steps
    export_path = output / EXPORT_NAME
    if ddp.is_main and finished:
        export_student(run.student, export_path, {"step": run.step, "train_config": config.to_dict()})
    seconds = time.perf_counter() - started
    clips = (run.step - run.resumed_from) * config.batch_size
    return TrainResult(
        steps=run.step,
        final_loss=history[-1]["loss"] if history else float("nan"),
        first_loss=history[0]["loss"] if history else float("nan"),
        export_path=str(export_path) if finished else "",
        checkpoint_path=last_ckpt,
        metrics_path=str(metrics_file),
        resumed_from=run.resumed_from,
        seconds=seconds,
        clips_per_second=clips / max(seconds, 1e-9),
        history=history,
    )


def _open_metric_writers(output: Path, resumed_from: int):
    """The TensorBoard writer, with rows logged after the resumed checkpoint dropped from both logs.

    A killed run logged steps that the resumed run will log again; `purge_step`
    makes TensorBoard discard the old ones, and metrics.jsonl is cut to match.
    """
    from torch.utils.tensorboard import SummaryWriter

    metrics_file = output / METRICS_NAME
    if metrics_file.exists():
        kept = [
            line
            for line in metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= resumed_from
        ]
        save_text_atomic(metrics_file, "".join(line + "\n" for line in kept))
    return SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=resumed_from + 1 if resumed_from else None)


def _shard_snapshot(config: TrainConfig, output: Path, ddp: Dist) -> list[ShardRef]:
    """The shards this run trains on, fixed at its first start (`shards.json`).

    Rounds keep committing shards while a student trains; a resumed run must
    see the same list, or its sampling plan (and so its data position) changes.
    """
    path = output / SHARDS_NAME
    rows = None
    if ddp.is_main:
        if config.resume and path.is_file():
            rows = json.loads(path.read_text())
        else:
            rows = [{"url": r.url, "count": r.count} for r in shard_refs(config.workspace, config.rounds)]
            if rows:
                save_text_atomic(path, json.dumps(rows, indent=1))
    if ddp.world_size > 1:  # every rank must sample from the same list, even if a shard lands meanwhile
        box = [rows]
        dist.broadcast_object_list(box, src=0)
        rows = box[0]
    return [ShardRef(r["url"], int(r["count"])) for r in rows or []]


def save_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class _Run:
    """What a checkpoint restores, plus the frozen head as it was at the start (checked at the end)."""

    student: Student
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader_state: LoaderState
    frozen_at_start: dict[str, torch.Tensor]
    step: int = 0
    resumed_from: int = 0
    resumed_path: Path | None = None


def _accumulation(config: TrainConfig, ddp: Dist) -> int:
    per_rank = config.batch_size // ddp.world_size
    if config.batch_size % ddp.world_size or per_rank % config.micro_batch_size:
        raise ConfigError(
            f"batch_size={config.batch_size} must split evenly over {ddp.world_size} ranks "
            f"into micro-batches of {config.micro_batch_size}"
        )
    return per_rank // config.micro_batch_size


def _start(config: TrainConfig, ddp: Dist, device: torch.device, output: Path, total_steps: int) -> _Run:
    """The student, optimiser and schedule, fresh or restored from the newest checkpoint in `output`.

    The frozen head is copied before any checkpoint is loaded, so the final
    check compares it with the starting weights across every resume.
    """
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    student = build_student(config.variant, config.model_size, config.init_checkpoint).to(device)
    frozen = {name: p.detach().clone() for name, p in student.frozen_parameters().items()}
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_factor(s, total_steps))
    run = _Run(student, trainable, optimizer, scheduler, LoaderState(), frozen)
    latest = checkpoint_paths(output)
    if latest and not config.resume:
        raise ConfigError(
            f"{output} holds checkpoints of an earlier run (newest {latest[0].name}) and resume is "
            "off: use another output folder, or resume"
        )
    if latest:
        ckpt = load_training_checkpoint(latest[0])
        _check_resumable(ckpt, config, ddp, total_steps)
        student.net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        run.step = run.resumed_from = int(ckpt["step"])
        run.loader_state = LoaderState.from_dict(ckpt["loader"][ddp.rank])
        run.resumed_path = latest[0]
        set_rng_state(ckpt["rng"][ddp.rank])
        if ddp.is_main:
            log.info("resumed from %s at step %d", latest[0], run.step)
    return run


def _train_step(
    model: torch.nn.Module,
    batches: Iterator[dict],
    run: _Run,
    config: TrainConfig,
    accumulation: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step over `accumulation` micro-batches; returns (mean unscaled loss, grad norm) on device.

    DDP synchronises gradients on the last micro-batch only. The loss is scaled
    (authors' 0.05) before backward so that clipping at `grad_clip` acts as in
    their runs; the logged loss is unscaled.
    """
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.amp and device.type == "cuda" else nullcontext()
    step_loss = torch.zeros((), device=device)
    for micro in range(accumulation):
        batch = next(batches)
        run.loader_state.update(batch)
        batch = move_batch(batch, device)
        last = micro == accumulation - 1
        no_sync = (
            model.no_sync()
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last
            else nullcontext()
        )
        with no_sync:
            with autocast:
                loss = compute_loss(model, batch, config)
            (loss * config.loss_scale / accumulation).backward()
        step_loss += loss.detach() / accumulation
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, config.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _check_frozen(run: _Run) -> None:
    changed = [
        n
        for n, p in run.student.frozen_parameters().items()
        if not torch.equal(p.detach().cpu(), run.frozen_at_start[n].cpu())
    ]
    if changed:
        raise RuntimeError(f"frozen visibility/confidence parameters changed during training: {changed}")


def _install_sigterm(flag: dict):
    """Pre-emption asks politely with SIGTERM: finish the step, checkpoint, exit."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__("flag", True))
    except ValueError:  # not the main thread (e.g. a Prefect worker thread): rely on periodic checkpoints
        return None


def _any_rank(flag: bool, device: torch.device, ddp: Dist) -> bool:
    if ddp.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _gather(obj, ddp: Dist) -> list:
    if ddp.world_size == 1:
        return [obj]
    out: list = [None] * ddp.world_size
    dist.all_gather_object(out, obj)
    return out


def _save_checkpoint(output: Path, run: _Run, config: TrainConfig, ddp: Dist, total_steps: int) -> str:
    """Every rank contributes its loader position and generators; rank 0 writes (a collective call)."""
    loaders = _gather(run.loader_state.to_dict(), ddp)
    rngs = _gather(rng_state(), ddp)
    path = output / CHECKPOINT_DIR / f"step-{run.step:08d}.pt"
    if ddp.is_main:
        save_atomic(
            {
                "model": run.student.net.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "step": run.step,
                "total_steps": total_steps,
                "world_size": ddp.world_size,
                "workers": config.workers,
                "loader": loaders,
                "rng": rngs,
                "config": config.to_dict(),
                "model_config": run.student.config_dict(),
            },
            path,
        )
        for old in checkpoint_paths(output)[config.keep_checkpoints :]:
            old.unlink(missing_ok=True)
    if ddp.world_size > 1:
        dist.barrier()
    return str(path)


def _check_resumable(ckpt: dict, config: TrainConfig, ddp: Dist, total_steps: int) -> None:
    """Resuming under other settings would silently train something else: refuse with the difference."""
    problems = []
    if int(ckpt["world_size"]) != ddp.world_size:
        problems.append(f"it was written by {ckpt['world_size']} ranks, this run has {ddp.world_size}")
    if int(ckpt["workers"]) != config.workers:
        problems.append(f"its loader had {ckpt['workers']} workers, this run has {config.workers}")
    if int(ckpt["total_steps"]) != total_steps:
        problems.append(f"its schedule has {ckpt['total_steps']} steps, this run {total_steps}")
    saved = ckpt["config"]
    for key in ("variant", "model_size", "batch_size", "micro_batch_size", "num_frames", "num_tracks", "seed", "lr"):
        if saved.get(key) != getattr(config, key):
            problems.append(f"{key} was {saved.get(key)!r}, now {getattr(config, key)!r}")
    if problems:
        raise ConfigError(
            "cannot resume from the checkpoint in this output folder: "
            + "; ".join(problems)
            + " (use another output folder to start over)"
        )


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc-per-node N -m pseudotrack.student.train CONFIG.json`: one rank of a DDP run.

    The config file is a `TrainConfig` as JSON (`train_student` writes one beside
    its report); every rank reads the same file.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pseudotrack.student.train", description=main.__doc__)
    parser.add_argument("config", help="TrainConfig JSON file")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    result = run_training(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
