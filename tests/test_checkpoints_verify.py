"""`pseudotrack checkpoints verify DIR`: official files by SHA-256, or by keys and shapes where no hash is known."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pseudotrack.cli.main import app
from pseudotrack.teachers import official
from pseudotrack.teachers.official import OFFICIAL, structure_problems, verify_file

runner = CliRunner()


def verify(directory: Path, *extra: str):
    result = runner.invoke(app, ["checkpoints", "verify", str(directory), *extra], env={"COLUMNS": "240"})
    return result, " ".join(re.sub("[\u2500-\u257f]", " ", result.output).split())  # table rules dropped


def student_export(directory: Path) -> Path:
    from pseudotrack.student.model import build_student, export_student

    return export_student(build_student("online", size="tiny"), directory / "student.pth", {"step": 3})


def test_the_table_names_every_official_file_once_with_a_hash_or_a_manifest(shared_dir):
    assert set(OFFICIAL) == {
        "scaled_online.pth",
        "scaled_offline.pth",
        "baseline_online.pth",
        "baseline_offline.pth",
        "cotracker2v1.pth",
        "tapir_checkpoint_panning.pt",
        "bootstapir_checkpoint_v2.pt",
    }
    for entry in OFFICIAL.values():
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.file
        assert entry.url.startswith("https://") and entry.url.endswith(entry.file)
        assert (shared_dir / "reference" / entry.manifest / "manifest.json").is_file()
        assert entry.file in (shared_dir / "reference" / entry.manifest / "manifest.json").read_text()
    assert len({e.sha256 for e in OFFICIAL.values()}) == len(OFFICIAL)


def test_unknown_and_altered_files_are_named_and_a_student_export_is_accepted(tmp_path):
    (tmp_path / "mystery.pth").write_bytes(b"who knows")
    torch.save({"w": torch.zeros(2)}, tmp_path / "scaled_online.pth")
    student_export(tmp_path)
    result, text = verify(tmp_path)
    assert result.exit_code == 1, result.output
    assert "mystery.pth unknown" in text and "scaled_online.pth altered" in text
    assert "student.pth student a student export of ours (online student, step 3)" in text
    assert "student.pth.json" not in text  # the export's sidecar is part of it
    assert "2 of 3 files are not the official checkpoints: mystery.pth (unknown), scaled_online.pth (altered)" in text

    (tmp_path / "mystery.pth").unlink()
    (tmp_path / "scaled_online.pth").unlink()
    result, text = verify(tmp_path)
    assert result.exit_code == 0 and "all 1 files verified" in text


def test_a_file_with_the_official_hash_is_ok(tmp_path, monkeypatch):
    path = tmp_path / "cotracker2v1.pth"
    torch.save({"w": torch.ones(3)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(OFFICIAL, path.name, replace(OFFICIAL[path.name], sha256=digest))
    result, text = verify(tmp_path)
    assert result.exit_code == 0, result.output
    assert "cotracker2v1.pth ok SHA-256 matches the official cotracker2v1.pth" in text
    path.write_bytes(path.read_bytes() + b"\0")  # one byte more is another file
    result, text = verify(tmp_path)
    assert result.exit_code == 1 and "cotracker2v1.pth altered" in text


def test_without_a_hash_the_keys_and_shapes_are_checked(tmp_path):
    reference = tmp_path / "reference" / "toy"
    reference.mkdir(parents=True)
    manifest = {"state_dict": {"a.weight": {"shape": [2, 3]}, "b": {"shape": [4]}}}
    (reference / "manifest.json").write_text(json.dumps(manifest))
    table = {"toy.pth": official.OfficialCheckpoint("toy.pth", "toy", "https://x/toy.pth", None, "none", "toy")}
    good = tmp_path / "toy.pth"
    torch.save({"a.weight": torch.zeros(2, 3), "b": torch.zeros(4)}, good)
    verdict = verify_file(good, tmp_path / "reference", table)
    assert verdict.status == "structure-ok" and verdict.accepted and "every key and shape" in verdict.detail

    torch.save({"a.weight": torch.zeros(3, 2), "c": torch.zeros(1)}, good)
    verdict = verify_file(good, tmp_path / "reference", table)
    assert verdict.status == "structure-mismatch" and not verdict.accepted
    assert "1 keys missing (e.g. b)" in verdict.detail and "1 unexpected keys (e.g. c)" in verdict.detail
    assert "a.weight (3, 2) instead of (2, 3)" in verdict.detail

    assert verify_file(good, None, table).status == "unverified"  # nothing to compare with: not accepted
    good.write_bytes(b"not a checkpoint")
    assert "cannot be read as a state dict" in verify_file(good, tmp_path / "reference", table).detail


def test_the_structural_check_passes_the_official_layout(shared_dir, tmp_path):
    """The TAPIR manifest's own keys and shapes (weights by the reference rule) pass; a dropped key does not."""
    spec = importlib.util.spec_from_file_location("weights_rule", shared_dir / "reference" / "weights_rule.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    state = rule.make_state_dict(shared_dir / "reference" / "tapir")
    path = tmp_path / "tapir_checkpoint_panning.pt"
    torch.save(state, path)
    manifest = shared_dir / "reference" / "tapir" / "manifest.json"
    assert structure_problems(path, manifest) == []
    result, text = verify(tmp_path, "--reference", str(shared_dir / "reference"))
    # not the official bytes, so altered; the detail says the layout still matches
    assert result.exit_code == 1 and "its keys and shapes still match the official ones" in text
    dropped = next(iter(state))
    del state[dropped]
    torch.save(state, path)
    assert structure_problems(path, manifest) == [f"1 keys missing (e.g. {dropped})"]


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_a_missing_or_empty_directory_is_bad_input(tmp_path, what):
    directory = tmp_path / "ckpt"
    if what == "empty":
        directory.mkdir()
    result, text = verify(directory)
    assert result.exit_code == 2
    assert ("is not a directory" if what == "missing" else "holds no files") in text
