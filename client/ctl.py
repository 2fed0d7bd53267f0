"""flashlexctl: look at and drive a running flashlexd from the shell.

Exit codes: 0 success (for `status`: healthy), 1 degraded or the daemon refused the call,
2 the daemon is not running (one line on stderr) or bad usage.

Everything printed for people that came from the daemon (topics, payloads, names, errors) goes
through `printable`: a topic with ESC or BEL in it cannot drive the terminal. `--json` output is
escaped by JSON itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from flashlexd.client import __version__
from flashlexd.client.connection import Client, seconds, socket_path
from flashlexd.client.ctlconsumers import add_parser as add_consumers_parser, cmd_consumers, unknown_consumer
from flashlexd.client.ctlview import (ago, clipped, flushed, health, jsonable, message_rows, oldest_text,
                                      output_failed, plural, preview, reader_gone, reader_left, render_status,
                                      shown, table)
from flashlexd.client.errors import ConnectionLost, DaemonNotRunning, FlashlexError, PermissionDenied, RpcTimeout
from flashlexd.client.escape import printable
from flashlexd.client.wire import DEFAULT_SOCKET, ID_LIMIT, MAX_LIMIT, PROTOCOL_VERSION, READS, SOCKET_ENV

EPILOG = f"""\
The socket is --socket, else ${SOCKET_ENV}, else {DEFAULT_SOCKET}.
--json prints exactly what the API returns, as JSON (status adds "health": why it is
degraded, [] when healthy). Byte strings (payloads) print as text
when they are valid UTF-8, otherwise as {{"$base64": "..."}}.
Exit codes: 0 ok (status: healthy), 1 degraded or refused, 2 daemon not running or bad usage."""


# -- commands -----------------------------------------------------------------------------------

def _print_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2, sort_keys=False))


def cmd_status(fx: Client, args: argparse.Namespace) -> int:
    """--json adds `health` (why degraded, empty when healthy): a monitoring script reading the
    JSON gets the verdict the table's first line and the exit code give, not a copy of its rules."""
    status = fx.call("status")
    problems = health(status)
    shown(json.dumps(jsonable({**status, "health": problems}), indent=2) if args.json
          else render_status(status, fx.path))
    return 0 if not problems else 1


def cmd_messages(fx: Client, args: argparse.Namespace) -> int:
    if args.consumer is not None and unknown_consumer(fx, args.consumer):
        return 1
    fx.consumer = args.consumer
    messages = fx.records(args.limit, args.topic or None)
    if args.json:
        _print_json(messages)
    elif messages:
        print(message_rows(messages))
    else:
        print("no messages")
    return 0


def cmd_ack(fx: Client, args: argparse.Namespace) -> int:
    if args.consumer is not None and unknown_consumer(fx, args.consumer):
        return 1
    fx.consumer = args.consumer
    removed = fx.ack(args.pk)
    if args.json:
        _print_json(removed)
    else:
        asked = len(set(args.pk))
        why = (f"already acknowledged by {args.consumer}, gone or outside its topics" if args.consumer
               else "already gone")
        gone = f" ({asked - removed} {why})" if asked > removed else ""
        print(f"acknowledged {removed} of {asked}{gone}")
    return 0


def cmd_publish(fx: Client, args: argparse.Namespace) -> int:
    if args.payload == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`, some cron setups): nothing to read
            print("flashlexctl: publish -: stdin is closed (give the payload as an argument)", file=sys.stderr)
            return 2
        payload = sys.stdin.buffer.read()
    else:  # surrogateescape: the argument's original bytes, even when they are not UTF-8
        payload = args.payload.encode("utf-8", "surrogateescape")
    params: Dict[str, Any] = {"payload": payload, "qos": args.qos, "retain": args.retain}
    if args.topic is not None:  # an empty one is the daemon's to refuse, not the default topic
        params["topic"] = args.topic
    result = fx.call("publish", **params)
    if args.json:
        _print_json(result)
    else:
        print(f"queued as outbox entry {result['id']} ({len(payload)} bytes)")
    return 0


def cmd_outbox(fx: Client, args: argparse.Namespace) -> int:
    action = getattr(args, "outbox_action", None)
    if action == "retry":
        return _outbox_retry(fx, args)
    if action == "drop":
        return _outbox_drop(fx, args)
    result = fx._outbox_answer(limit=args.limit, dead=args.dead)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['count']} queued{oldest_text(result)}, {plural(result.get('dead', 0), 'dead letter')}")
    entries = result.get("entries", [])  # ages are the daemon's (clock steps do not move them)
    if args.dead:
        rows = [(e["id"], ago(e.get("age")), clipped(e["topic"]), e["size"], e["attempts"], e["reason"])
                for e in entries]
        headers = ("ID", "AGE", "TOPIC", "BYTES", "ATTEMPTS", "REASON")
        right = (0, 3, 4)
    else:
        rows = [(e["id"], ago(e.get("age")), clipped(e["topic"]), e["qos"], len(e["payload"]),
                 preview(e["payload"])) for e in entries]
        headers, right = ("ID", "AGE", "TOPIC", "QOS", "BYTES", "PAYLOAD"), (0, 3, 4)
    if rows:
        print(table(headers, rows, right=right))
    return 0


def _all_dead_letter_ids(fx: Client) -> List[int]:
    ids: List[int] = []
    while True:
        params: Dict[str, Any] = {"limit": MAX_LIMIT, "dead": True}
        if ids:
            params["after"] = ids[-1]
        page = [e["id"] for e in fx.call("outbox", **params)["entries"]]
        if not page:
            return ids
        ids += page


def _outbox_retry(fx: Client, args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        which = "not both" if args.all else "neither was given"
        print(f"flashlexctl: outbox retry takes dead letter ids or --all ({which})", file=sys.stderr)
        return 2
    asked = _all_dead_letter_ids(fx) if args.all else args.ids
    moved = fx.retry(asked)
    if args.json:
        _print_json(moved)
    else:
        missing = len(set(asked)) - len(moved)
        gone = f" ({missing} not dead letters)" if missing > 0 else ""
        print(f"retried {plural(len(moved), 'dead letter')}{gone}" + (
            f": now outbox entries {_id_ranges(moved)}" if moved else ""))
    return 0


def _outbox_drop(fx: Client, args: argparse.Namespace) -> int:
    dead = args.dead or args.drop_dead
    removed = fx.drop(args.ids, dead=dead)
    if args.json:
        _print_json(removed)
    else:
        asked = len(set(args.ids))
        what = "dead letters" if dead else "queued entries"
        hint = "" if dead else "; dead letters take --dead"
        gone = f" ({asked - removed} not found among the {what}{hint})" if asked > removed else ""
        print(f"dropped {removed} of {asked} {what}{gone}")
    return 0


def _id_ranges(ids: List[int]) -> str:
    """1-3, 7: the new ids of retried entries (consecutive, usually)."""
    spans: List[List[int]] = []
    for value in ids:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def cmd_purge(fx: Client, args: argparse.Namespace) -> int:
    count = fx.purge(confirm=True)
    print(json.dumps(count) if args.json else f"purged {count} messages")
    return 0


# A SIGINT that lands between Python's last signal check and the socket's blocking poll only
# raises KeyboardInterrupt once that poll returns: short waits bound how late Ctrl-C can be.
TAIL_WAIT_SECONDS = 1.0


def cmd_tail(fx: Client, args: argparse.Namespace) -> int:
    """Follow new messages (all unacknowledged ones with --all) until Ctrl-C or the reader goes.
    The reader is looked at each turn (`msg=$(flashlexctl tail | head -1)` waited for a second
    message to find head gone) and before each ack: a message is acked once its line is written
    and only while someone reads (`tail --ack | head -1` acked a batch of 100 head never read)."""
    after = None if args.all else fx.call("status")["inbox"]["last_id"]
    while not reader_left():
        for message in fx.follow(100, args.topic or None, after, TAIL_WAIT_SECONDS):
            _print_tail_line(message, args.json)
            after = message["id"]
            if args.ack:
                if reader_left():
                    return reader_gone()
                fx.ack([message["id"]])
    return reader_gone()


def _print_tail_line(message: Dict[str, Any], as_json: bool) -> None:
    """One line per message, flushed: what the reader has is what may be acked."""
    if as_json:
        print(json.dumps(jsonable(message)), flush=True)
    else:
        stamp = time.strftime("%H:%M:%S", time.localtime(message["timestamp"]))
        print(f"{stamp}  {message['pk']:>6}  {printable(str(message['topic']))}"
              f"  {preview(message['payload'], 100)}", flush=True)


def _entry_id(text: str) -> int:
    """An outbox entry or dead letter id as typed (msgpack cannot carry one past 64 bits)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value < ID_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an id from 1 to {ID_LIMIT - 1}, got {text!r}")
    return value


def _limit(text: str) -> int:
    """--limit as typed: one past 64 bits is a usage error (msgpack cannot carry it); the
    daemon judges the rest (its own bound names MAX_LIMIT)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not -2 ** 63 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_LIMIT}, got {text!r}")
    return value


def _timeout(text: str) -> float:
    """--timeout: a bad one is a usage error (-1 and inf were tracebacks from the socket)."""
    try:
        return seconds(float(text), "--timeout")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None


def _socket(text: str) -> str:
    """--socket: an empty one (`--socket "$SOCK"` with SOCK unset) is a usage error; it was
    taken as no --socket, and `purge --yes` went to the default daemon (found by review)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset variable?)")
    return text


def _shared_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--socket and --json, before the command or after it (`flashlexctl status --json` was a
    usage error). After it they have no defaults: the ones before it stay. Not --timeout: after
    the command it would make `--t` (`--topic`, `--to`) ambiguous to argparse."""
    after: Dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--socket", metavar="PATH", type=_socket,
                        help=f"API socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})", **after)
    parser.add_argument("--json", action="store_true", help="print the API's answer as JSON", **after)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flashlexctl", description="Inspect and drive the local flashlexd.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _shared_options(top, top=True)
    top.add_argument("--timeout", type=_timeout, default=10.0, help="seconds to wait for an answer (default 10)")
    top.add_argument("--version", action="version",
                     version=f"flashlexctl {__version__} (protocol {PROTOCOL_VERSION})")
    shared = argparse.ArgumentParser(add_help=False)
    _shared_options(shared, top=False)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(commands: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[shared], **kwargs)

    command(sub, "status", help="health, workers, MQTT, inbox/outbox, store (exit 0 healthy, 1 degraded)")
    messages = command(sub, "messages", help="unacknowledged messages, oldest first")
    messages.add_argument("--limit", type=_limit, default=20, help=f"how many (default 20, max {MAX_LIMIT})")
    messages.add_argument("--topic", help="MQTT topic filter (+ and # allowed)")
    messages.add_argument("--consumer", metavar="NAME", help="the messages named consumer NAME has not acked")
    ack = command(sub, "ack", help="acknowledge (remove) messages by pk")
    ack.add_argument("pk", nargs="+", help="message pk(s) as shown by 'messages'")
    ack.add_argument("--consumer", metavar="NAME", help="acknowledge for named consumer NAME only")
    publish = command(sub, "publish", help="queue a message for the cloud (egress topic by default)")
    publish.add_argument("payload", metavar="PAYLOAD", help="the payload, or - to read it from stdin")
    publish.add_argument("--topic", help="publish topic (default: the configured egress topic)")
    publish.add_argument("--qos", type=int, choices=(0, 1), default=1)
    publish.add_argument("--retain", action="store_true")
    tail = command(sub, "tail", help="follow new messages until Ctrl-C")
    tail.add_argument("--ack", action="store_true", help="acknowledge each message once printed")
    tail.add_argument("--all", action="store_true", help="start with the unacknowledged backlog")
    tail.add_argument("--topic", help="MQTT topic filter")
    outbox = command(sub, "outbox", help="entries queued for the cloud, dead letters; retry, drop")
    outbox.add_argument("--limit", type=_limit, default=10, help="how many entries to list (default 10)")
    outbox.add_argument("--dead", action="store_true",
                        help="list the dead letters (entries the broker kept refusing) instead")
    actions = outbox.add_subparsers(dest="outbox_action", metavar="ACTION")
    retry = command(actions, "retry", help="move dead letters back to the tail of the outbox")
    retry.add_argument("ids", nargs="*", type=_entry_id, metavar="ID", help="dead letter id(s)")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    drop = command(actions, "drop", help="delete queued entries (with --dead: dead letters)")
    drop.add_argument("ids", nargs="+", type=_entry_id, metavar="ID", help="entry id(s)")
    drop.add_argument("--dead", dest="drop_dead", action="store_true", help="the ids are dead letters")
    add_consumers_parser(sub, shared)
    purge = command(sub, "purge", help="remove EVERY inbox message (needs --yes)")
    purge.add_argument("--yes", action="store_true", help="confirm")
    return top



COMMANDS: Dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cmd_status, "messages": cmd_messages, "ack": cmd_ack, "publish": cmd_publish,
    "outbox": cmd_outbox, "purge": cmd_purge, "tail": cmd_tail, "consumers": cmd_consumers}


def _unanswered(args: argparse.Namespace, method: str) -> str:
    """What an unanswered command (RpcTimeout, ConnectionLost, cut off in `method`) adds to its
    error: the daemon may have read it and carried it out, or part of it, all the same; nothing
    for a read. A change cut off in a read (`outbox retry --all` listing the dead letters) had
    changed nothing: every command reads before it changes."""
    if args.command == "publish":  # once more could send it twice
        return "; the message may have been queued all the same: see flashlexctl outbox before publishing it again"
    changes = (args.command in ("ack", "purge") or getattr(args, "outbox_action", None)
               or getattr(args, "consumers_action", None))
    if not changes:
        return ""
    if method in READS:
        return "; only a read was under way: nothing was changed, run it again"
    check = {"ack": "messages", "purge": "status"}.get(args.command, args.command)
    if args.command == "ack" and args.consumer:  # what that consumer has not acked
        check += f" --consumer {printable(args.consumer)}"
    return f"; it may have been carried out, or partly: check (flashlexctl {check}) and run it again"


def _escape_what_the_locale_cannot_encode() -> None:
    """A locale that is not UTF-8 (ISO-8859-1, PYTHONIOENCODING=ascii) cannot encode every
    printable character `printable` leaves as it is (a payload's euro sign): show those as
    \\uNNNN, not a UnicodeEncodeError traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):  # None (closed at start), or not a TextIOWrapper (a capture)
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    _escape_what_the_locale_cannot_encode()
    args = parser().parse_args(argv)
    if args.command == "purge" and not args.yes:
        print("flashlexctl: purge removes every inbox message; add --yes to confirm", file=sys.stderr)
        return 2
    if args.socket is None and os.environ.get(SOCKET_ENV) == "":  # as an empty --socket
        print(f"flashlexctl: ${SOCKET_ENV} is set but empty (an unset variable?)", file=sys.stderr)
        return 2
    path = socket_path(args.socket)
    try:
        with Client(path, timeout=args.timeout) as fx:
            return flushed(COMMANDS[args.command](fx, args))
    except KeyboardInterrupt:
        return 0 if args.command == "tail" else 130
    except BrokenPipeError:  # e.g. `flashlexctl tail | head`: stop quietly
        return reader_gone()
    except (RpcTimeout, ConnectionLost) as exc:
        print(f"flashlexctl: {printable(str(exc))}{_unanswered(args, exc.method)}", file=sys.stderr)
        return 2 if isinstance(exc, ConnectionLost) else 1  # as DaemonNotRunning, FlashlexError below
    except (DaemonNotRunning, PermissionDenied) as exc:
        print(f"flashlexctl: {printable(str(exc))}", file=sys.stderr)
        return 2
    except FlashlexError as exc:  # the daemon's message may quote what an application sent
        print(f"flashlexctl: {printable(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # our own output: the client's socket errors are FlashlexErrors
        return output_failed("flashlexctl", exc)


if __name__ == "__main__":
    sys.exit(main())
