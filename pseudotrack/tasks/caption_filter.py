"""Caption filter (CoTracker3 App. A): keep real footage of people and animals in motion.

Rules live in a TOML file a person can read and edit (the packaged default is
`pseudotrack/rules/captions.toml`), never in code. Captions come from a
manifest (JSONL, CSV or Parquet with a key column) or from sidecar files next
to each video (`clip.txt` or `clip.json` for `clip.mp4`). Every decision names
the rule that made it, so the catalog can say why a video was dropped.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import tomllib

from ..errors import ConfigError

DEFAULT_RULES = Path(__file__).resolve().parents[1] / "rules" / "captions.toml"
MANIFEST_NAMES = ("captions.jsonl", "captions.csv", "captions.parquet")
KEY_COLUMNS = ("key", "video_key", "video", "file", "path", "filename")
MAX_CAPTION_BYTES = 64 * 1024
SIDECAR_SUFFIXES = (".txt", ".json")


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern


@dataclass(frozen=True)
class Verdict:
    keep: bool
    rule: str | None = None  # the rule that dropped it (or the keep rule that admitted it)
    matched: str | None = None  # the words of the caption that fired


def _phrase_pattern(words: Iterable[str]) -> re.Pattern:
    """One regex for a rule: whole words, optional plural, flexible spacing inside phrases."""
    alternatives = []
    for word in words:
        parts = [re.escape(p) for p in re.split(r"[\s\-_]+", word.strip().lower()) if p]
        if parts:
            alternatives.append(r"[\s\-_]*".join(parts) + r"(?:s|es)?")
    if not alternatives:
        raise ValueError("a rule needs at least one word")
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(sorted(alternatives, key=len, reverse=True)) + r")(?![a-z0-9])")


@dataclass(frozen=True)
class CaptionRules:
    drop: tuple[Rule, ...]
    keep: tuple[Rule, ...]
    require_keep: bool = True
    missing_caption: str = "keep"
    source: str = str(DEFAULT_RULES)

    @classmethod
    def load(cls, path: str | Path | None = None) -> CaptionRules:
        path = Path(path) if path else DEFAULT_RULES
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"caption rules file {path} does not exist (copy {DEFAULT_RULES} and edit it)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"caption rules file {path} is not valid TOML: {exc}") from None

        def rules(section: str) -> tuple[Rule, ...]:
            out = []
            for i, entry in enumerate(data.get(section, [])):
                name, words = entry.get("name"), entry.get("words")
                if not isinstance(name, str) or not isinstance(words, list) or not words:
                    raise ConfigError(
                        f"caption rules file {path}: [[{section}]] entry {i + 1} needs a `name` and a non-empty "
                        "`words` list"
                    )
                out.append(Rule(name, _phrase_pattern(str(w) for w in words)))
            return tuple(out)

        missing = data.get("missing_caption", "keep")
        if missing not in ("keep", "drop", "fail"):
            raise ConfigError(f"caption rules file {path}: missing_caption must be keep, drop or fail, not {missing!r}")
        return cls(
            drop=rules("drop"),
            keep=rules("keep"),
            require_keep=bool(data.get("require_keep", True)),
            missing_caption=missing,
            source=str(path),
        )

    def judge(self, text: str) -> Verdict:
        lowered = text.lower()
        for rule in self.drop:
            if m := rule.pattern.search(lowered):
                return Verdict(False, rule.name, m.group(0))
        for rule in self.keep:
            if m := rule.pattern.search(lowered):
                return Verdict(True, rule.name, m.group(0))
        if self.require_keep and self.keep:
            return Verdict(False, "no-keep-match", None)
        return Verdict(True)


@dataclass(frozen=True)
class Caption:
    """A video's caption text (keywords appended), or why it could not be read."""

    text: str | None
    source: str | None = None
    error: str | None = None


def _decode_caption(raw: bytes, where: str) -> str:
    if len(raw) > MAX_CAPTION_BYTES:  # sidecars are read only this far: the size may be larger
        raise ValueError(f"caption in {where} is over the {MAX_CAPTION_BYTES}-byte limit: shorten it")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption in {where} is not valid UTF-8 (byte {exc.start}): re-save it as UTF-8") from None


def _caption_from_record(record: Mapping) -> str | None:
    parts = [record.get("caption"), record.get("keywords"), record.get("text")]
    texts = []
    for part in parts:
        if isinstance(part, list):
            part = ", ".join(str(p) for p in part)
        if isinstance(part, str) and part.strip():
            texts.append(part.strip())
    return " | ".join(texts) if texts else None


def _jsonl_records(data: bytes) -> tuple[list, dict[int, str]]:
    """Records of a JSONL manifest, and the records whose line is not valid UTF-8 (index -> why).

    Split on newline bytes, not str.splitlines (which also splits inside strings at U+2028 and the like),
    and decoded line by line, so that one badly encoded caption fails one video, not the whole round.
    """
    records, bad = [], {}
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = line.decode("utf-8", "replace")
            bad[len(records)] = f"line {number} is not valid UTF-8 (byte {exc.start} of the line)"
        records.append(json.loads(text))
    return records, bad


def _csv_records(data: bytes) -> tuple[list, dict[int, str]]:
    """Records of a CSV manifest, and the rows holding bytes that are not UTF-8 (index -> why)."""
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    records, bad = [], {}
    for i, row in enumerate(csv.DictReader(io.StringIO(text))):
        if any(isinstance(v, str) and _SURROGATE.search(v) for v in row.values()):
            bad[i] = f"row {i + 2} is not valid UTF-8"
            row = {k: _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v for k, v in row.items()}
        records.append(row)
    return records, bad


_SURROGATE = re.compile("[\udc80-\udcff]")


def read_manifest(data: bytes, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(key -> caption text, key -> why its caption is unusable) from a JSONL, CSV or Parquet manifest.

    A manifest that cannot be parsed at all is a ConfigError (the round cannot judge any video); a record
    whose caption is not valid UTF-8 or is over MAX_CAPTION_BYTES fails only its own video.
    """
    suffix = PurePosixPath(name).suffix.lower()
    records: list[Mapping]
    bad: dict[int, str] = {}
    try:
        if suffix in (".jsonl", ".json"):
            records, bad = _jsonl_records(data)
        elif suffix == ".csv":
            records, bad = _csv_records(data)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            raise ConfigError(f"caption manifest {name}: unknown format {suffix!r}; use .jsonl, .csv or .parquet")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"caption manifest {name} cannot be read: {type(exc).__name__}: {exc}") from None
    captions: dict[str, str] = {}
    errors: dict[str, str] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ConfigError(f"caption manifest {name}: record {i + 1} is not an object")
        key = next((record[c] for c in KEY_COLUMNS if record.get(c)), None)
        if key is None:
            raise ConfigError(
                f"caption manifest {name}: record {i + 1} has no key column (one of {', '.join(KEY_COLUMNS)})"
            )
        text = _caption_from_record(record)
        if i in bad:
            errors[str(key)] = f"caption in {name} is unreadable: {bad[i]}; re-save the manifest as UTF-8"
        elif text is not None and len(text.encode("utf-8")) > MAX_CAPTION_BYTES:
            size = len(text.encode("utf-8"))
            errors[str(key)] = f"caption in {name} is {size} bytes, over the {MAX_CAPTION_BYTES}-byte limit: shorten it"
        elif text is not None:
            captions[str(key)] = text
    return captions, errors


def parse_manifest(data: bytes, name: str) -> dict[str, str]:
    """Key -> caption text from a JSONL, CSV or Parquet manifest (unusable captions left out: `read_manifest`)."""
    return read_manifest(data, name)[0]


class Manifest:
    """A caption manifest's entries, matched to video keys the way people name files.

    Matching needs only the manifest, not the listing, so a round builds this while its bucket is
    listed (`caption_prefetch`).
    """

    def __init__(self, captions: Mapping[str, str], errors: Mapping[str, str] | None = None, name: str = ""):
        self.captions = dict(captions)
        self.errors = dict(errors or {})
        self.name = name
        self._by_basename: dict[str, str | None] = {}
        self._by_nfc: dict[str, str | None] = {}
        for key in [*self.captions, *self.errors]:
            base = posixpath.basename(key)
            self._by_basename[base] = None if base in self._by_basename else key  # None marks ambiguity
            nfc = unicodedata.normalize("NFC", key)
            self._by_nfc[nfc] = None if nfc in self._by_nfc else key

    @classmethod
    def find(cls, store, manifest_uri: str | None = None) -> Manifest:
        """The manifest given to the round, else the first of MANIFEST_NAMES at the bucket's top; else empty.

        Read by name rather than looked up in the listing, so it can be read while the bucket is listed.
        """
        if manifest_uri:
            data, name = _read_manifest_uri(store, manifest_uri)
            return cls(*read_manifest(data, name), name=name)
        for candidate in MANIFEST_NAMES:
            try:
                data = store.read_bytes(candidate)
            except (FileNotFoundError, IsADirectoryError):
                continue
            return cls(*read_manifest(data, candidate), name=store.uri(candidate))
        return cls({})

    def match(self, key: str) -> str | None:
        """The entry of a video: the same key, the same key in NFC (a name typed on another system may
        arrive in NFD, or the other way round), or the only entry with the same file name."""
        if key in self.captions or key in self.errors:
            return key
        match = self._by_nfc.get(unicodedata.normalize("NFC", key))
        return match or self._by_basename.get(posixpath.basename(key))


def sidecar_candidate(key: str) -> tuple[str, int] | None:
    """(stem, preference) when `key` can be a caption sidecar; `.txt` is preferred to `.json` for a stem."""
    stem, suffix = posixpath.splitext(key)  # string ops: PurePosixPath costs seconds at 100k keys
    suffix = suffix.lower()
    if suffix not in SIDECAR_SUFFIXES or posixpath.basename(key) in MANIFEST_NAMES:
        return None
    return stem, SIDECAR_SUFFIXES.index(suffix)


def offer_sidecar(best: dict[str, tuple[int, str]], key: str) -> str | None:
    """Record `key` in `best` (stem -> (preference, sidecar)) if it beats the stem's sidecar so far; its stem
    if it did. The choice is the same whatever order the keys come in."""
    found = sidecar_candidate(key)
    if found is None:
        return None
    stem, rank = found
    if stem in best and best[stem] <= (rank, key):
        return None
    best[stem] = (rank, key)
    return stem


def chosen_sidecars(best: Mapping[str, tuple[int, str]]) -> dict[str, str]:
    """Stem -> the sidecar a video with that stem takes, from what `offer_sidecar` recorded."""
    return {stem: key for stem, (_, key) in best.items()}


def sidecar_map(keys: Iterable[str]) -> dict[str, str]:
    """Stem -> the sidecar a video with that stem takes."""
    best: dict[str, tuple[int, str]] = {}
    for key in keys:
        offer_sidecar(best, key)
    return chosen_sidecars(best)


class CaptionIndex:
    """Finds each video's caption: manifest entries first, then sidecar files.

    prefetched: sidecar key -> a read already under way (`caption_prefetch`); its bytes, or the error the
    read raised, stand for a read made now.
    """

    def __init__(
        self,
        manifest: Manifest,
        sidecars: Mapping[str, str],
        read_bytes,
        prefetched: Mapping[str, Future] | None = None,
    ):
        self.manifest = manifest
        self._sidecars = sidecars
        self._sidecars_nfc = {unicodedata.normalize("NFC", stem): key for stem, key in sidecars.items()}
        self._read_bytes = read_bytes
        self._prefetched = dict(prefetched or {})

    @classmethod
    def build(
        cls,
        store,
        all_keys: Iterable[str],
        manifest_uri: str | None = None,
        *,
        manifest: Manifest | None = None,
        prefetched: Mapping[str, Future] | None = None,
        sidecars: Mapping[str, str] | None = None,
    ) -> CaptionIndex:
        """`store` is the bucket; `all_keys` is every key listed in it (for sidecars, unless `sidecars`, the
        choice over those keys, was made already)."""
        if manifest is None:
            manifest = Manifest.find(store, manifest_uri)
        if sidecars is None:
            sidecars = sidecar_map(all_keys)
        # sidecars are read no further than the limit: a multi-gigabyte "caption" must not fill memory
        return cls(manifest, sidecars, partial(read_sidecar, store), prefetched)

    def _resolve(self, key: str) -> Caption | str:
        """The caption of a video found without a read, or the sidecar to read for it."""
        match = self.manifest.match(key)
        if match in self.manifest.errors:
            return Caption(None, self.manifest.name, self.manifest.errors[match])
        text = self.manifest.captions.get(match) if match else None
        if text is not None:
            return Caption(text, self.manifest.name)
        sidecar = self._sidecar_of(key)
        return Caption(None) if sidecar is None else sidecar

    def lookup(self, key: str) -> Caption:
        found = self._resolve(key)
        return found if isinstance(found, Caption) else self._read_caption(found)

    def _read_caption(self, sidecar: str) -> Caption:
        try:
            early = self._prefetched.pop(sidecar, None)
            raw = early.result() if early is not None else self._read_bytes(sidecar)
            text = _decode_caption(raw, sidecar)
            if sidecar.lower().endswith(".json"):
                record = json.loads(text)
                text = _caption_from_record(record) if isinstance(record, Mapping) else None
                if text is None:
                    return Caption(None, sidecar, f"caption sidecar {sidecar} has no 'caption' field")
            return Caption(text.strip() or None, sidecar)
        except FileNotFoundError:
            return Caption(
                None,
                sidecar,
                f"caption sidecar {sidecar} was removed after the bucket was listed: run again with --retry-failed",
            )
        except json.JSONDecodeError as exc:
            return Caption(None, sidecar, f"caption sidecar {sidecar} is not valid JSON ({exc.msg})")
        except ValueError as exc:
            return Caption(None, sidecar, str(exc))

    def _sidecar_of(self, key: str) -> str | None:
        if not self._sidecars:
            return None
        stem = posixpath.splitext(key)[0]
        return self._sidecars.get(stem) or self._sidecars_nfc.get(unicodedata.normalize("NFC", stem))

    def lookup_many(self, keys: list[str], threads: int = 16) -> list[Caption]:
        """Sidecar reads are one request each on S3, so they go in parallel; manifest hits need no thread.

        (Sending every key through a pool cost 10 s per 100k videos in thread hand-offs alone,
        bench/bench_planning.py.)
        """
        found = [self._resolve(k) for k in keys]
        reads = [i for i, f in enumerate(found) if isinstance(f, str) and f not in self._prefetched]
        if len(reads) >= 2:
            with ThreadPoolExecutor(min(threads, len(reads))) as pool:
                for i, caption in zip(reads, pool.map(lambda i: self._read_caption(found[i]), reads), strict=True):
                    found[i] = caption
        return [f if isinstance(f, Caption) else self._read_caption(f) for f in found]


def read_sidecar(store, key: str) -> bytes:
    """A sidecar's bytes, one past the caption limit at most, so an oversized one is told apart."""
    return store.read_range(key, 0, MAX_CAPTION_BYTES + 1)


def _read_manifest_uri(bucket_store, uri: str) -> tuple[bytes, str]:
    from ..storage.uri import open_store

    if "://" not in uri and not Path(uri).is_absolute() and not Path(uri).exists() and bucket_store.exists(uri):
        return bucket_store.read_bytes(uri), bucket_store.uri(uri)
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_store(parent or ".")
    if not store.exists(name):
        raise ConfigError(f"caption manifest {uri} does not exist: check the path given to --captions")
    return store.read_bytes(name), uri


@dataclass(frozen=True)
class FilterResult:
    key: str
    keep: bool
    caption: str | None
    rule: str | None
    failure: str | None = None  # set when the caption itself is unusable (a `failed` row)


def filter_captions(
    keys: list[str],
    index: CaptionIndex,
    rules: CaptionRules,
    missing_caption: str | None = None,
    judged: Mapping[str, Verdict] | None = None,
) -> list[FilterResult]:
    """Judge each video by its caption; the order of `keys` is kept.

    judged: caption text -> the rules' verdict, worked out beforehand (`caption_prefetch` judges the
    manifest's captions while the bucket is listed); other captions are judged here.
    """
    policy = missing_caption or rules.missing_caption
    results = []
    for key, caption in zip(keys, index.lookup_many(keys), strict=True):
        if caption.error:
            results.append(FilterResult(key, False, None, None, failure=caption.error))
        elif caption.text is None:
            if policy == "keep":
                results.append(FilterResult(key, True, None, None))
            elif policy == "drop":
                results.append(FilterResult(key, False, None, "no-caption"))
            else:
                results.append(
                    FilterResult(key, False, None, None, failure="no caption found (add a sidecar or manifest entry)")
                )
        else:
            verdict = judged.get(caption.text) if judged else None
            if verdict is None:
                verdict = rules.judge(caption.text)
            results.append(FilterResult(key, verdict.keep, caption.text, None if verdict.keep else verdict.rule))
    return results
