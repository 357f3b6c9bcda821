"""fsspec helpers: the same code for local folders, gs:// buckets and memory:// in tests."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


class StorageError(RuntimeError):
    """The run's storage cannot be used; the message says why and what to do."""


def explain(url: str, error: BaseException) -> str:
    """A storage failure at `url` in words, with what to do about it: the cloud's usual failures (no bucket,
    no permission, no answer) get their remedy, anything else its own message."""
    protocol, path = fsspec.core.split_protocol(url)
    bucket = path.split("/", 1)[0]
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{url}: {disk_full(url)}"
    if protocol in (None, "file", "local"):
        return f"{url}: {type(error).__name__}: {text}"
    if isinstance(error, FileNotFoundError):
        return (f"{url}: the bucket {bucket!r} does not exist, or these credentials cannot see it: create it "
                f"(`gcloud storage buckets create gs://{bucket} --location=REGION`) or name one that does")
    denied = isinstance(error, PermissionError) or text.startswith("Forbidden")
    if denied or getattr(error, "code", 0) in (401, 403):
        return (f"{url}: permission denied ({text}). The account behind the credentials "
                "(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or the VM's service "
                f"account) needs roles/storage.objectAdmin on gs://{bucket} (roles/storage.objectViewer to read only)")
    import requests  # google-cloud-storage's transport: its connection errors are not the builtin ones

    unanswered = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)
    if isinstance(error, unanswered) or "Cannot connect" in text:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        where = f"the GCS emulator at STORAGE_EMULATOR_HOST={emulator}" if emulator else "Google Cloud Storage"
        return f"{url}: {where} does not answer ({text}); check the network and try again"
    return f"{url}: {type(error).__name__}: {text}"


def local_free_bytes(url: str) -> int | None:
    """The free bytes of the disk that holds `url` (or would: its nearest existing folder); None for a bucket."""
    if "://" in url:
        return None
    where = os.path.abspath(url)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    return shutil.disk_usage(where).free


def disk_full(url: str, remedy: str = "point root at a bigger disk") -> str:
    """What a full disk (or an exhausted quota) under `url` means, and what to do: free space, or `remedy`."""
    free = local_free_bytes(url)
    if free is None:
        return "the bucket's quota is exhausted (no space left): raise it or free space in the bucket"
    return f"the disk holding it is full ({free / 2**20:,.1f} MB free): free space there, or {remedy}"


FULL_DISK = ("No space left on device", "database or disk is full", "Disk quota exceeded")
"""How a full disk reads in errors that carry it only as text: Ray's remote tracebacks, SQLite's (MLflow's store)."""


def storage_failure(error: BaseException) -> OSError | None:
    """The OSError behind `error` (itself, or one of its causes), if it failed on I/O; else None. Ray's errors
    from tasks and actors may carry the remote traceback as text only, so that text is read too."""
    seen: set[int] = set()
    texts = []
    todo = [error]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        # not Ray's RayTaskError(OSError): it lost the errno, its `cause` has it
        if isinstance(error, OSError) and not isinstance(getattr(error, "cause", None), OSError):
            return error
        seen.add(id(error))
        if any(sign in str(error) for sign in FULL_DISK):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if type(error).__module__.startswith("ray."):
            texts.append(str(error))
        todo += [getattr(error, "cause", None), getattr(error, "controller_failure", None),  # Ray, Ray Train
                 *getattr(error, "worker_failures", {}).values(), error.__cause__]
    found = re.findall(r"^[\w.]*?(\w*(?:Connect|Timeout|FileNotFound|Permission)\w*Error): (.*)$", "\n".join(texts),
                       re.MULTILINE)
    if not found:
        return None
    name, message = found[-1]
    kind = FileNotFoundError if "FileNotFound" in name else PermissionError if "Permission" in name else ConnectionError
    return kind(message)


NO_ROOM = "no room for its next checkpoint"
"""pipeline/train.py's TrainingError when a checkpoint would not fit: its workers stop before they fill the disk."""


def is_full_disk(error: BaseException) -> bool:
    """Whether `error` is a full disk or an exhausted quota: an I/O error with ENOSPC/EDQUOT behind it, or training
    stopped for want of room; as it is or wrapped in a Ray task's error (the remote one's text is read too)."""
    failure = storage_failure(error)
    if failure is not None and failure.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    chain = (error, getattr(error, "cause", None), error.__cause__)  # a Ray task's error holds the task's as `cause`
    return any(NO_ROOM in str(e) for e in chain if e is not None)


def check_writable(url: str) -> None:
    """Fail before any work starts when the root cannot be written to (no bucket, no permission, no network):
    writes one empty object under it and deletes it again."""
    fs, path = filesystem(url)
    probe = join(path, f".gss-write-check-{uuid.uuid4().hex}")
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - each client fails its own way; explain() sorts them out
        raise StorageError(f"cannot write to root: {explain(url, e)}") from e


def absolute(url: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working folder); URLs unchanged."""
    return url if not url or "://" in url else os.path.abspath(url)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it.

    Local: a temporary name in the same folder, then a rename. Object stores (gs://) publish an
    object only when its upload completes, so a plain write is already atomic there.
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk leaves no half-written file behind
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def ray_storage(url: str) -> tuple[str, Any]:
    """Where Ray Train persists a run's checkpoints: (storage_path, storage_filesystem). Local folders as they
    are; a bucket through fsspec (gcsfs for gs://: the usual Google credentials, and STORAGE_EMULATOR_HOST for an
    emulator) wrapped for pyarrow, instead of pyarrow's own GCS client, which knows neither the config's
    storage options nor an emulator."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return url, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


def ray_checkpoint_url(checkpoint: Any, fs: fsspec.AbstractFileSystem) -> str:
    """A Ray Train checkpoint's location as a URL the rest of the pipeline reads (gs://bucket/..., or a local path)."""
    return checkpoint.path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(checkpoint.path)
