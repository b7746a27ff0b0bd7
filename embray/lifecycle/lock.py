"""Leases in the store: one writer per collection, and serialised alias moves.

A lease is held in numbered generations, every file create-only (S3 ``If-None-Match: *``, a hard link on
local disk), so no step needs a compare-and-swap the store does not have:

- ``_locks/<name>/g<N>.json``, the *claim* of generation N: whoever creates it holds the lease. Its holder
  alone rewrites it, to renew it every third of the TTL and to mark it released at the end.
- ``_locks/<name>/g<N>.end``, the *end* of generation N, created exactly once: by its holder when it commits
  (``commit``: the one write that makes its work visible) or releases, or by the writer that takes an
  expired (or, on the same host, dead) holder's lease over (``fenced``). A holder paused past its lease
  (a long GC pause, a stopped VM) that wakes up and tries to commit meets the fence: its commit is refused,
  whatever it checked before, so no window remains between a check and the commit.
- ``_locks/<name>.json``: a copy of the newest claim, for finding it without a listing (and for people).

Generation N+1 may be claimed only once N has ended, so two writers that both find a stale lease cannot
both win. gc retires the generations before the last two (:meth:`Lease.prune`): it raises the floor first
(create-only ``_locks/<name>/floor.<N>`` markers, so it never goes back), then deletes their claims and ends,
and a writer that slept through that and then claims or commits a retired generation reads the floor right
after and gives up.
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
from embray.lifecycle.versions import who
from embray.storage.layout import lock_file
from embray.storage.store import Store

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
        self.rel = lock_file(collection, name)  # the copy of the newest claim
        self.dir = self.rel.removesuffix(".json")
        self.name = name
        self.job = job
        self.ttl_s = ttl_s
        self.token = secrets.token_hex(8)
        self.generation = 0  # the generation this holder claimed (0: none)
        self._acquired: float | None = None
        self._renewed = 0.0  # time.monotonic() of the last write of our claim
        self.lost: str | None = None  # why this holder no longer holds the lease
        self.decided = False  # commit() decided its commit (it may still be finishing it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim(self, g: int) -> str:
        return f"{self.dir}/g{g:012d}.json"

    def _end(self, g: int) -> str:
        return f"{self.dir}/g{g:012d}.end"

    def _record(self, **extra: Any) -> dict[str, Any]:
        now = _now()
        return {
            "generation": self.generation,
            "job": self.job,
            "holder": who(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "acquired": _iso(self._acquired or now),
            "expires_at": now + self.ttl_s,
            "expires": _iso(now + self.ttl_s),
            **extra,
        }

    def _read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(rel))
        except FileNotFoundError:
            return None
        except ValueError:  # half-written by a crashed holder on a store without atomic puts
            return {"token": "corrupt", "expires_at": 0}

    def _floor(self) -> int:
        """Generations below this are retired (their files may be gone): claiming or committing one fails.
        The floor is the highest ``floor.<N>`` marker: create-only, so it never goes back."""
        marks = [n.split(".", 1)[1] for n in self.store.listdir(self.dir) if n.startswith("floor.")]
        return max((int(m) for m in marks if m.isdigit()), default=0)

    def _latest(self) -> int:
        """The newest claimed generation (0: never claimed): from the copy (or the floor, if newer), then
        forward while newer claims exist."""
        g = max(int((self._read_json(self.rel) or {}).get("generation", 0)), self._floor() - 1, 0)
        while self.store.exists(self._claim(g + 1)):
            g += 1
        return g

    def prune(self) -> int:
        """Delete the claims and ends of generations before the last two, under a floor raised first: a
        writer that slept through the deletion and then claims or commits one of them finds it below the
        floor and gives up. Called by gc under the writer lease; returns the files deleted."""
        keep = self._latest() - 1
        floor = self._floor()
        if keep <= max(floor, 1):
            return 0
        try:
            self.store.create_exclusive(f"{self.dir}/floor.{keep:012d}", _iso(_now()).encode())
        except ConflictError:
            pass  # another gc raised it to the same generation
        gone = 0
        for name in self.store.listdir(self.dir):
            num = name.split(".", 1)[1] if name.startswith("floor.") else name[1:13] if name.startswith("g") else ""
            if num[:12].isdigit() and int(num[:12]) < keep:
                self.store.delete(f"{self.dir}/{name}")
                gone += 1
        return gone

    def read(self) -> dict[str, Any] | None:
        """The newest claim (None when nobody ever held this lease)."""
        g = self.generation or self._latest()
        return self._read_json(self._claim(g)) if g else None

    @staticmethod
    def stale(rec: dict[str, Any]) -> bool:
        if rec.get("expires_at", 0) < _now():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", 0)))

    def _create_end(self, g: int, how: str, **extra: Any) -> dict[str, Any]:
        """End generation ``g`` (create-only); returns its end record: ours, or the one already there."""
        rec = {"end": how, "token": self.token, "job": self.job, "holder": who(), "pid": os.getpid(), **extra}
        rec["at"] = _iso(_now())
        try:
            self.store.create_exclusive(self._end(g), json.dumps(rec).encode())
            return rec
        except ConflictError:
            return self._read_json(self._end(g)) or {"end": "corrupt"}

    def _finish(self, end: dict[str, Any]) -> None:
        """Complete a commit its holder decided (its end record is there) but may not have written."""
        if end.get("end") != "commit":
            return
        try:
            pending = self.store.read_bytes(end["pending"])
        except FileNotFoundError:
            return  # finished already: the manifest is written before the staged copy goes
        if end.get("token") != self.token:
            log.warning("finishing the commit of %s that %s decided before it stopped", end["path"], end["holder"])
        self.store.create_exclusive(end["path"], pending)  # already there with these bytes: fine
        self.store.delete(end["pending"])

    def _try(self) -> dict[str, Any] | None:
        """Claim the next generation; None on success, else the holder's record."""
        legacy = self._read_json(self.rel)
        if legacy is not None and "generation" not in legacy and not self.stale(legacy):
            return legacy  # held by an embray release from before generations
        g = self._latest()
        while True:
            if g:
                held = self._read_json(self._claim(g)) or {"token": "corrupt", "expires_at": 0}
                if not held.get("released") and not self.stale(held):
                    return held
                end = self._create_end(g, "fenced" if not held.get("released") else "released")
                if end.get("end") == "fenced" and end.get("token") == self.token:
                    log.warning(
                        "taking over the %s lease of %s from %s (expired or its process is gone)",
                        self.name,
                        self.collection,
                        held.get("holder"),
                    )
                self._finish(end)
            self._acquired = _now()
            self.generation = g + 1
            try:
                self.store.create_exclusive(self._claim(g + 1), json.dumps(self._record()).encode())
            except ConflictError:
                self.generation = 0
                g += 1  # another writer claimed it first: look at its claim
                continue
            if g + 1 < self._floor():  # this process slept while gc retired that generation: start over
                self.generation = 0
                g = self._latest()
                continue
            try:
                self.store.write_bytes(self.rel, json.dumps(self._record()).encode())
            except Exception as e:  # noqa: BLE001 - only a hint for finding the claim
                log.warning("could not update %s: %s", self.store.url(self.rel), e)
            return None

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
                    f"finish (a crashed holder's lease expires by itself; the files are under "
                    f"{self.store.url(self.dir)})"
                )
            time.sleep(0.2)
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name=f"embray-lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _state(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Our claim and our generation's end record, read from the store now."""
        return self._read_json(self._claim(self.generation)), self._read_json(self._end(self.generation))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                claim, end = self._state()
            except Exception as e:  # noqa: BLE001 - the store hiccuped: try again at the next tick
                log.warning("could not read the %s lease to renew it: %s", self.name, e)
                continue
            why = self._why_lost(claim, end)
            if why is not None:  # never renew a lease another writer may be taking over
                self.lost = why
                log.error("%s", why)
                return
            if self._stop.is_set():  # released meanwhile: never write over the released claim
                return
            try:
                self.store.write_bytes(self._claim(self.generation), json.dumps(self._record()).encode())
                self._renewed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - keep trying until the job ends
                log.warning("could not renew the %s lease: %s", self.name, e)

    def _why_lost(self, claim: dict[str, Any] | None, end: dict[str, Any] | None) -> str | None:
        """Why this holder no longer holds the lease (None: it does): another writer ended our generation
        (a takeover), or our claim went unrenewed past its TTL (this process was paused: a successor may
        be taking it over)."""
        what = f"lost the {self.name} lease of {self.collection}"
        if end is not None and end.get("token") != self.token:
            return (
                f"{what} to {end.get('job', 'another job')} run by {end.get('holder', '?')} "
                f"(pid {end.get('pid', '?')}): this process was paused past the lease ({self.ttl_s:g} s)"
            )
        if end is not None:
            return None  # our own commit ended it: done, not lost
        idle = time.monotonic() - self._renewed
        if claim is None or claim.get("token") != self.token:
            return f"{what}: its claim {self.store.url(self._claim(self.generation))} is gone or not ours"
        if idle > self.ttl_s or claim.get("expires_at", 0) < _now():
            return (
                f"{what}: it expired, {idle:.0f} s after its last renewal (this process was paused, or the store "
                "could not be written)"
            )
        return None

    def check_held(self) -> None:
        """Raise ConflictError unless this process still holds the lease (read from the store now)."""
        why = self.lost or self._why_lost(*self._state())
        if why is not None:
            self.lost = why
            raise ConflictError(why)

    def commit(self, rel: str, data: bytes) -> None:
        """Create ``rel`` (create-only) as this lease's commit, fenced: refused (ConflictError, nothing
        written at ``rel``) once another writer has taken the lease over, however late this holder wakes.

        The commit is decided by creating our generation's end record; a takeover creates that same file
        first, so exactly one of the two happens. The bytes are staged beside it first, so a commit decided
        by a holder that then crashed is finished by the next writer."""
        self.check_held()
        pending = f"{self._end(self.generation)}.pending"
        self.store.write_bytes(pending, data)
        end = self._create_end(self.generation, "commit", path=rel, pending=pending)
        if end.get("token") != self.token or end.get("end") != "commit":
            self.store.delete(pending)
            self.lost = self._why_lost(None, end) or f"lost the {self.name} lease of {self.collection}"
            raise ConflictError(self.lost)
        self.decided = True  # from here the commit happens, by us or by the next writer: keep its files
        if self.generation < self._floor():  # gc retired our generation while this process slept
            if self._written(rel, data):
                return  # decided in time, and finished by the writer that took over
            self.decided = False  # our end landed where a deleted fence was: nobody will finish it
            self.store.delete(pending)
            self.lost = (
                f"lost the {self.name} lease of {self.collection}: this process was paused past the lease "
                f"({self.ttl_s:g} s) and its generation has been retired since"
            )
            raise ConflictError(self.lost)
        self._finish(end)

    def _written(self, rel: str, data: bytes) -> bool:
        try:
            return self.store.read_bytes(rel) == data
        except FileNotFoundError:
            return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.generation or self.lost:
            return
        try:
            end = self._create_end(self.generation, "released")
            if end.get("token") == self.token:  # ours (released or committed): say so in the claim
                claim = json.dumps(self._record(released=True)).encode()
                self.store.write_bytes(self._claim(self.generation), claim)
        except Exception as e:  # noqa: BLE001 - never hide the job's own outcome behind this
            log.warning(
                "could not release the %s lease of %s (it expires by itself in %g s): %s",
                self.name,
                self.collection,
                self.ttl_s,
                e,
            )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
