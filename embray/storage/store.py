"""Where corpora are read from and versions are written to: local disk or S3.

One small interface over fsspec. Paths given to a :class:`Store` are relative
to its root; ``Store.url`` turns them back into URIs for people and MLflow.
The only write that decides visibility, :meth:`Store.create_exclusive`, is
create-only: S3 ``If-None-Match: *``, or a hard link on local disk (atomic,
and it fails if the target exists).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from embray.config import is_remote
from embray.errors import ConflictError, SourceError, StoreError

DOWNLOAD_ATTEMPTS = 4  # whole-file tries of Store.download, on top of the S3 client's own retries


def _filesystem(uri: str, options: dict[str, Any]):
    """The fsspec filesystem and root path of ``uri``. On an object store, without fsspec's listings cache
    (unless ``options`` ask for it): other processes add files all the time (cache chunks, manifests, leases),
    and a listing cached earlier in a long-lived process (a Ray worker, Serve, the monitor) would hide them:
    the open of a file written since then would fail as not found."""
    import fsspec

    if is_remote(uri):
        options = {"use_listings_cache": False, **options}
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError, TypeError) as e:
        raise StoreError(f"cannot open {uri}: {e}; check the URI scheme and its storage_options") from e


class Store:
    """A root directory on local disk or S3, addressed by relative paths."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.remote = is_remote(uri)
        self.fs, self.root = _filesystem(self.uri, self.storage_options)
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # ship the URI and options to Ray workers, not a live client
        return (Store, (self.uri, self.storage_options))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def url(self, *parts: str) -> str:
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.uri}/{rel}" if rel else self.uri

    def pyarrow_fs(self):
        """A pyarrow filesystem over the same fsspec client (so storage_options apply to pyarrow too)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # --- reads -------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """Whether ``rel`` is there now: on S3 asked of the store, not of a listing this process cached
        earlier (another process may have written it since)."""
        p = self.path(rel)
        if self.remote:
            self.fs.invalidate_cache(p)
        return self._call(self.fs.exists, p)

    def read_bytes(self, rel: str) -> bytes:
        return self._call(self.fs.cat_file, self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        p = self.path(rel)
        try:
            entries = self.fs.ls(p, detail=False, refresh=True) if self.remote else self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001 - wrapped at the boundary
            raise StoreError(f"cannot list {self.url(rel)}: {e}") from e
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def download(
        self, rel: str, local: str | os.PathLike[str], *, sha256: str | None = None, size: int | None = None
    ) -> None:
        """Copy a store file to a local path, whole: a torn download is never left at ``local``.

        The bytes go to a temporary file beside ``local``, which replaces it only once complete and, when
        ``sha256`` and ``size`` are given, only once it has that size and that digest. A download that
        breaks part-way or does not match is tried again, :data:`DOWNLOAD_ATTEMPTS` times in all: the
        client's own retries do not cover every break: s3fs fetches a file larger than its block size in
        ranged parts and retries no part cut off mid-body, so a try after a break reads one stream, which
        s3fs resumes from the byte it reached.

        Raises:
            FileNotFoundError: There is no such file.
            StoreError: Every attempt failed or gave other bytes than the manifest's.
        """
        local = Path(local)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        why = ""
        try:
            for attempt in range(DOWNLOAD_ATTEMPTS):
                if attempt:
                    time.sleep(min(0.2 * 2**attempt, 5.0))
                # s3fs: parts in parallel first; after a break one resumable stream.
                one_stream = {"max_concurrency": 1} if attempt and hasattr(self.fs, "max_concurrency") else {}
                try:
                    self._call(self.fs.get_file, self.path(rel), str(tmp), **one_stream)
                except StoreError as e:
                    why = str(e.__cause__ or e)
                    continue
                if sha256 is not None or size is not None:
                    got_sha, got_size = sha256_file(tmp)
                    if (size is not None and got_size != size) or (sha256 is not None and got_sha != sha256):
                        why = f"got {got_size} bytes with sha256 {got_sha}, expected {size} bytes with sha256 {sha256}"
                        continue
                os.replace(tmp, local)
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot download {self.url(rel)} whole after {DOWNLOAD_ATTEMPTS} attempts: {why}")

    def parquet_names(self, rel: str) -> list[str]:
        """Names of the finished Parquet files directly under ``rel`` (temporary dot-files left out)."""
        return [n for n in self.listdir(rel) if n.endswith(".parquet") and not n.startswith(".")]

    def read_table(self, rel: str, columns: list[str] | None = None):
        """A Parquet file of the store as a pyarrow Table (read as one file: ``pq.read_table`` would go through
        pyarrow.dataset, whose first import, pandas with it, costs each fresh Ray worker ~0.5 s)."""
        import pyarrow.parquet as pq

        with self.pyarrow_fs().open_input_file(self.path(rel)) as f:
            return pq.ParquetFile(f).read(columns=columns)

    def local_copy(
        self, rel: str, dest: str | os.PathLike[str], *, sha256: str | None = None, size: int | None = None
    ) -> None:
        """Copy a store file to a local path (a download from S3, checked as :meth:`download` says; a file copy
        on local disk)."""
        if self.remote:
            self.download(rel, dest, sha256=sha256, size=size)
        else:
            shutil.copyfile(self.path(rel), dest)

    # --- writes ------------------------------------------------------------
    def upload(self, local: str | os.PathLike[str], rel: str) -> None:
        """Move a finished local file to ``rel`` (a rename on local disk, an upload on S3)."""
        dest = self.path(rel)
        if self.remote:
            self._call(self.fs.put_file, str(local), dest)
            os.unlink(local)
        else:
            # Copy beside the destination, then rename: readers (and a rerun after a kill) never see half a file.
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
            shutil.move(str(local), tmp)
            os.replace(tmp, dest)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (or replace) a small object whole: readers see the old bytes or the new, never half."""
        dest = self.path(rel)
        if self.remote:
            self._call(self.fs.pipe_file, dest, data)
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` only if nothing is there; whole or not at all.

        Raises ConflictError when another object is already there. An object with exactly these bytes
        counts as written: ours, from an attempt whose success was reported as a failure and then retried
        (on S3 a 500 may come after the write landed), or the same commit finished by another process.
        """
        try:
            self._create(rel, data)
        except ConflictError:
            try:
                same = self.read_bytes(rel) == data
            except (FileNotFoundError, StoreError):
                same = False
            if not same:
                raise

    def _create(self, rel: str, data: bytes) -> None:
        dest = self.path(rel)
        if self.remote:
            try:
                self.fs.pipe_file(dest, data, mode="create")
            except FileExistsError as e:
                raise ConflictError(f"{self.url(rel)} already exists; it is never overwritten") from e
            except Exception as e:  # noqa: BLE001 - wrapped at the boundary
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    raise ConflictError(f"{self.url(rel)} already exists; it is never overwritten") from e
                raise StoreError(f"cannot write {self.url(rel)}: {e}") from e
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, dest)  # atomic and create-only: fails with EEXIST if dest exists
        except FileExistsError as e:
            raise ConflictError(f"{dest} already exists; it is never overwritten") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, rel: str) -> None:
        """Remove a file or a directory tree; missing is fine."""
        p = self.path(rel)
        try:
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - wrapped at the boundary
            raise StoreError(f"cannot delete {self.url(rel)}: {e}") from e

    def check_writable(self) -> None:
        """Fail fast, with a clear message, when the store cannot be reached or written."""
        probe = f"_probe/{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete("_probe")
        except (StoreError, OSError) as e:
            cause = e.__cause__ or e
            raise StoreError(
                f"store {self.uri} is not reachable or not writable ({type(cause).__name__}: {cause}); "
                "check store.uri, its storage_options (endpoint_url, credentials) and that the bucket exists"
            ) from e

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise OSError, botocore and aiohttp errors alike
            raise StoreError(f"store {self.uri}: {type(e).__name__}: {e}") from e


def _forget_listings(fs, root: str) -> None:
    """Drop what ``fs`` cached of the listings at and under ``root``. A corpus changes under long-lived
    processes (monitor, Serve): s3fs's listings cache never expires by default, ``find`` does not replace a
    cached directory, and a stale entry's ETag makes the next read fail as FileExpired."""
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        for key in [k for k in cache if k == root or k.startswith(root + "/")]:
            cache.pop(key, None)
    fs.invalidate_cache(root)


def sha256_of(fh) -> tuple[str, int]:
    """(sha256 hex, bytes) of an open binary file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, bytes) of a local file."""
    with open(path, "rb") as fh:
        return sha256_of(fh)


def local_tmpdir(prefix: str = "embray-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# --- source corpora ---------------------------------------------------------


def list_source_files(uri: str, storage_options: dict[str, Any]) -> tuple[Store, list[str]]:
    """The Parquet files of a corpus (a file, or every ``*.parquet`` under a directory), sorted."""
    store, infos = list_source_infos(uri, storage_options)
    return store, list(infos)


def list_source_infos(uri: str, storage_options: dict[str, Any]) -> tuple[Store, dict[str, dict[str, Any]]]:
    """The corpus's Parquet files, sorted, with what the listing says of each (size; ETag on S3): one listing
    request per 1,000 files on S3 rather than a HEAD per file."""
    store = Store(uri, storage_options)
    fs, root = store.fs, store.root
    _forget_listings(fs, root)
    try:
        if fs.isfile(root):
            return store, {root: fs.info(root)}
        if not fs.exists(root):
            raise SourceError(f"source.uri {uri} does not exist; point it at a Parquet file or directory")
        found = fs.find(root, detail=True)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise OSError, botocore and aiohttp errors alike
        raise SourceError(
            f"source {uri} cannot be listed ({type(e).__name__}: {e}); check source.uri and source.storage_options"
        ) from e
    files = sorted(
        f
        for f in found
        if f.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in f[len(root) :].split("/"))
    )
    if not files:
        raise SourceError(f"source {uri} holds no .parquet files; embray reads sharded Parquet corpora")
    return store, {f: found[f] for f in files}
