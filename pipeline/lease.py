"""One writer per folder: the lease a command takes on the folder it writes (a training run, a dataset, eval results)
before it writes anything there, so that two people starting the same run cannot both write it.

The lease is a small JSON file, `<folder>/_LEASE.json`: the holder's host, pid, a token unique to this taking, when
it was taken, and a heartbeat time that a daemon thread of the holder renews every `stale_s / 6` seconds. Another
command that finds it stops at once (`LeaseHeld`, one line: who, since when, what to do), unless the lease has
lapsed: its heartbeat is older than `stale_s` (STALE_S, or $GSS_LEASE_STALE_S), or its holder ran on this host and
that process is gone. A lapsed lease is taken over (one line says whose it was) and the command goes on: the stages
resume from what the dead one left. Heartbeats are compared with this host's clock: hosts keep NTP time.

Every change is a compare-and-swap, so that of two processes racing to create, renew, take over or delete, exactly
one wins:
  gs://   GCS's generation preconditions, through google-cloud-storage: `if_generation_match=0` creates the object
          only if it is absent, `if_generation_match=<the generation we read or wrote>` replaces or deletes only that
          version; a read's generation is that of the very bytes read (the download's own header). (The local GCS
          server of the tests, fake-gcs-server, honours them on uploads, not on deletes: there a stale delete goes
          through, as tests/test_lease.py records.)
  local   creating is a hard link of a whole temporary file (it fails if the name exists, as O_EXCL does, and
          readers never see half a file); replacing and deleting compare the file with what we last wrote under an
          exclusive flock of the folder, which every change takes.

`hold_lease` is reentrant in one process: a command holding a folder (`gss run`) calls stages that take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import StorageError, absolute, filesystem, join, storage_failure

LEASE = "_LEASE.json"
STALE_S = 60.0  # a heartbeat this old means the holder is dead (it renews every STALE_S / 6)
HOST = socket.gethostname()


class LeaseHeld(StorageError):
    """Another live process holds the folder's lease; the message says who and what to do."""


def stale_seconds() -> float:
    return float(os.environ.get("GSS_LEASE_STALE_S", STALE_S))


def _process_started(pid: int) -> float | None:
    """When process `pid` of this host started, None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, TypeError):
        return None


def _ended_here(record: dict) -> bool:
    """The holder ran on this host and its process is gone (its pid free, or now another process's)."""
    if record.get("host") != HOST:
        return False
    started = _process_started(record.get("pid"))
    return started is None or abs(started - (record.get("process_started") or 0)) > 0.5


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


class Lease:
    """One taking of the lease file at `url`; `take` it, `release` it. `lost` says why, if another process took it
    over while this one held it (its heartbeat stalled for longer than `stale_s`)."""

    def __init__(self, url: str, what: str, stale_s: float | None = None):
        self.url, self.what, self.stale_s = url, what, stale_s or stale_seconds()
        self.folder = url.rsplit("/", 1)[0]
        self.store = _store(url)
        now = time.time()
        self.record = {"what": what, "host": HOST, "pid": os.getpid(), "process_started": _process_started(os.getpid()),
                       "token": uuid.uuid4().hex, "started": now, "heartbeat": now}
        self.version: Any = None  # of the file as we last wrote it
        self.lost = ""
        self.holds = 0  # open `hold_lease` blocks of this process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {url}", daemon=True)

    @classmethod
    def take(cls, url: str, what: str, stale_s: float | None = None) -> Lease:
        """Create the lease, or take over a lapsed one; raises LeaseHeld if a live process holds it."""
        lease = cls(url, what, stale_s)
        while lease.version is None:
            lease.version = lease.store.write(lease._bytes(), None)
            if lease.version is not None:
                break
            data, version = lease.store.read()
            if data is None:
                continue  # released in between: create it again
            held = _parse(data)
            if held.get("token") == lease.record["token"]:  # our create went through; its answer was lost
                lease.version = version
                break
            age = time.time() - held.get("heartbeat", 0)
            if age < lease.stale_s and not _ended_here(held):
                raise LeaseHeld(lease._held_by(held, age))
            lease.version = lease.store.write(lease._bytes(), version)  # None: another one took it over first
            if lease.version is not None:
                why = "its process has ended" if _ended_here(held) else f"past the {lease.stale_s:g} s timeout"
                print(f"[lease] took over the lease of {lease.folder} from {held.get('what', '?')} on host "
                      f"{held.get('host', '?')}, pid {held.get('pid', '?')}: last heartbeat {age:.0f} s ago, {why}",
                      flush=True)
        lease._thread.start()
        return lease

    def release(self, delete: bool = True) -> None:
        """Stop renewing, and delete the lease if it is still ours. `delete=False` (the storage is gone: no waiting
        for its retries) leaves it to lapse: at once for this host's next launch, which finds this process gone."""
        self._stop.set()
        if not delete:
            return
        self._thread.join()
        try:
            if not self.lost and self.store.read()[1] == self.version:
                self.store.delete(self.version)  # conditional too: between that read and this, someone may take it
        except Exception as e:  # noqa: BLE001 - storage gone: a later command takes the lapsed lease over
            print(f"[lease] could not delete {self.url} ({type(e).__name__}: {e}); it lapses in {self.stale_s:g} s",
                  file=sys.stderr)

    def renew(self) -> None:
        """A heartbeat, if the lease is still ours; else `lost` says who took it."""
        record = {**self.record, "heartbeat": time.time()}
        version = self.store.write(_dumps(record), self.version)
        if version is None:
            data, version = self.store.read()
            held = _parse(data or b"{}")
            if held.get("token") != self.record["token"]:  # not just our own write whose answer was lost
                by = (f"taken over by {held.get('what', '?')} on host {held.get('host', '?')}, pid {held.get('pid')}"
                      if held else "deleted")
                self.lost = (f"the lease of {self.folder} was {by} while this process held it (its last heartbeat "
                             f"{time.time() - self.record['heartbeat']:.0f} s ago): another process may have "
                             "written there too; check the results before using them")
                print(f"[lease] {self.lost}", file=sys.stderr, flush=True)
                return
        self.record, self.version = record, version

    def _beat(self) -> None:
        while not self.lost and not self._stop.wait(self.stale_s / 6):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a storage blip: the next beat tries again
                if not self._stop.is_set():
                    print(f"[lease] heartbeat of {self.url} failed ({type(e).__name__}: {e})", file=sys.stderr)

    def _bytes(self) -> bytes:
        return _dumps(self.record)

    def _held_by(self, held: dict, age: float) -> str:
        left = max(0.0, self.stale_s - age)
        return (f"{self.folder} is being written by {held.get('what', '?')} on host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}, since {_when(held.get('started', 0))} (last heartbeat {age:.0f} s ago): "
                f"wait for it to finish, or stop it; if that process is dead, run this again in {left:.0f} s, when "
                f"its lease lapses, or delete {self.url}")


def _dumps(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _parse(data: bytes) -> dict:
    """A lease record; anything unreadable counts as a lease that lapsed long ago."""
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


_held: dict[str, Lease] = {}  # this process's leases, by URL
_held_lock = threading.Lock()


@contextlib.contextmanager
def hold_lease(folder: str, what: str, stale_s: float | None = None) -> Iterator[Lease]:
    """Hold `folder`'s lease while the block runs (`what`: the command, for whoever is refused): taken before
    anything is written, renewed by a daemon thread, deleted at the end if still ours. Reentrant in one process.
    Raises LeaseHeld if another live process holds it; StorageError at the end if it was taken from us."""
    url = join(absolute(folder), LEASE)
    with _held_lock:
        lease = _held[url] = _held.get(url) or Lease.take(url, what, stale_s)
        lease.holds += 1
    failure = None
    try:
        yield lease
    except BaseException as e:
        failure = e
        raise
    finally:
        with _held_lock:
            lease.holds -= 1
            if not lease.holds:
                del _held[url]
                lease.release(delete=failure is None or storage_failure(failure) is None)
    if lease.lost and not lease.holds:
        raise StorageError(lease.lost)


# ---------------------------------------------------------------------------------------------------
# Where the lease file lives: read() -> (data, version) or (None, None); write(data, expected version, None: only if
# absent) -> the new version or None; delete(expected version) -> whether it deleted.


def _store(url: str):
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return _LocalFile(path)
    if "gs" in fs.protocol:
        return _GCSObject(fs, path)
    raise StorageError(f"{url}: leases (one writer per run) need a local folder or gs://, not {fs.protocol}")


class _LocalFile:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[bytes | None, bytes | None]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data  # the content is the version: it holds a unique token and a new heartbeat each time

    def write(self, data: bytes, expected: bytes | None) -> bytes | None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            with self._locked():
                if expected is None:
                    os.link(tmp, self.path)
                elif self.read()[1] != expected:
                    return None
                else:
                    os.replace(tmp, self.path)
            return data
        except FileExistsError:
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, expected: bytes) -> bool:
        with self._locked():
            if self.read()[1] != expected:
                return False
            os.unlink(self.path)
            return True


GCS_RETRY_S = 30.0  # how long a request is retried, about as gcsfs did (6 tries, 31-36 s apart): then it fails
GCS_TIMEOUT_S = 30.0  # per try, for one small object (gcsfs: aiohttp's 30 s to connect)


@contextlib.contextmanager
def _refusals_as_os_errors() -> Iterator[None]:
    """google-cloud-storage's refusals raised as gcsfs raised them, the OSErrors that `storage_failure` and `explain`
    read: no permission (401, 403) a PermissionError, no bucket (404, where an absent object was not expected) a
    FileNotFoundError."""
    from google.api_core.exceptions import Forbidden, NotFound, Unauthorized

    try:
        yield
    except (Forbidden, Unauthorized) as e:
        raise PermissionError(str(e)) from e
    except NotFound as e:
        raise FileNotFoundError(str(e)) from e


class _GCSObject:
    """The lease as an object of a bucket; its generation is the version. Every request is conditional, so a retry
    is safe: one whose first try went through but whose answer was lost fails its precondition, and `Lease` then
    finds its own token in the object."""

    def __init__(self, fs, path: str):
        from google.cloud import storage
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.fs, self.folder = fs, path.rsplit("/", 1)[0]
        bucket, self.key, _ = fs.split_path(path)
        # with STORAGE_EMULATOR_HOST: that server, anonymously; else Application Default Credentials. No project:
        # object requests name none
        self.bucket = storage.Client(project=None).bucket(bucket)
        self.retry = DEFAULT_RETRY.with_timeout(GCS_RETRY_S)  # 429, 5xx, connection errors and timeouts

    def read(self) -> tuple[bytes | None, int | None]:
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self.key)  # a new Blob each time: one that knows a generation reads only that one
        with _refusals_as_os_errors():
            try:
                data = blob.download_as_bytes(timeout=GCS_TIMEOUT_S, retry=self.retry)
            except NotFound:
                return None, None
        return data, blob.generation  # from the download's headers (its retries ask for that generation)

    def write(self, data: bytes, expected: int | None) -> int | None:
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self.key)
        with _refusals_as_os_errors():
            try:
                blob.upload_from_string(data, content_type="application/json", if_generation_match=expected or 0,
                                        timeout=GCS_TIMEOUT_S, retry=self.retry)
            except PreconditionFailed:
                return None
            finally:
                self.fs.invalidate_cache(self.folder)  # gcsfs's listings in this process see the change
        return blob.generation

    def delete(self, expected: int) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with _refusals_as_os_errors():
            try:
                self.bucket.blob(self.key).delete(if_generation_match=expected, timeout=GCS_TIMEOUT_S,
                                                  retry=self.retry)
            except (NotFound, PreconditionFailed):  # gone, or not that version any more
                return False
            finally:
                self.fs.invalidate_cache(self.folder)
        return True
