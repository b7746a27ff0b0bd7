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
import uuid
from pathlib import Path
from typing import Any

from embray.config import is_remote
from embray.errors import ConflictError, SourceError, StoreError


def _filesystem(uri: str, options: dict[str, Any]):
    import fsspec

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
        return self._call(self.fs.exists, self.path(rel))

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

    def download(self, rel: str, local: str | os.PathLike[str]) -> None:
        self._call(self.fs.get_file, self.path(rel), str(local))

    def parquet_names(self, rel: str) -> list[str]:
        """Names of the finished Parquet files directly under ``rel`` (temporary dot-files left out)."""
        return [n for n in self.listdir(rel) if n.endswith(".parquet") and not n.startswith(".")]

    def read_table(self, rel: str, columns: list[str] | None = None):
        """A Parquet file of the store as a pyarrow Table."""
        import pyarrow.parquet as pq

        return pq.read_table(self.path(rel), filesystem=self.pyarrow_fs(), columns=columns)

    def local_copy(self, rel: str, dest: str | os.PathLike[str]) -> None:
        """Copy a store file to a local path (a download from S3, a file copy on local disk)."""
        if self.remote:
            self.download(rel, dest)
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

        Raises ConflictError when the object already exists.
        """
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

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise OSError, botocore and aiohttp errors alike
            raise StoreError(f"store {self.uri}: {type(e).__name__}: {e}") from e


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
