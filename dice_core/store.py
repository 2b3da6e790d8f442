"""The artifact store: one root (a local folder or any fsspec URL such as `s3://bucket/prefix`).

Layout under the root:

    runs/<run_id>/manifest.json                  config, recipe digest, code version
    runs/<run_id>/round-<t>/<stage>/...          a stage's files
    runs/<run_id>/round-<t>/<stage>/_COMPLETE.json   written last: the stage record
    models/<name>/...                            converted base models

Each file is written atomically (local: temporary file then rename; object stores: an object
becomes visible only when its upload closes). A stage of several files is trusted only once
its completion record exists; a stage without one is cleared before it runs again, so a
crashed or repeated run never reads half an artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from dice_core.errors import StoreError

COMPLETE = "_COMPLETE.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_CHUNK = 8 * 1024 * 1024


def check_run_id(run_id: str) -> str:
    """Refuse run ids that could escape the store root or confuse paths.

    Raises:
        StoreError: Empty, too long, with separators, `..`, or non-ASCII look-alikes.
    """
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise StoreError(
            f"invalid run id {run_id!r}: use 1 to 80 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return run_id


def _check_part(part: str) -> str:
    normal = unicodedata.normalize("NFKC", part)
    if (
        not part
        or normal != part
        or part in {".", ".."}
        or "/" in part
        or "\\" in part
        or "\x00" in part
    ):
        raise StoreError(f"invalid store key part {part!r}")
    return part


@dataclass(frozen=True)
class StageRef:
    """One stage of one round of one run."""

    run_id: str
    round: int
    stage: str

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}/round-{self.round}/{self.stage}"


class ArtifactStore:
    """Read and write artifacts under one root URL.

    Args:
        root: A local folder or an fsspec URL (`s3://bucket/prefix`).
        storage_options: Passed to fsspec (for S3: endpoint, credentials, retries).
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root_url = str(root)
        self.fs, path = fsspec.core.url_to_fs(self.root_url, **(storage_options or {}))
        self.root = path.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    # ------------------------------------------------------------------ paths
    def path(self, key: str) -> str:
        """The full filesystem path of a key (parts are checked; nothing escapes the root)."""
        parts = [_check_part(p) for p in key.strip("/").split("/")]
        return "/".join([self.root, *parts])

    def check_writable(self) -> None:
        """Write and delete a probe object.

        Raises:
            StoreError: The root cannot be written; names the store URL.
        """
        probe = f".probe-{os.getpid()}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.fs.rm(self.path(probe))
        except StoreError:
            raise
        except Exception as error:  # any backend error means the same to the user
            raise StoreError(f"store {self.root_url} is not writable: {_describe(error)}") from None

    # ------------------------------------------------------------------ files
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically."""
        self._write(key, io.BytesIO(data))

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_json(self, key: str, value: Any) -> None:
        self.write_text(key, json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    def write_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self.write_text(key, text)

    def put_file(self, local: Path, key: str) -> None:
        """Upload a local file, streamed in chunks."""
        with open(local, "rb") as source:
            self._write(key, source)

    def _write(self, key: str, source: io.RawIOBase | io.BufferedIOBase) -> None:
        target = self.path(key)
        try:
            if self.is_local:
                _write_local(target, source)
            else:
                with self.fs.open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, _CHUNK)
        except OSError as error:
            raise StoreError(
                f"store {self.root_url}: cannot write {key}: {_describe(error)}"
            ) from None

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.fs.open(self.path(key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise StoreError(f"store {self.root_url}: {key} does not exist") from None

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    def read_jsonl(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_text(key).splitlines() if line.strip()]

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def list(self, prefix: str) -> list[str]:
        """Keys of the files under a prefix, relative to the root, sorted."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        return sorted(_relative(self.root, p) for p in found)

    def delete(self, prefix: str) -> None:
        """Remove a key or a whole prefix (missing is fine)."""
        target = self.path(prefix)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def digest(self, key: str) -> str:
        """SHA-256 of an object's bytes, streamed."""
        hasher = hashlib.sha256()
        with self.fs.open(self.path(key), "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                hasher.update(chunk)
        return hasher.hexdigest()

    # ------------------------------------------------------------ folders
    def put_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Upload every file of a local folder under a prefix; returns the keys written."""
        keys = []
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            key = f"{prefix}/{file.relative_to(local_dir).as_posix()}"
            self.put_file(file, key)
            keys.append(key)
        return keys

    def local_dir(self, prefix: str, cache_root: Path) -> Path:
        """A local folder with the files under a prefix: the folder itself on a local store,
        else a download into `cache_root` (kept; a finished download is reused)."""
        if self.is_local:
            return Path(self.path(prefix))
        name = hashlib.sha256(f"{self.root_url}/{prefix}".encode()).hexdigest()[:20]
        target = Path(cache_root) / name
        if (target / ".complete").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_mkdir(cache_root)))
        try:
            for key in self.list(prefix):
                dest = staging / key[len(prefix) + 1 :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open(self.path(key), "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            (staging / ".complete").write_text("ok")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    # ------------------------------------------------------------- stages
    def is_complete(self, ref: StageRef) -> bool:
        return self.exists(f"{ref.prefix}/{COMPLETE}")

    def stage_record(self, ref: StageRef) -> dict[str, Any]:
        """The completion record of a finished stage.

        Raises:
            StoreError: The stage has not completed.
        """
        if not self.is_complete(ref):
            raise StoreError(
                f"store {self.root_url}: stage {ref.stage} of round {ref.round} of run "
                f"{ref.run_id} has not completed"
            )
        return self.read_json(f"{ref.prefix}/{COMPLETE}")

    def begin_stage(self, ref: StageRef) -> None:
        """Clear what an interrupted attempt of this stage left behind."""
        if self.is_complete(ref):
            raise StoreError(f"stage {ref.prefix} is already complete")
        self.delete(ref.prefix)

    def complete_stage(self, ref: StageRef, record: dict[str, Any]) -> dict[str, Any]:
        """Publish a stage: hash its files into the record, then write the record last."""
        files = {}
        for key in self.list(ref.prefix):
            name = key[len(ref.prefix) + 1 :]
            files[name] = {"sha256": self.digest(key), "bytes": self.fs.size(self.path(key))}
        record = {**record, "files": files}
        self.write_json(f"{ref.prefix}/{COMPLETE}", record)
        return record

    def runs(self) -> Iterator[str]:
        """Run ids under this root."""
        base = self.path("runs")
        if not self.fs.exists(base):
            return iter(())
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return iter(sorted(n for n in names if _RUN_ID.match(n)))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _relative(root: str, path: str) -> str:
    prefix = root.rstrip("/") + "/"
    assert path.startswith(prefix), (root, path)
    return path[len(prefix) :]


def _mkdir(path: Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _write_local(target: str, source: io.RawIOBase | io.BufferedIOBase) -> None:
    folder = Path(target).parent
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as sink:
            shutil.copyfileobj(source, sink, _CHUNK)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _describe(error: BaseException) -> str:
    """A one-line description of a backend error, without credentials."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
