"""Who may act as which named consumer, and registering a consumer on its first use.

A declared consumer with `allowUids` admits those uids, root and the daemon's own user (the
uid comes from SO_PEERCRED, as for the socket itself: ipc/admission.py). An undeclared name is
registered as a dynamic consumer unless `allowDynamicConsumers` is false. A dynamic consumer's
last use is written at most once an hour when it only reads (its acks write it anyway), and at
once after the clock stepped back past it, which is what the idle rule (`consumerIdleDays`)
looks at.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

from flashlexd.configconsumers import ConsumerSettings
from flashlexd.consumerkeeper import declared_changes
from flashlexd.consumers import SEEN_EVERY, NoRoomForConsumer
from flashlexd.wire import CONSUMER_NAME_RULE, valid_consumer_name
from flashlexd.ipc.protocol import RpcFailure
from flashlexd.store import Store
from flashlexd.wire import Code

log = logging.getLogger(__name__)


class ConsumerAccess:
    def __init__(self, store: Store, settings: ConsumerSettings, on_widened: Callable[[str], None]):
        """`on_widened(name)`: a declare made here widened `name`'s filter over stored messages
        (a reload whose own declare failed): its readers replay (Methods.count_replay)."""
        self.store, self.settings, self.on_widened = store, settings, on_widened

    def admit(self, method: str, name: Any, uid: Optional[int]) -> str:
        """`name`, once it is a valid consumer that `uid` may use (registered if need be)."""
        if not valid_consumer_name(name):
            raise RpcFailure(Code.BAD_PARAMS, f"{method}: param 'consumer' must be {CONSUMER_NAME_RULE},"
                             f" got {str(name)[:70]!r}")
        spec = self.settings.spec(name)
        if spec is not None and spec.allow_uids and uid is not None \
                and uid not in spec.allow_uids and uid not in (0, os.geteuid()):
            raise RpcFailure(Code.FORBIDDEN, f"{method}: uid {uid} may not use consumer {name!r}"
                             f" (flashlex.app.consumers.{name}.allowUids)")
        state = self.store.consumer_state(name)
        now = time.time()
        if state is None and spec is not None:
            declared = self.store.consumer_declare(self.settings.declared, now)
            declared_changes(declared, self.on_widened)
            if name in declared.refused:  # not yet stored
                raise NoRoomForConsumer(name)
        elif state is None:
            if not self.settings.allow_dynamic:
                raise RpcFailure(Code.BAD_PARAMS, f"{method}: no consumer named {name!r}: declare it"
                                 " in flashlex.app.consumers (allowDynamicConsumers is false)")
            if self.store.consumer_register(name, now):
                log.info("consumer %r registered by uid %s", name, uid)
        elif state.dynamic and abs(now - state.last_seen) >= SEEN_EVERY:  # a step back too
            self.store.consumer_register(name, now)
        return name
