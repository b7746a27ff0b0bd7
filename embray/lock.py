"""Leases in the store: one writer per collection, and serialised alias moves.

A lease is a small JSON object created create-only (S3 ``If-None-Match: *``,
local ``O_EXCL``). Its holder renews it from a background thread; a holder that
crashed stops renewing, and once the lease expires (or, on the same host, once
its process is gone) the next writer takes it over. Taking over is itself
create-only, so two writers that both see a stale lease cannot both win.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from embray.errors import ConflictError
from embray.layout import lock_file
from embray.store import Store
from embray.versions import who

log = logging.getLogger("embray")

WRITER = "writer"
ALIASES = "aliases"


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """``with Lease(store, collection, WRITER, job="refresh"):`` or ``lease.acquire(wait_s=...)``."""

    def __init__(self, store: Store, collection: str, name: str, *, job: str, ttl_s: float = 60.0):
        self.store = store
        self.collection = collection
        self.rel = lock_file(collection, name)
        self.name = name
        self.job = job
        self.ttl_s = ttl_s
        self.token = secrets.token_hex(8)
        self._acquired: float | None = None
        self._renewed = 0.0  # time.monotonic() of the last write of our record
        self.lost: str | None = None  # why this holder no longer holds the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = _now()
        return {
            "job": self.job,
            "holder": who(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "acquired": _iso(self._acquired or now),
            "expires_at": now + self.ttl_s,
            "expires": _iso(now + self.ttl_s),
        }

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(self.rel))
        except FileNotFoundError:
            return None
        except ValueError:  # half-written by a crashed holder on a store without atomic puts
            return {"token": "corrupt", "expires_at": 0}

    @staticmethod
    def stale(rec: dict[str, Any]) -> bool:
        if rec.get("expires_at", 0) < _now():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", 0)))

    def _try(self) -> dict[str, Any] | None:
        """Take the lease; None on success, else the holder's record."""
        self._acquired = _now()
        try:
            self.store.create_exclusive(self.rel, json.dumps(self._record()).encode())
            return None
        except ConflictError:
            pass
        held = self.read()
        if held is None:
            return self._try_once_more()
        if not self.stale(held):
            return held
        # Stale: whoever creates the takeover marker for this holder's token may replace the lease.
        marker = f"{self.rel}.takeover-{held.get('token')}"
        try:
            self.store.create_exclusive(marker, self.token.encode())
        except ConflictError:
            return held
        log.warning(
            "taking over the %s lease of %s from %s (expired or its process is gone)",
            self.name,
            self.collection,
            held.get("holder"),
        )
        self.store.delete(self.rel)
        try:
            return self._try_once_more()
        finally:
            self.store.delete(marker)

    def _try_once_more(self) -> dict[str, Any] | None:
        try:
            self.store.create_exclusive(self.rel, json.dumps(self._record()).encode())
            return None
        except ConflictError:
            return self.read() or {"job": "unknown"}

    def acquire(self, wait_s: float = 0.0) -> Lease:
        deadline = _now() + wait_s
        while True:
            held = self._try()
            if held is None:
                break
            if _now() >= deadline:
                raise ConflictError(
                    f"collection {self.collection!r} is busy: {held.get('job', 'a job')} run by "
                    f"{held.get('holder', '?')} (pid {held.get('pid', '?')}) holds its {self.name} lease since "
                    f"{held.get('acquired', '?')}, until {held.get('expires', '?')} unless renewed; wait for it to "
                    f"finish (a crashed holder's lease expires by itself; the file is {self.store.url(self.rel)})"
                )
            time.sleep(0.2)
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name=f"embray-lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self.read()
            except Exception as e:  # noqa: BLE001 - the store hiccuped: try again at the next tick
                log.warning("could not read the %s lease to renew it: %s", self.name, e)
                continue
            why = self._why_lost(held)
            if why is not None:  # never rewrite a lease another writer may be taking over
                self.lost = why
                log.error("%s", why)
                return
            try:
                self.store.write_bytes(self.rel, json.dumps(self._record()).encode())
                self._renewed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - keep trying until the job ends
                log.warning("could not renew the %s lease: %s", self.name, e)

    def _why_lost(self, held: dict[str, Any] | None) -> str | None:
        """Why this holder no longer holds the lease (None: it does): another writer's record is there, or
        ours went unrenewed past its TTL (this process was paused: a successor may be taking it over)."""
        what = f"lost the {self.name} lease of {self.collection}"
        if held is None or held.get("token") != self.token:
            other = held or {}
            return (
                f"{what} to {other.get('job', 'another job')} run by {other.get('holder', '?')} "
                f"(pid {other.get('pid', '?')}): this process was paused past the lease ({self.ttl_s:g} s)"
            )
        idle = time.monotonic() - self._renewed
        if idle > self.ttl_s or held.get("expires_at", 0) < _now():
            return (
                f"{what}: it expired, {idle:.0f} s after its last renewal (this process was paused, or the store "
                "could not be written)"
            )
        return None

    def check_held(self) -> None:
        """Raise ConflictError unless this process still holds the lease (read from the store now): the
        last check before a write that must not happen after a takeover, such as a version's commit."""
        held = self.read()
        why = self.lost or self._why_lost(held)
        if why is None and held.get("expires_at", 0) - _now() < self.ttl_s / 3:  # type: ignore[union-attr]
            why = f"lost the {self.name} lease of {self.collection}: too little of it is left to finish safely"
        if why is not None:
            self.lost = why
            raise ConflictError(why)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self.read()
        if held is not None and held.get("token") == self.token:
            self.store.delete(self.rel)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
