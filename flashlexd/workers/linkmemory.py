"""What a link's worker finds from earlier worker processes (in the store, or in memory).

- Its broker session: when a link of this client id was last up on a persistent session. None
  means the store's first connection, which resumes whatever session the broker holds (never
  MQTT 5 Clean Start: the messages it queued for the thing are ours) but reports no loss.
  Per broker (`Thing.broker_identity`): session present 0 is a lost session only on a broker
  a session was up on before, and the last link's broker tells a move (the config moved the
  device: the DUP marks are the old broker's); a store of the previous release named none.
- A broker without MQTT 5, remembered for the rest of the daemon's run. With `thing.mqtt.protocol: auto` each link probes MQTT 5 first. A worker that had to fall back
to 3.1.1 notes it in the store, so a replaced worker (after a crash, a hang or a reload) starts
on 3.1.1 at once instead of paying a refused MQTT 5 CONNECT and a reconnect delay each time.
Per broker: a move to another one probes MQTT 5 there. The supervisor forgets these notes when
the daemon starts (`Store.forget_fallbacks`).
- When a CONNECT of this link last went out (`connectpace`, in shared memory, not the store):
  a worker replaced right after its predecessor sent one waits out the rest of AWS IoT Core's
  second per CONNECT."""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Optional

from flashlexd import connectpace
from flashlexd.store import Store, StoreError

log = logging.getLogger("flashlexd")


def earlier_session(store: Store, client_id: str) -> Optional[float]:
    """When (wall clock) a link of `client_id` was last up; None: never seen, or the store
    could not tell. Only the report of a lost session depends on it."""
    try:
        return store.session_seen(client_id)
    except StoreError as exc:  # damage is logged by the store; a lost session then goes unsaid
        log.warning("no record of an earlier session of %s, a session the broker lost goes unsaid: %s",
                    client_id, exc)
        return None


def earlier_session_on(store: Store, client_id: str, broker: str) -> Optional[float]:
    """When a link of `client_id` was last up on `broker`; None: never, or the store could not
    tell (a session it lost then goes unsaid)."""
    try:
        return store.session_seen_on(client_id, broker)
    except StoreError as exc:  # damage is logged by the store
        log.debug("no record of an earlier session on %s: %s", broker, exc)
        return None


def earlier_broker(store: Store, client_id: str) -> Optional[str]:
    """The broker identity of `client_id`'s last link; None: none, one of the previous release
    (which named none), or the store could not tell: with a link before, an unknown broker."""
    try:
        return store.session_broker(client_id)
    except StoreError as exc:  # damage is logged by the store
        log.debug("no record of the earlier session's broker: %s", exc)
        return None


def fell_back_before(store: Store, client_id: str, broker: str) -> bool:
    try:
        return store.fell_back(client_id, broker)
    except StoreError as exc:  # damage is logged by the store; MQTT 5 is then probed again
        log.debug("no record of an earlier protocol fallback: %s", exc)
        return False


def noting_fallback(store: Store, client_id: str, broker: str) -> Callable[[], None]:
    """The Connection's `on_fall_back` for `client_id` on `broker`."""
    def note() -> None:
        try:
            store.note_fallback(client_id, broker)
        except StoreError as exc:
            log.warning("cannot remember that the broker lacks MQTT 5: %s", exc)
    return note


def connect_ago(link: str, session_seen_at: Optional[float]) -> Optional[float]:
    """Seconds since a CONNECT of `link` last went out, as far as is known: from an earlier
    worker of this daemon (`connectpace`), or since the link was last up (the store's session
    mark: a daemon started anew, a worker run on its own); None: not known."""
    pace = connectpace.shared()
    known = [since for since in (None if pace is None else pace.seconds_since(link),
                                 None if session_seen_at is None else time.time() - session_seen_at)
             if since is not None]
    return min(known, default=None)


def noting_connects(link: str) -> Optional[Callable[[], None]]:
    """The Connection's `on_connect_sent` for `link`: stamped where its replacement will look."""
    pace = connectpace.shared()
    return None if pace is None else functools.partial(pace.sent, link)
