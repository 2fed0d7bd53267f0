"""What a link's worker finds in the store from earlier worker processes.

- Its broker session: when a link of this client id was last up on a persistent session. None
  means the store's first connection, the only one that asks for MQTT 5 Clean Start.
- A broker without MQTT 5, remembered for the rest of the daemon's run. With `thing.mqtt.protocol: auto` each link probes MQTT 5 first. A worker that had to fall back
to 3.1.1 notes it in the store, so a replaced worker (after a crash, a hang or a reload) starts
on 3.1.1 at once instead of paying a refused MQTT 5 CONNECT and a reconnect delay each time.
The supervisor forgets these notes when the daemon starts (`Store.forget_fallbacks`).
- When a CONNECT as this client id last went out: a worker replaced right after its
  predecessor sent one waits out the rest of AWS IoT Core's second per CONNECT."""
from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple, Optional

from flashlexd.store import Store, StoreError

log = logging.getLogger("flashlexd")


class EarlierSession(NamedTuple):
    seen_at: Optional[float]  # wall clock; None: never seen, or the store could not tell
    clean_start: bool         # MQTT 5 Clean Start on the first CONNECT


def earlier_session(store: Store, client_id: str) -> EarlierSession:
    """Clean Start only when the store is readable and has never seen a session of `client_id`:
    a store that cannot be read must not make the broker drop the session it keeps for us."""
    try:
        seen_at = store.session_seen(client_id)
    except StoreError as exc:  # damage is logged by the store; a lost session then goes unsaid
        log.warning("no record of an earlier session of %s, the broker's is kept: %s", client_id, exc)
        return EarlierSession(None, False)
    return EarlierSession(seen_at, seen_at is None)


def fell_back_before(store: Store, client_id: str) -> bool:
    try:
        return store.fell_back(client_id)
    except StoreError as exc:  # damage is logged by the store; MQTT 5 is then probed again
        log.debug("no record of an earlier protocol fallback: %s", exc)
        return False


def noting_fallback(store: Store, client_id: str) -> Callable[[], None]:
    """The Connection's `on_fall_back` for `client_id`."""
    def note() -> None:
        try:
            store.note_fallback(client_id)
        except StoreError as exc:
            log.warning("cannot remember that the broker lacks MQTT 5: %s", exc)
    return note


def last_connect(store: Store, client_id: str, session_seen_at: Optional[float]) -> Optional[float]:
    """When a CONNECT as `client_id` last went out, as far as the store tells (a store of an
    earlier version noted only the links that came up: `session_seen_at`)."""
    try:
        sent = store.connect_sent(client_id)
    except StoreError as exc:  # damage is logged by the store; the link's mark still counts
        log.debug("no record of an earlier CONNECT: %s", exc)
        sent = None
    marks = [at for at in (sent, session_seen_at) if at is not None]
    return max(marks) if marks else None


def noting_connects(store: Store, client_id: str) -> Callable[[], None]:
    """The Connection's `on_connect_sent` for `client_id`: one warning while the store refuses
    (it says why itself), not one per attempt."""
    refusing = False

    def note() -> None:
        nonlocal refusing
        try:
            store.note_connect(client_id, time.time())
            refusing = False
        except StoreError as exc:
            if not refusing:
                log.warning("cannot note our CONNECT: a replaced worker may connect again within"
                            " a second: %s", exc)
            refusing = True
    return note
