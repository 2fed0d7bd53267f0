"""flashlexctl: look at and drive a running flashlexd from the shell.

Exit codes: 0 success (for `status`: healthy), 1 degraded or the daemon refused the call,
2 the daemon is not running (one line on stderr) or bad usage.
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
from flashlexd.client.wire import DEFAULT_SOCKET, MAX_LIMIT, PROTOCOL_VERSION, SOCKET_ENV

HEALTHY_STATES = ("running", "ready")
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


def preview(payload: bytes, width: int = 60) -> str:
    """A one-line look at a payload: text (escaped) when UTF-8, else its size."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(payload)} bytes binary>"
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= width else text[:width - 3] + "..."


def table(headers: Sequence[str], rows: List[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Aligned columns; the last column is not padded (it is usually the long one)."""
    cells = [[str(c) for c in row] for row in [list(headers)] + [list(r) for r in rows]]
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
    return problems


def _oldest(section: Dict[str, Any]) -> str:
    return f", oldest {ago(section['oldest_age'])}" if section.get("oldest_age") is not None else ""


def render_status(status: Dict[str, Any], path: str) -> str:
    problems = health(status)
    state = "healthy" if not problems else "degraded: " + "; ".join(problems)
    lines = [f"flashlexd {status.get('version') or '?'}, up {duration(status.get('uptime'))}, {state}",
             f"socket    {path}", ""]
    workers = status.get("workers") or []
    if workers:
        rows = [(w.get("name", "?"), w.get("pid") or "-", w.get("state", "?"), w.get("restarts", 0),
                 ago(w.get("heartbeat_age"))) for w in workers]
        lines += [table(("WORKER", "PID", "STATE", "RESTARTS", "HEARTBEAT"), rows, right=(1, 3)), ""]
    mqtt = status.get("mqtt") or {}
    for side in ("ingress", "egress"):
        info = dict(mqtt.get(side) or {})
        word = "connected" if info.pop("connected", False) else "not connected"
        extra = ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, ""))
        lines.append(f"mqtt {side:<8} {word}" + (f" ({extra})" if extra else ""))
    inbox, outbox, store = status.get("inbox", {}), status.get("outbox", {}), status.get("store", {})
    limit = outbox.get("limit")
    cap_text = ("unlimited" if limit is None or limit < 0
                else "refused while offline" if limit == 0 else f"up to {limit}")
    used, cap = store.get("used_bytes"), store.get("cap_bytes")
    share = f" ({100.0 * used / cap:.1f}%)" if used is not None and cap else ""
    lines += [f"inbox     {inbox.get('count', 0)} messages{_oldest(inbox)}",
              f"outbox    {outbox.get('count', 0)} queued{_oldest(outbox)} (offline queueing: {cap_text})",
              f"store     {human_bytes(used)} of {human_bytes(cap)}{share},"
              f" when full: {store.get('when_full', '?')}"]
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters  " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    rates = status.get("rates") or {}
    if rates:
        lines.append("rates     " + ", ".join(f"{k} {v:.1f}/s" if isinstance(v, (int, float)) else f"{k} {v}"
                                            for k, v in rates.items()))
    return "\n".join(lines)


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
    result = fx.call("outbox", limit=args.limit)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['count']} queued{_oldest(result)}")
    now = time.time()
    rows = [(e["id"], ago(now - e["created"]), e["topic"], e["qos"], len(e["payload"]), preview(e["payload"]))
            for e in result.get("entries", [])]
    if rows:
        print(table(("ID", "AGE", "TOPIC", "QOS", "BYTES", "PAYLOAD"), rows, right=(0, 3, 4)))
    return 0


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
                print(f"{stamp}  {message['pk']:>6}  {message['topic']}  {preview(message['payload'], 100)}",
                      flush=True)
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
    outbox = sub.add_parser("outbox", help="messages queued for the cloud")
    outbox.add_argument("--limit", type=int, default=10, help="how many entries to list (default 10)")
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
        print(f"flashlexctl: {exc}", file=sys.stderr)
        return 2
    except FlashlexError as exc:
        print(f"flashlexctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
