"""The loop every Serve replica runs beside its requests: check the `active` alias every ``poll_s``, and
sooner when the reload marker changes (a reload sent to one replica reaches them all within a tick)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from embray.errors import EmbrayError
from embray.storage.layout import reload_file
from embray.storage.store import Store

log = logging.getLogger("embray.serve")

RELOAD_TICK_S = 1.0  # how often a replica looks for the reload marker another replica wrote


def reload_marker(store: Store, collection: str) -> bytes | None:
    try:
        return store.read_bytes(reload_file(collection))
    except (FileNotFoundError, EmbrayError):
        return None


def poll_loop(
    stop: threading.Event,
    store: Store,
    collection: str,
    poll_s: float,
    check: Callable[[], object],
    every_poll: Callable[[], None] | None = None,
    every_tick: Callable[[], None] | None = None,
) -> None:
    """Until ``stop``: ``check`` every ``poll_s`` and whenever the reload marker changes; ``every_poll`` after
    each scheduled check, ``every_tick`` every tick. A failing call is logged and retried on schedule."""
    seen = reload_marker(store, collection)
    tick = min(RELOAD_TICK_S, poll_s)
    next_poll = 0.0
    while True:
        now = time.monotonic()
        due = now >= next_poll
        try:
            marker = reload_marker(store, collection)
            if due or marker != seen:
                seen = marker
                check()
        except Exception as e:  # noqa: BLE001 - the poller must outlive a bad check
            log.exception("alias check failed: %s", e)
        for hook in (every_poll if due else None, every_tick):
            if hook is not None:
                try:
                    hook()
                except Exception as e:  # noqa: BLE001 - tried again on schedule
                    log.warning("%s failed: %s", getattr(hook, "__name__", "a periodic task"), e)
        if due:
            next_poll = now + poll_s
        if stop.wait(tick):
            return
