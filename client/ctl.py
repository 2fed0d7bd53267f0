"""flashlexctl: look at and drive a running flashlexd from the shell.

Exit codes: 0 success (for `status`: healthy), 1 degraded or the daemon refused the call,
2 the daemon is not running (one line on stderr) or bad usage.

Everything printed for people that came from the daemon (topics, payloads, names, errors) goes
through `printable`: a topic with ESC or BEL in it cannot drive the terminal. `--json` output is
escaped by JSON itself.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from flashlexd.client import __version__
from flashlexd.client.connection import Client, socket_path
from flashlexd.client.errors import DaemonNotRunning, FlashlexError, PermissionDenied
from flashlexd.client.escape import printable
from flashlexd.client.wire import DEFAULT_SOCKET, MAX_LIMIT, PROTOCOL_VERSION, SOCKET_ENV

HEALTHY_STATES = ("ready",)  # flashlexd.workerproc.State.READY: serving; anything else is a problem
EPILOG = f"""\
The socket is --socket, else ${SOCKET_ENV}, else {DEFAULT_SOCKET}.
--json prints exactly what the API returns, as JSON. Byte strings (payloads) print as text
when they are valid UTF-8, otherwise as {{"$base64": "..."}}.
Exit codes: 0 ok (status: healthy), 1 degraded or refused, 2 daemon not running or bad usage."""


# -- presentation -------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """API results as JSON: bytes become text when valid UTF-8, else {"$base64": ...}."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def human_bytes(count: Optional[float]) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def duration(seconds: Optional[float]) -> str:
    """3s, 4m 10s, 2h 5m, 3d 4h: two units at most."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    parts = [(whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m"),
             (whole % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{u}" for n, u in parts[:2])


def ago(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{duration(seconds)} ago"


class Safe(str):
    """Text already passed through `printable`: `table` shows it as it is."""


def preview(payload: bytes, width: int = 60) -> Safe:
    """A one-line look at a payload: text (escaped) when UTF-8, else its size."""
    try:
        text = printable(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return Safe(f"<{len(payload)} bytes binary>")
    return Safe(text if len(text) <= width else text[:width - 3] + "...")


def table(headers: Sequence[str], rows: List[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Aligned columns of escaped cells; the last column is not padded (it is usually the long one)."""
    cells = [[c if isinstance(c, Safe) else printable(str(c)) for c in row]
             for row in [list(headers)] + [list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join(out + [row[-1]]).rstrip())
    return "\n".join(lines)


def health(status: Dict[str, Any]) -> List[str]:
    """Why the daemon is degraded; empty when healthy."""
    problems = []
    workers = status.get("workers") or []
    if not workers:
        problems.append("no workers reported")
    for worker in workers:
        if worker.get("state") not in HEALTHY_STATES:
            problems.append(f"worker {worker.get('name')} is {worker.get('state')}")
    mqtt = status.get("mqtt") or {}
    for side in ("ingress", "egress"):
        if not (mqtt.get(side) or {}).get("connected"):
            problems.append(f"{side} MQTT is not connected")
    damaged = (status.get("store") or {}).get("damaged")
    if damaged:
        problems.append(f"{damaged} (read-only; see flashlexd store recover)")
    store_error = (mqtt.get("ingress") or {}).get("store_error")
    if store_error:
        problems.append(f"ingress is not storing (messages stay with the broker): {store_error}")
    dead = (status.get("outbox") or {}).get("dead")
    if dead:
        problems.append(f"{_plural(dead, 'dead letter')} in the outbox (see: flashlexctl outbox --dead)")
    return problems


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _oldest(section: Dict[str, Any]) -> str:
    return f", oldest {ago(section['oldest_age'])}" if section.get("oldest_age") is not None else ""


def drain_line(egress: Dict[str, Any], backlog: int) -> str:
    """"draining 2000 entries at 100/s, ~20 s": the egress's rate in use and time to drain."""
    if not backlog:
        return ""
    rate = egress.get("rate_limit") or egress.get("send_rate")
    eta = egress.get("eta_s")
    at = f" at {rate:g}/s" if rate else ""
    left = "" if eta is None else f", ~{eta:.0f} s" if eta < 60 else f", ~{duration(eta)}"
    return f"draining {backlog} entries{at}{left}"


def render_status(status: Dict[str, Any], path: str) -> str:
    problems = health(status)
    state = "healthy" if not problems else "degraded: " + "; ".join(problems)
    head = [f"flashlexd {status.get('version') or '?'}, up {duration(status.get('uptime'))}, {state}",
            f"socket    {path}", ""]
    workers = status.get("workers") or []
    worker_table = []  # already escaped, cell by cell
    if workers:
        rows = [(w.get("name", "?"), w.get("pid") or "-", w.get("state", "?"), w.get("restarts", 0),
                 ago(w.get("heartbeat_age"))) for w in workers]
        worker_table = [table(("WORKER", "PID", "STATE", "RESTARTS", "HEARTBEAT"), rows, right=(1, 3)), ""]
    lines: List[str] = []
    mqtt = status.get("mqtt") or {}
    for side in ("ingress", "egress"):  # the worker's own counters: since that process started
        info = dict(mqtt.get(side) or {})
        word = "connected" if info.pop("connected", False) else "not connected"
        error = info.pop("error", None)
        word += f", {error}" if error else ""
        granted = info.pop("subscriptions", None)
        word += f", subscribed to {', '.join(f'{t} (QoS {q})' for t, q in granted)}" if granted else ""
        extra = ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, ""))
        lines.append(f"mqtt {side:<8} {word}" + (f" (since the worker started: {extra})" if extra else ""))
    inbox, outbox, store = status.get("inbox", {}), status.get("outbox", {}), status.get("store", {})
    limit = outbox.get("limit")
    cap_text = ("unlimited" if limit is None or limit < 0
                else "refused while offline" if limit == 0 else f"up to {limit}")
    used, cap = store.get("used_bytes"), store.get("cap_bytes")
    share = f" ({100.0 * used / cap:.1f}%)" if used is not None and cap else ""
    lines += [f"inbox     {inbox.get('count', 0)} messages{_oldest(inbox)}",
              f"outbox    {outbox.get('count', 0)} queued{_oldest(outbox)}{_in_flight(outbox)}"
              f" (offline queueing: {cap_text}), {_plural(outbox.get('dead') or 0, 'dead letter')}",
              f"store     {human_bytes(used)} of {human_bytes(cap)}{share},"
              f" when full: {store.get('when_full', '?')}"]
    draining = drain_line(mqtt.get("egress") or {}, outbox.get("count", 0))
    if draining:
        lines.append(draining)
    counters = status.get("counters") or {}
    if counters:  # the store's running totals, read at this call
        lines.append("totals    " + ", ".join(f"{k} {v}" for k, v in counters.items())
                     + " (since the store was created)")
    rates = status.get("rates") or {}
    if rates:
        lines.append("rates     " + render_rates(rates))
    return "\n".join([printable(line) for line in head] + worker_table + [printable(line) for line in lines])


def _in_flight(outbox: Dict[str, Any]) -> str:
    age = outbox.get("oldest_inflight_age")
    return f", oldest unacknowledged {duration(age)}" if age is not None else ""


def render_rates(rates: Dict[str, Any]) -> str:
    """`ingest 1.5/s, drain 0.0/s over the last 10.0s`; the window is a span, not a rate."""
    window = rates.get("window_s")
    if not window:
        return "not measured yet (two samples a second apart are needed)"
    shown = ", ".join(f"{k[:-len('_per_s')]} {v:.1f}/s" for k, v in rates.items()
                      if k.endswith("_per_s") and isinstance(v, (int, float)))
    return f"{shown} over the last {window:.1f}s"


def message_rows(messages: List[Dict[str, Any]], now: float) -> str:
    rows = [(m["pk"], ago(now - m["timestamp"]), m["topic"], m["qos"], len(m["payload"]),
             preview(m["payload"])) for m in messages]
    return table(("PK", "AGE", "TOPIC", "QOS", "BYTES", "PAYLOAD"), rows, right=(0, 3, 4))


# -- commands -----------------------------------------------------------------------------------

def _print_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2, sort_keys=False))


def cmd_status(fx: Client, args: argparse.Namespace) -> int:
    status = fx.call("status")
    print(json.dumps(jsonable(status), indent=2) if args.json else render_status(status, fx.path))
    return 0 if not health(status) else 1


def cmd_messages(fx: Client, args: argparse.Namespace) -> int:
    params: Dict[str, Any] = {"limit": args.limit}
    if args.topic:
        params["topic"] = args.topic
    messages = fx.call("messages", **params)
    if args.json:
        _print_json(messages)
    elif messages:
        print(message_rows(messages, time.time()))
    else:
        print("no messages")
    return 0


def cmd_ack(fx: Client, args: argparse.Namespace) -> int:
    removed = fx.ack(args.pk)
    if args.json:
        _print_json(removed)
    else:
        asked = len(set(args.pk))
        gone = f" ({asked - removed} already gone)" if asked > removed else ""
        print(f"acknowledged {removed} of {asked}{gone}")
    return 0


def cmd_publish(fx: Client, args: argparse.Namespace) -> int:
    if args.payload == "-":
        payload = sys.stdin.buffer.read()
    else:  # surrogateescape: the argument's original bytes, even when they are not UTF-8
        payload = args.payload.encode("utf-8", "surrogateescape")
    params: Dict[str, Any] = {"payload": payload, "qos": args.qos, "retain": args.retain}
    if args.topic:
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
    result = fx.call("outbox", limit=args.limit, dead=args.dead)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['count']} queued{_oldest(result)}, {_plural(result.get('dead', 0), 'dead letter')}")
    entries = result.get("entries", [])  # ages are the daemon's (clock steps do not move them)
    if args.dead:
        rows = [(e["id"], ago(e.get("age")), e["topic"], e["size"], e["attempts"], e["reason"])
                for e in entries]
        headers = ("ID", "AGE", "TOPIC", "BYTES", "ATTEMPTS", "REASON")
        right = (0, 3, 4)
    else:
        rows = [(e["id"], ago(e.get("age")), e["topic"], e["qos"], len(e["payload"]),
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
        print("flashlexctl: outbox retry takes dead letter ids or --all (not both)", file=sys.stderr)
        return 2
    asked = _all_dead_letter_ids(fx) if args.all else args.ids
    moved = fx.retry(asked)
    if args.json:
        _print_json(moved)
    else:
        missing = len(set(asked)) - len(moved)
        gone = f" ({missing} not dead letters)" if missing > 0 else ""
        print(f"retried {_plural(len(moved), 'dead letter')}{gone}" + (
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
        gone = f" ({asked - removed} not found among the {what})" if asked > removed else ""
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


def cmd_tail(fx: Client, args: argparse.Namespace) -> int:
    """Follow new messages (all unacknowledged ones with --all) until Ctrl-C."""
    after = None if args.all else fx.call("status")["inbox"]["last_id"]
    while True:
        params: Dict[str, Any] = {"timeout": 30.0, "limit": 100}
        if after is not None:
            params["after"] = after
        if args.topic:
            params["topic"] = args.topic
        batch = fx.call("wait", _timeout=30.0 + fx.timeout, **params)
        for message in batch:
            if args.json:
                print(json.dumps(jsonable(message)), flush=True)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(message["timestamp"]))
                print(f"{stamp}  {message['pk']:>6}  {printable(str(message['topic']))}"
                      f"  {preview(message['payload'], 100)}", flush=True)
        if batch:
            after = batch[-1]["id"]
            if args.ack:
                fx.ack([m["id"] for m in batch])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flashlexctl", description="Inspect and drive the local flashlexd.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--socket", metavar="PATH",
                     help=f"API socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    top.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    top.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    top.add_argument("--version", action="version",
                     version=f"flashlexctl {__version__} (protocol {PROTOCOL_VERSION})")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", help="health, workers, MQTT, inbox/outbox, store (exit 0 healthy, 1 degraded)")
    messages = sub.add_parser("messages", help="unacknowledged messages, oldest first")
    messages.add_argument("--limit", type=int, default=20, help=f"how many (default 20, max {MAX_LIMIT})")
    messages.add_argument("--topic", help="MQTT topic filter (+ and # allowed)")
    ack = sub.add_parser("ack", help="acknowledge (remove) messages by pk")
    ack.add_argument("pk", nargs="+", help="message pk(s) as shown by 'messages'")
    publish = sub.add_parser("publish", help="queue a message for the cloud (egress topic by default)")
    publish.add_argument("payload", metavar="PAYLOAD", help="the payload, or - to read it from stdin")
    publish.add_argument("--topic", help="publish topic (default: the configured egress topic)")
    publish.add_argument("--qos", type=int, choices=(0, 1), default=1)
    publish.add_argument("--retain", action="store_true")
    tail = sub.add_parser("tail", help="follow new messages until Ctrl-C")
    tail.add_argument("--ack", action="store_true", help="acknowledge each message once printed")
    tail.add_argument("--all", action="store_true", help="start with the unacknowledged backlog")
    tail.add_argument("--topic", help="MQTT topic filter")
    outbox = sub.add_parser("outbox", help="entries queued for the cloud, dead letters; retry, drop")
    outbox.add_argument("--limit", type=int, default=10, help="how many entries to list (default 10)")
    outbox.add_argument("--dead", action="store_true",
                        help="list the dead letters (entries the broker kept refusing) instead")
    actions = outbox.add_subparsers(dest="outbox_action", metavar="ACTION")
    retry = actions.add_parser("retry", help="move dead letters back to the tail of the outbox")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter id(s)")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    drop = actions.add_parser("drop", help="delete queued entries (with --dead: dead letters)")
    drop.add_argument("ids", nargs="+", type=int, metavar="ID", help="entry id(s)")
    drop.add_argument("--dead", dest="drop_dead", action="store_true", help="the ids are dead letters")
    purge = sub.add_parser("purge", help="remove EVERY inbox message (needs --yes)")
    purge.add_argument("--yes", action="store_true", help="confirm")
    return top


COMMANDS: Dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cmd_status, "messages": cmd_messages, "ack": cmd_ack, "publish": cmd_publish,
    "outbox": cmd_outbox, "purge": cmd_purge, "tail": cmd_tail}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "purge" and not args.yes:
        print("flashlexctl: purge removes every inbox message; add --yes to confirm", file=sys.stderr)
        return 2
    path = socket_path(args.socket)
    try:
        with Client(path, timeout=args.timeout) as fx:
            return COMMANDS[args.command](fx, args)
    except KeyboardInterrupt:
        return 0 if args.command == "tail" else 130
    except BrokenPipeError:  # e.g. `flashlexctl tail | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (DaemonNotRunning, PermissionDenied) as exc:
        print(f"flashlexctl: {printable(str(exc))}", file=sys.stderr)
        return 2
    except FlashlexError as exc:  # the daemon's message may quote what an application sent
        print(f"flashlexctl: {printable(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
