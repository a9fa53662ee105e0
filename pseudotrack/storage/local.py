"""The local backend: a directory, with atomic writes (a temporary name beside the target, renamed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError
from ..faults import fault_point
from .base import TMP_MARK, ObjectInfo, ObjectStore, check_key, copy_atomically, has_suffix, usable_key


class LocalStore(ObjectStore):
    """A directory; atomic writes go to a unique temporary name beside the target and are renamed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))

    def __getstate__(self) -> dict:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict) -> None:
        self.root = Path(state["root"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStore) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("local", self.root))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def uri(self, key: str = "") -> str:
        # Percent-encoded (RFC 8089); open_store and webdataset's gopen both decode it.
        path = self.root / check_key(key, allow_empty=True) if key else self.root
        return path.as_uri()

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / check_key(prefix.strip("/"), allow_empty=True))

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        # size + mtime_ns, the way make and rsync notice changes: hashing 100k videos to list them is
        # not affordable, and inode numbers would change on a plain copy of the bucket.
        return ObjectInfo(key, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}", st.st_mtime)

    def list(
        self, prefix: str = "", suffixes: tuple[str, ...] | None = None, *, include_unsafe: bool = False
    ) -> Iterator[ObjectInfo]:
        check_key(prefix, allow_empty=True)
        base_rel = prefix.rpartition("/")[0]
        base = self.root / base_rel if base_rel else self.root
        found: list[ObjectInfo] = []
        seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: symlink loops end here
        stack = [(base, base_rel + "/" if base_rel else "")] if base.is_dir() else []
        while stack:
            directory, rel = stack.pop()
            try:
                st = directory.stat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(directory))
            except FileNotFoundError:  # removed while we walked
                continue
            for entry in entries:
                key = rel + entry.name
                if TMP_MARK in entry.name:
                    continue
                try:
                    if entry.is_dir():  # symlinked folders too: a bucket may be assembled from links
                        if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append((Path(entry.path), key + "/"))
                    elif (
                        entry.is_file()
                        and key.startswith(prefix)
                        and has_suffix(key, suffixes)
                        and (include_unsafe or usable_key(key, self))
                    ):
                        found.append(self._info(key, entry.stat()))
                except FileNotFoundError:
                    continue
        # Code-point order is UTF-8 byte order, which is S3's listing order.
        found.sort(key=lambda i: i.key)
        yield from found

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None
        except IsADirectoryError:
            raise FileNotFoundError(f"{self.uri(key)} is a directory, not an object") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length} for {self.uri(key)}")
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from None

    def _tmp_beside(self, path: Path) -> Path:
        return path.with_name(f".{path.name[:100]}{TMP_MARK}{uuid.uuid4().hex}")

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview | BinaryIO) -> ObjectInfo:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_beside(path)
        try:
            with open(tmp, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    fh.write(data)
                else:
                    shutil.copyfileobj(data, fh, 1 << 20)
                fh.flush()
                os.fsync(fh.fileno())
            fault_point("store.tmp_written")  # crash tests: the bytes are down, not yet under their name
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._info(key, path.stat())

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_beside(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails if the name exists, and the name only ever points at a complete file.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local_path: str | os.PathLike, key: str) -> ObjectInfo:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"cannot upload {src} to {self.uri(key)}: no such file")
        with open(src, "rb") as fh:
            return self.write_bytes(key, fh)

    def get_file(self, key: str, local_path: str | os.PathLike) -> None:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri(key)} does not exist")
        copy_atomically(lambda tmp: shutil.copyfile(path, tmp), Path(local_path))

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return self._info(key, st) if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def check_readable(self) -> None:
        uri = str(self.root)
        if not self.root.exists():
            raise ConfigError(f"{uri}: no such directory; create it or pass the directory holding the data")
        if not self.root.is_dir():
            raise ConfigError(f"{uri} is a file, not a directory; pass the directory that holds the data")
        try:
            next(os.scandir(self.root), None)
        except PermissionError as exc:
            raise ConfigError(f"{uri} cannot be listed ({exc.strerror}); fix its permissions") from None

    def check_writable(self) -> None:
        uri = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            blocker = next((p for p in (self.root, *self.root.parents) if p.is_file()), None)
            raise ConfigError(
                f"cannot create the directory {uri}: {blocker or 'a parent'} is a file, not a directory; "
                "pass a directory you can write to"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot create the directory {uri} ({exc.strerror}); pass a directory you can write to"
            ) from None
        if not self.root.is_dir():
            raise ConfigError(f"{uri} is a file, not a directory; pass a directory you can write to")
        # A real write, not os.access: access() says yes to root even on read-only mounts.
        probe = self.root / f".probe{TMP_MARK}{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"{uri} is not writable ({exc.strerror}); fix its permissions or pass another directory"
            ) from None
