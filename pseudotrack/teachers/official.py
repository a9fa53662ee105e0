"""The official teacher checkpoints: where each file comes from, its SHA-256, and how to verify a copy.

One table, read by `pseudotrack checkpoints verify` and the README's "Teachers and checkpoints". A
hash is only listed where it was read from a published record (the `sha256_source`); a file without
one is checked structurally instead: every key and shape of its state dict against the key/shape
manifest of the reference parity cases (shared/reference/<model>/manifest.json).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

HF_COTRACKER3 = "https://huggingface.co/facebook/cotracker3"
HF_COTRACKER = "https://huggingface.co/facebook/cotracker"
DM_TAPNET = "https://storage.googleapis.com/dm-tapnet"


@dataclass(frozen=True)
class OfficialCheckpoint:
    file: str
    teacher: str  # the teacher registry name that loads it
    url: str  # where the authors publish it
    sha256: str | None  # None: no published hash was found; verification is structural
    sha256_source: str  # where the hash was read (the Hub's LFS pointer, or a repository that pins it)
    manifest: str  # the reference folder whose manifest.json lists its keys and shapes


OFFICIAL: dict[str, OfficialCheckpoint] = {
    c.file: c
    for c in (
        OfficialCheckpoint(
            "scaled_online.pth",
            "cotracker3_online",
            f"{HF_COTRACKER3}/resolve/main/scaled_online.pth",
            "205d34789f19699d64b22cf93f9b697f15f28d4025240e31532e504109837218",
            f"{HF_COTRACKER3}/blob/840d860610c48804303618c2deee4813cd465d83/scaled_online.pth (Git LFS SHA256)",
            "cotracker3_online",
        ),
        OfficialCheckpoint(
            "scaled_offline.pth",
            "cotracker3_offline",
            f"{HF_COTRACKER3}/resolve/main/scaled_offline.pth",
            "2670d4562ed69326dda775a26e54883925cd11b6fc9b24cb7aa9f8078bce7834",
            f"{HF_COTRACKER3}/blob/8e29ec5c59b89323b626534c6a9809f784f33722/scaled_offline.pth (Git LFS SHA256)",
            "cotracker3_offline",
        ),
        OfficialCheckpoint(
            "baseline_online.pth",
            "cotracker3_online",
            f"{HF_COTRACKER3}/resolve/main/baseline_online.pth",
            "8b30b2f239de9987323b729d9115cc5163720a07348a97d045095cd9ebdb7b3a",
            f"{HF_COTRACKER3}/blob/b748ec5e5cd4b9f525a94cc544f0be34bbcc22e2/baseline_online.pth (Git LFS SHA256)",
            "cotracker3_online",
        ),
        OfficialCheckpoint(  # replaced on the Hub by commit 840d860 ("Updated offline baseline"); this is the new one
            "baseline_offline.pth",
            "cotracker3_offline",
            f"{HF_COTRACKER3}/resolve/main/baseline_offline.pth",
            "da09bbac871f7398e5b29c4de5213652658949737bc158840b101678ba8ad1df",
            f"{HF_COTRACKER3}/commit/840d860610c48804303618c2deee4813cd465d83 (Git LFS oid, 101889786 bytes)",
            "cotracker3_offline",
        ),
        OfficialCheckpoint(
            "cotracker2v1.pth",
            "cotracker2",
            f"{HF_COTRACKER}/resolve/main/cotracker2v1.pth",
            "d8d473734ca22e15041cf454c0d6828e7fe462fb27918f84b459485813ac572c",
            f"{HF_COTRACKER}/commit/60495999ebd33af25fc51d89f83d1d6de3bc18a5 (Git LFS oid, 204417112 bytes)",
            "cotracker2",
        ),
        OfficialCheckpoint(
            "tapir_checkpoint_panning.pt",
            "tapir",
            f"{DM_TAPNET}/tapir_checkpoint_panning.pt",
            "628611c656b3bd65d4a70fbf5526b62afe82d1b085ce6044685287fb78509daa",
            "not published by the authors; pinned by third-party repositories that download it from "
            f"{DM_TAPNET} (CHECKPOINT_SHA256 beside TAPNet commit 989a1fd)",
            "tapir",
        ),
        OfficialCheckpoint(
            "bootstapir_checkpoint_v2.pt",
            "bootstapir",
            f"{DM_TAPNET}/bootstap/bootstapir_checkpoint_v2.pt",
            "8493c7a69e02c85b9382fbb3c7b8b539b36bc08ede744b9e99feb739a0129f4b",
            "not published by the authors; pinned by third-party repositories that download it from "
            f"{DM_TAPNET}/bootstap (218886140 bytes)",
            "bootstapir",
        ),
    )
}


@dataclass
class Verdict:
    """One file's verification: ok, altered, unknown, structure-ok, structure-mismatch or unverified."""

    file: str
    status: str
    detail: str

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "structure-ok")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def structure_problems(path: str | Path, manifest_path: str | Path, limit: int = 5) -> list[str]:
    """Differences between a checkpoint's state dict and a key/shape manifest: missing, unexpected, reshaped keys.

    The file is read with torch.load(weights_only=True), so a file that is no plain state dict is refused.
    """
    import torch

    expected = {k: tuple(v["shape"]) for k, v in json.loads(Path(manifest_path).read_text())["state_dict"].items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a checkpoint at all, or one that needs pickled code
        return [f"cannot be read as a state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # some releases nest the weights
        state = state["model"]
    if not isinstance(state, dict):
        return [f"holds a {type(state).__name__}, not a state dict"]
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:limit])})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys (e.g. {', '.join(map(str, extra[:limit]))})")
    reshaped = [
        f"{k} {tuple(state[k].shape)} instead of {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if not hasattr(state[k], "shape") or tuple(state[k].shape) != expected[k]
    ]
    if reshaped:
        problems.append(f"{len(reshaped)} keys of another shape (e.g. {'; '.join(reshaped[:limit])})")
    return problems


def verify_file(
    path: str | Path,
    reference_dir: str | Path | None = None,
    table: dict[str, OfficialCheckpoint] | None = None,
) -> Verdict:
    """Check one file against the table: its SHA-256 where one is known, else its keys and shapes.

    reference_dir: the folder of the reference manifests (<reference_dir>/<model>/manifest.json); it also
    describes how an altered file differs.
    """
    path = Path(path)
    entry = (OFFICIAL if table is None else table).get(path.name)
    if entry is None:
        return Verdict(path.name, "unknown", "not an official checkpoint name (nor a student export)")
    manifest = Path(reference_dir) / entry.manifest / "manifest.json" if reference_dir is not None else None
    if entry.sha256 is not None:
        digest = sha256_of(path)
        if digest == entry.sha256:
            return Verdict(path.name, "ok", f"SHA-256 matches the official {entry.file}")
        detail = f"SHA-256 {digest[:16]}... is not the official {entry.sha256[:16]}... ({entry.url})"
        if manifest is not None and manifest.is_file():
            problems = structure_problems(path, manifest)
            detail += "; " + ("; ".join(problems) if problems else "its keys and shapes still match the official ones")
        return Verdict(path.name, "altered", detail)
    if manifest is None or not manifest.is_file():
        return Verdict(
            path.name,
            "unverified",
            f"no published SHA-256 and no key/shape manifest to compare with (give --reference: "
            f"the folder holding {entry.manifest}/manifest.json)",
        )
    problems = structure_problems(path, manifest)
    if problems:
        detail = "no published SHA-256; structural check: " + "; ".join(problems)
        return Verdict(path.name, "structure-mismatch", detail)
    return Verdict(
        path.name, "structure-ok", "no published SHA-256; structural check: every key and shape matches the official"
    )
