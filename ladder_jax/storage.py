"""Where a user's files live: a local path or object storage (`gs://bucket/path`), one path type.

Every path a user gives (run directories, data, tokenizers, conversions, outputs) goes through
`path()`, which returns an `etils.epath.Path`: pathlib's interface on local disk, and on gs:// the
same interface over gcsfs (the backend orbax uses too; orbax writes the arrays through
tensorstore's GCS driver). Object storage cannot append, rename atomically or take an O_EXCL
file, so three things differ there and live here:

- `ObjectLock`: a lock object created with a generation precondition (create only if absent),
  carrying its holder's host, pid and a heartbeat the holder refreshes;
- `LocalMirror`: files written by appending (metrics.jsonl, TensorBoard event files, profiles)
  are written to a local directory and copied into the run directory at each log interval;
- `stage`: files a C++ reader needs on local disk (ArrayRecord shards) are copied into a local
  cache once, checked by size, and reused on restart.

The emulator variables: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (orbax's arrays) point every client at a GCS emulator (docs/pods.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path as LocalPath

from etils import epath

from .errors import LadderError

Path = epath.Path
OBJECT_SCHEMES = ("gs://",)
CACHE_ENV = "LADDER_JAX_CACHE"  # where staged shards and local mirrors go (default ~/.cache/ladder_jax)


class StorageError(LadderError):
    """A storage URL that cannot be used: an unknown scheme, a bucket that does not exist, a
    missing client library. The message says what to do."""


def is_remote(p) -> bool:
    return str(p).startswith(OBJECT_SCHEMES)


def path(p) -> epath.Path:
    """The one path type for a path a user gives: local, or gs://bucket/... (checked: the scheme
    is known, the GCS client is installed, the bucket exists)."""
    s = os.fspath(p) if not isinstance(p, str) else p
    if "://" in s and not is_remote(s):
        raise StorageError(f"{s}: only local paths and gs://bucket/... are supported; copy the files to one of them")
    if is_remote(s):
        _check_bucket(bucket_of(s))
    return epath.Path(s)


def bucket_of(url: str) -> str:
    return str(url)[len("gs://") :].split("/", 1)[0]


@functools.lru_cache(maxsize=None)
def _check_bucket(bucket: str) -> None:
    client = gcs_client()
    if not bucket or client.lookup_bucket(bucket) is None:
        raise StorageError(
            f"gs://{bucket} does not exist (no such bucket); create it (gcloud storage buckets create gs://{bucket}) "
            f"or correct the URL"
        )


@functools.lru_cache(maxsize=None)
def gcs_client():
    """A google-cloud-storage client: the default credentials, or anonymous against an emulator."""
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs://)
        from google.cloud import storage
    except ImportError:
        raise StorageError(
            "gs:// paths need the GCS clients; install them with: pip install 'ladder_jax[gcs]'"
        ) from None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()


GLOB_CHARS = "*?["


def expand(pattern: str) -> list[str]:
    """The files a path or glob names (`**` recursive), sorted; on gs:// too."""
    if not is_remote(pattern):
        import glob

        return sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), len(parts))
    base = path("/".join(parts[:first]))
    if first == len(parts):
        return [str(base)] if base.is_file() else []
    return sorted(str(m) for m in base.glob("/".join(parts[first:])) if m.is_file())


def cache_dir(*parts: str) -> LocalPath:
    root = LocalPath(os.environ.get(CACHE_ENV) or LocalPath.home() / ".cache" / "ladder_jax")
    return root.joinpath(*parts)


def local_dir_for(p, kind: str) -> LocalPath:
    """A local directory standing in for remote directory `p` (the directory itself when local)."""
    if not is_remote(p):
        return LocalPath(os.fspath(p))
    key = hashlib.sha256(str(p).encode()).hexdigest()[:16]
    return cache_dir(kind, f"{bucket_of(str(p))}-{key}")


def write_atomic(p: epath.Path, text: str) -> None:
    """A complete file or the old one: an object write is atomic; locally, write then rename."""
    if is_remote(p):
        p.write_text(text)
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def exists_now(p) -> bool:
    """Whether a file exists now, asked of the store itself: gcsfs answers `exists` from a
    directory listing it has cached, which misses files other hosts wrote since."""
    if not is_remote(p):
        return os.path.exists(os.fspath(p))
    bucket, _, name = str(p)[len("gs://") :].partition("/")
    return gcs_client().bucket(bucket).get_blob(name) is not None


def size_and_version(p) -> tuple[int, int]:
    """(bytes, a number that changes when the file is rewritten): the mtime in ns locally, the
    object's generation on gs://."""
    if not is_remote(p):
        st = os.stat(os.fspath(p))
        return st.st_size, st.st_mtime_ns
    bucket, _, name = str(p)[len("gs://") :].partition("/")
    blob = gcs_client().bucket(bucket).get_blob(name)
    if blob is None:
        raise StorageError(f"{p} does not exist; check the URL")
    return blob.size, blob.generation


def free_bytes(p) -> int | None:
    """Free space where `p` lives; None on object storage (no quota to ask)."""
    if is_remote(p):
        return None
    import shutil

    return shutil.disk_usage(os.fspath(p)).free


# ---------------------------------------------------------------------------------------------
# Files a local reader needs, staged from object storage


def stage(files: list[tuple[epath.Path, int]], kind: str = "shards") -> list[str]:
    """Local copies of remote files, each streamed into a cache once and checked against its
    expected size (a partial copy is never used: it is written beside and renamed). Local files
    are returned as they are."""
    out = []
    for src, size in files:
        if not is_remote(src):
            out.append(os.fspath(src))
            continue
        # keyed by the object's generation too: a shard prepared again under the same name is staged again
        version = str(size_and_version(src)[1])
        dst = cache_dir(kind, bucket_of(str(src)), version, str(src)[len("gs://") :].split("/", 1)[1])
        if not (dst.exists() and dst.stat().st_size == size):
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
            with src.open("rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 24):
                    fout.write(chunk)
            if tmp.stat().st_size != size:
                tmp.unlink()
                raise StorageError(f"{src} has {tmp.stat().st_size} bytes, expected {size}; prepare the data again")
            os.replace(tmp, dst)
        out.append(str(dst))
    return out


class LocalMirror:
    """A local directory whose files are copied into `target` on `sync()` (only new or grown
    files). With a local `target` it is `target` itself and sync does nothing."""

    def __init__(self, target: epath.Path, kind: str = "mirror"):
        self.target, self.remote = target, is_remote(target)
        self.local = local_dir_for(target, kind)
        self.sent: dict[str, int] = {}

    def pull(self, name: str) -> None:
        """Start from the target's copy of `name` (a resumed run's metrics.jsonl)."""
        if self.remote and (self.target / name).exists():
            dst = self.local / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((self.target / name).read_bytes())
            self.sent[name] = dst.stat().st_size

    def sync(self) -> None:
        if not self.remote or not self.local.exists():
            return
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name = str(f.relative_to(self.local))
            size = f.stat().st_size
            if self.sent.get(name) != size:
                dst = self.target / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(f.read_bytes())
                self.sent[name] = size


# ---------------------------------------------------------------------------------------------
# A lock object on GCS


class ObjectLock:
    """`path` on gs:// as a lock: created only if absent (generation precondition 0), holding a
    JSON record with `heartbeat` (unix seconds) that a daemon thread refreshes every
    `timeout / 4` seconds, each write conditional on the generation this holder wrote last, so a
    holder that lost the lock never overwrites its successor."""

    def __init__(self, p: epath.Path, timeout: float):
        self.path, self.timeout = p, timeout
        bucket, _, name = str(p)[len("gs://") :].partition("/")
        self.blob_name, self.bucket = name, gcs_client().bucket(bucket)
        self.generation: int | None = None
        self.record: dict = {}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, record: dict, if_generation_match: int) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self.blob_name)
        try:
            blob.upload_from_string(json.dumps(record), if_generation_match=if_generation_match)
        except PreconditionFailed:
            return False
        self.generation = blob.generation
        return True

    def read(self) -> tuple[dict | None, int | None, float]:
        """(holder record, {} if unreadable, or None if absent; its generation; seconds since its
        last heartbeat, or since the object was written when the record has none)."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = self.bucket.get_blob(self.blob_name)
        if blob is None:
            return None, None, 0.0
        try:
            holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except (NotFound, PreconditionFailed):
            return self.read()  # changed meanwhile
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        beat = holder.get("heartbeat")
        beat = beat if isinstance(beat, (int, float)) else blob.updated.timestamp()
        return holder, blob.generation, time.time() - beat

    def create(self, record: dict) -> bool:
        self.record = {**record, "heartbeat": time.time()}
        return self._write(self.record, 0)

    def take_over(self, generation: int) -> bool:
        self.record["heartbeat"] = time.time()
        return self._write(self.record, generation)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ladder_jax lock heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout / 4, 0.05)):
            self.record["heartbeat"] = time.time()
            if not self._write(self.record, self.generation):
                self.lost = True  # taken over by another trainer that judged us dead
                return

    def release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.generation is None:
            return
        try:
            self.bucket.blob(self.blob_name).delete(if_generation_match=self.generation)
        except (NotFound, PreconditionFailed):
            pass  # not ours any more
