"""flashlexctl consumers: list the named consumers, move one (`reset NAME --to earliest`) or
remove an app-registered one (`remove NAME`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

from flashlexd.client.connection import Client
from flashlexd.client.ctlview import ago, backlog_text, clipped, jsonable, table
from flashlexd.client.escape import printable


def add_parser(sub: Any, shared: argparse.ArgumentParser) -> None:
    """`consumers` and its actions, each taking the `shared` options after it too."""
    consumers = sub.add_parser("consumers", parents=[shared],
                               help="named consumers: backlog, dropped, last seen; reset, remove")
    actions = consumers.add_subparsers(dest="consumers_action", metavar="ACTION")
    reset = actions.add_parser("reset", parents=[shared],
                               help="replay (--to earliest), skip (--to latest) or start at an id")
    reset.add_argument("name", help="the consumer's name")
    reset.add_argument("--to", required=True, metavar="earliest|latest|ID",
                       help="earliest: every stored message again; latest: skip them all; ID: from that message")
    remove = actions.add_parser("remove", parents=[shared],
                                help="remove a dynamic consumer now; the messages it alone"
                                " still held back leave (those no other consumer matches stay, for"
                                " unnamed apps and expiry)")
    remove.add_argument("name", help="the consumer's name")


def unknown_consumer(fx: Client, name: str) -> bool:
    """Whether the daemon lists no consumer `name` (then said in one line). The API registers any
    name it is given, as apps register by use: from the shell a typo (`messages --consumer dispaly`)
    made a consumer of every topic, holding every stored message for consumerIdleDays."""
    known = [c["name"] for c in fx.consumers()]
    if name in known:
        return False
    print(f"flashlexctl: no consumer named {printable(name)!r} (there are: {printable(', '.join(known)) or 'none'}):"
          " see flashlexctl consumers", file=sys.stderr)
    return True


def cmd_consumers(fx: Client, args: argparse.Namespace) -> int:
    if getattr(args, "consumers_action", None) == "reset":
        # an id msgpack cannot carry goes as typed: the daemon refuses it in one line
        to = int(args.to) if args.to.isascii() and args.to.isdigit() and int(args.to) < 2 ** 63 else args.to
        if unknown_consumer(fx, args.name):
            return 1
        through = fx.reset(args.name, to)
        print(json.dumps(through) if args.json else
              f"consumer {printable(args.name)} has now acknowledged through id {through}")
        return 0
    if getattr(args, "consumers_action", None) == "remove":
        if unknown_consumer(fx, args.name):
            return 1
        removed = fx.remove_consumer(args.name)
        print(json.dumps(removed) if args.json else f"consumer {printable(args.name)} " +
              ("removed; the messages it alone still held back were released (those no other"
               " consumer matches stay, for unnamed apps and expiry)" if removed else
               "was declared by a reload meanwhile: it stays"))
        return 0 if removed else 1
    consumers: List[Dict[str, Any]] = fx.consumers()
    if args.json:
        print(json.dumps(jsonable(consumers), indent=2))
    elif not consumers:
        print("no named consumers (apps without a name share the inbox)")
    else:
        now = time.time()
        rows = [(c["name"], clipped(c["filter"]), backlog_text(c),
                 ago(c.get("oldest_age")), c["dropped"], c["max_backlog"] or "-", "dynamic" if c["dynamic"] else "declared",
                 ago(None if not c.get("last_seen") else max(0.0, now - c["last_seen"])))
                for c in consumers]
        print(table(("NAME", "FILTER", "BACKLOG", "OLDEST", "DROPPED", "MAX", "KIND", "LAST SEEN"), rows,
                    right=(2, 4, 5)))
    return 0

