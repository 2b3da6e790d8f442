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

On S3 the endpoint, region and credentials come from the usual AWS settings (see
`s3_options`); retries and timeouts are set so that a short outage of the endpoint is ridden
out. Backend errors become one-line `StoreError`s that name the store URL and never a secret.
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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from dice_core.errors import StoreError

COMPLETE = "_COMPLETE.json"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_CHUNK = 8 * 1024 * 1024
# Read once, at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_DIGEST_META = "sha256"
_SECRET_OPTIONS = ("secret", "token", "aws_secret_access_key", "aws_session_token")
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"}


def check_run_id(run_id: str) -> str:
    """Refuse run ids that could escape the store root or confuse paths.

    Raises:
        StoreError: Empty, too long, with separators, `..`, or non-ASCII look-alikes.
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise StoreError(
            f"invalid run id {run_id!r}: use 1 to 80 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return run_id


def _safe_part(part: str) -> bool:
    """A key part that names one level below its parent, and nothing else."""
    return (
        bool(part)
        and unicodedata.normalize("NFKC", part) == part
        and part not in {".", ".."}
        and not any(c in part for c in "/\\\x00")
    )


def _check_part(part: str) -> str:
    if not _safe_part(part):
        raise StoreError(f"invalid store key part {part!r}")
    return part


def owner_marker(key: str) -> str | None:
    """The completion record that vouches for a key: its stage's under `runs/`, its model
    folder's under `models/`; None elsewhere."""
    parts = key.strip("/").split("/")
    if parts[0] == "runs" and len(parts) >= 4:
        return "/".join([*parts[:4], COMPLETE])
    if parts[0] == "models" and len(parts) >= 2:
        return "/".join([*parts[:2], COMPLETE])
    return None


def s3_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """s3fs settings from the usual AWS environment, with retries that ride out an outage.

    Credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or
    AWS_PROFILE and the shared config files) are left to botocore's own lookup. Read here:
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (an S3-compatible server), AWS_REGION, and
    DICE_S3_MAX_ATTEMPTS / DICE_S3_CONNECT_TIMEOUT / DICE_S3_READ_TIMEOUT.

    Args:
        env: The environment to read (default: `os.environ`).

    Returns:
        Keyword arguments for `s3fs.S3FileSystem`.
    """
    env = os.environ if env is None else env
    client: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is the name most tools set.
    if env.get("AWS_REGION") and not env.get("AWS_DEFAULT_REGION"):
        client["region_name"] = env["AWS_REGION"]
    return {
        "client_kwargs": client,
        "config_kwargs": {
            # Standard mode backs off exponentially with jitter (up to 20 s a wait): 8 attempts
            # met refused connections for 37 to 62 s before giving up (measured).
            "retries": {
                "max_attempts": int(_env_number(env, "DICE_S3_MAX_ATTEMPTS", 8)),
                "mode": "standard",
            },
            "connect_timeout": _env_number(env, "DICE_S3_CONNECT_TIMEOUT", 5),
            # A stalled server holds a request this long before it is retried.
            "read_timeout": _env_number(env, "DICE_S3_READ_TIMEOUT", 60),
        },
        # Other processes write to the same prefixes (a resumed run, `dice runs show`):
        # a cached listing would hide their objects.
        "use_listings_cache": False,
    }


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    try:
        value = float(text) if text else float(default)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise StoreError(f"{name}={text!r}: expected a positive number")
    return value


def merge_options(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`, merging nested mappings (client and config settings)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_options(merged[key], value)
        else:
            merged[key] = value
    return merged


def _secrets(options: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, ...]:
    """Every secret value that an error message must not show."""
    found = [env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN")]
    for scope in (options, options.get("client_kwargs") or {}):
        found += [scope.get(name) for name in _SECRET_OPTIONS]
    return tuple(s for s in found if isinstance(s, str) and len(s) >= 4)


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
        storage_options: Passed to fsspec; for S3 they update `s3_options()` (endpoint,
            credentials, retries). Never logged.

    Raises:
        StoreError: The URL names an unknown protocol or bad options.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.root_url = str(root)
        options = dict(storage_options or {})
        if fsspec.utils.get_protocol(self.root_url) in {"s3", "s3a"}:
            options = merge_options(s3_options(), options)
        self._secrets = _secrets(options, os.environ)
        try:
            self.fs, path = fsspec.core.url_to_fs(self.root_url, **options)
        except (ImportError, ValueError, TypeError) as error:
            raise StoreError(f"store {self.root_url}: {self._describe(error)}") from None
        self.root = path.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        # HTTP clients fold `..` in a URL path: on an object store it would leave the root.
        if not self.is_local and not all(_safe_part(p) for p in self.root.split("/")):
            raise StoreError(f"invalid store root {self.root_url!r}: no empty, '.' or '..' parts")

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    # ----------------------------------------------------------------- errors
    @contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Turn a backend error into one StoreError line that names the store URL."""
        try:
            yield
        except StoreError:
            raise
        except Exception as error:  # backends raise OSError, botocore and aiohttp errors
            raise self._store_error(error, action, key) from None

    def _store_error(self, error: Exception, action: str, key: str) -> StoreError:
        where, text = f"store {self.root_url}", self._describe(error)
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, FileNotFoundError) and "specified bucket" in str(error):
            bucket = self.root.split("/", 1)[0]
            return StoreError(f"{where}: the bucket {bucket!r} does not exist (create it first)")
        if isinstance(error, FileNotFoundError):
            return StoreError(f"{where}: {key or self.root} does not exist")
        if isinstance(error, PermissionError) and self.is_local:
            return StoreError(
                f"{where}: permission denied when trying to {action} ({text}); check the "
                "folder's owner and mode"
            )
        if isinstance(error, PermissionError):
            return StoreError(
                f"{where}: access denied when trying to {action} ({text}); check the "
                "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
                "store block) and their permissions on the bucket"
            )
        if names & _NO_CREDENTIALS:
            return StoreError(
                f"{where}: no usable credentials ({text}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a store block"
            )
        if names & _UNREACHABLE or isinstance(error, (ConnectionError, TimeoutError)):
            endpoint = self._endpoint()
            return StoreError(
                f"{where}: cannot reach the endpoint {endpoint} ({text}); check "
                "AWS_ENDPOINT_URL and the network"
            )
        return StoreError(f"{where}: cannot {' '.join(filter(None, [action, key]))}: {text}")

    def _describe(self, error: BaseException) -> str:
        text = _describe(error)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _endpoint(self) -> str:
        client = getattr(self.fs, "client_kwargs", None) or {}
        return client.get("endpoint_url") or "(AWS default)"

    # ------------------------------------------------------------------ paths
    def path(self, key: str) -> str:
        """The full filesystem path of a key (parts are checked; nothing escapes the root)."""
        parts = [_check_part(p) for p in key.strip("/").split("/")]
        return "/".join([self.root, *parts])

    def check_writable(self) -> None:
        """Write, read back and delete a probe object.

        Raises:
            StoreError: The root cannot be written; names the store URL and the reason.
        """
        probe = f".probe-{os.getpid()}"
        try:
            if self.is_local:
                with self._errors("create the folder"):
                    self.fs.makedirs(self.root, exist_ok=True)
            # On object stores nothing is created here: a missing bucket is an error to report.
            self.write_bytes(probe, b"ok")
            self.read_bytes(probe)
            self.delete(probe)
        except StoreError as error:
            reason = str(error).removeprefix(f"store {self.root_url}: ")
            raise StoreError(f"store {self.root_url} is not writable: {reason}") from None

    # ------------------------------------------------------------------ files
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically."""
        self._write(key, io.BytesIO(data), hashlib.sha256(data).hexdigest())

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_json(self, key: str, value: Any) -> None:
        self.write_text(key, json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    def write_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self.write_text(key, text)

    def put_file(self, local: Path, key: str) -> None:
        """Upload a local file, streamed in chunks (never whole in memory).

        On object stores the file is hashed first and its digest travels with the object, so
        completing a stage does not download what was just uploaded.
        """
        digest = None if self.is_local else _file_digest(Path(local))
        with open(local, "rb") as source:
            self._write(key, source, digest)

    def _write(
        self, key: str, source: io.RawIOBase | io.BufferedIOBase, digest: str | None = None
    ) -> None:
        target = self.path(key)
        with self._errors("write", key):
            if self.is_local:
                _write_local(target, source)
                return
            extra = {"Metadata": {_DIGEST_META: digest}} if digest else {}
            with self.fs.open(target, "wb", **extra) as sink:
                shutil.copyfileobj(source, sink, _CHUNK)

    def read_bytes(self, key: str) -> bytes:
        """The bytes of a small object (JSON, JSONL); large files go through `local_dir`."""
        with self._errors("read", key):
            with self.fs.open(self.path(key), "rb") as handle:
                return handle.read()

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    def read_jsonl(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_text(key).splitlines() if line.strip()]

    def exists(self, key: str) -> bool:
        path = self.path(key)
        with self._errors("look up", key):
            return self.fs.exists(path)

    def list(self, prefix: str) -> list[str]:
        """Keys of the files under a prefix, relative to the root, sorted."""
        base = self.path(prefix)
        with self._errors("list", prefix):
            if not self.fs.exists(base):
                return []
            found = self.fs.find(base)
        return sorted(_relative(self.root, p) for p in found)

    def delete(self, prefix: str) -> None:
        """Remove a key or a whole prefix (missing is fine)."""
        target = self.path(prefix)
        with self._errors("delete", prefix):
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)

    def digest(self, key: str) -> str:
        """SHA-256 of an object's bytes, streamed."""
        hasher = hashlib.sha256()
        with self._errors("read", key):
            with self.fs.open(self.path(key), "rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    hasher.update(chunk)
        return hasher.hexdigest()

    def file_meta(self, key: str) -> dict[str, Any]:
        """`sha256` and `bytes` of a stored file; on object stores the digest recorded at
        upload is trusted, and only objects without one are read back."""
        path = self.path(key)
        with self._errors("look up", key):
            size = int(self.fs.size(path))
            meta = {} if self.is_local else self.fs.metadata(path)
        digest = meta.get(_DIGEST_META) or self.digest(key)
        return {"sha256": digest, "bytes": size}

    def copy(self, source: str, target: str) -> None:
        """Copy one file inside the store: server-side on object stores (nothing passes
        through this machine), atomic on a local folder."""
        src, dst = self.path(source), self.path(target)
        with self._errors("copy", f"{source} to {target}"):
            if self.is_local:
                with open(src, "rb") as handle:
                    _write_local(dst, handle)
            else:
                self.fs.copy(src, dst)

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
        else a streamed download into `cache_root` (kept; a finished download is reused)."""
        if self.is_local:
            return Path(self.path(prefix))
        # Named by the content of the owning completion record: a run id reused in a new
        # bucket, or a stage recomputed, never finds an older download.
        marker = owner_marker(prefix)
        record = self.digest(marker) if marker and self.exists(marker) else "none"
        name = hashlib.sha256(f"{self.root_url}/{prefix}@{record}".encode()).hexdigest()[:20]
        target = Path(cache_root) / name
        if (target / ".complete").is_file():
            return target
        _clear_dead_downloads(Path(cache_root))
        staging = Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=_mkdir(cache_root)))
        try:
            for key in self.list(prefix):
                dest = staging / key[len(prefix) + 1 :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._errors("download", key):
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
            files[key[len(ref.prefix) + 1 :]] = self.file_meta(key)
        record = {**record, "files": files}
        self.write_json(f"{ref.prefix}/{COMPLETE}", record)
        return record

    def copy_stage(self, source: StageRef, target: StageRef) -> bool:
        """Copy a completed stage (its files, then its record last) to another run.

        Returns:
            False when the source has not completed (nothing is copied), else True.
        """
        if not self.is_complete(source):
            return False
        if self.is_complete(target):
            return True
        self.delete(target.prefix)
        for key in self.list(source.prefix):
            name = key[len(source.prefix) + 1 :]
            if name != COMPLETE:
                self.copy(key, f"{target.prefix}/{name}")
        self.copy(f"{source.prefix}/{COMPLETE}", f"{target.prefix}/{COMPLETE}")
        return True

    def runs(self) -> Iterator[str]:
        """Run ids under this root."""
        base = self.path("runs")
        with self._errors("list", "runs"):
            if not self.fs.exists(base):
                return iter(())
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return iter(sorted(n for n in names if _RUN_ID.fullmatch(n)))


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
        # mkstemp makes the file private (0600); a store is shared, so give it the mode a
        # plain open() would have given it under the process's umask.
        os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _clear_dead_downloads(cache_root: Path) -> None:
    """Remove the staging folders of downloads whose process died (a killed run's)."""
    for staging in cache_root.glob(".download-*-*"):
        pid = staging.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _describe(error: BaseException) -> str:
    """A one-line description of a backend error, without credentials."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
