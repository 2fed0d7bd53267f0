"""What flashlexctl prints: the status page, tables, sizes, durations and payload previews.

Everything printed for people that came from the daemon goes through `printable` (a `Safe`
string already has): a topic with ESC or BEL in it cannot drive the terminal.
"""
from __future__ import annotations

import base64
import os
import select
import sys
import unicodedata
from typing import Any, Dict, List, Optional, Sequence

from flashlexd.client.escape import printable
from flashlexd.client.wire import PUBACK_STALLED

HEALTHY_STATES = ("ready",)  # flashlexd.workerproc.State.READY: serving; anything else is a problem
QUOTA_PAUSES_SAID = 4  # egress's pauses for a PUBACK 0x97, none accepted between: status degraded
RUN_COUNTERS = ("restarts", "loop_errors")  # the supervisor's, since it started: not the store's totals


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
        return clipped(payload.decode("utf-8"), width)
    except UnicodeDecodeError:
        return Safe(f"<{len(payload)} bytes binary>")


TOPIC_WIDTH = 64  # characters of a topic a table shows: one of 65,535 padded every row to it


def clipped(text: str, width: int = TOPIC_WIDTH) -> Safe:
    """`text` escaped, cut to `width` characters with "..." (`--json` has it whole)."""
    text = printable(text)
    return Safe(text if len(text) <= width else text[:width - 3] + "...")


def columns(text: str) -> int:
    """How many terminal columns `text` takes: a wide (CJK) character two, a combining mark
    none; `len` misaligned the columns after a topic in Chinese."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
               for c in text)


def table(headers: Sequence[str], rows: List[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Aligned columns of escaped cells; the last column is not padded (it is usually the long one)."""
    cells = [[c if isinstance(c, Safe) else printable(str(c)) for c in row]
             for row in [list(headers)] + [list(r) for r in rows]]
    widths = [max(columns(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        pads = [" " * (widths[i] - columns(c)) for i, c in enumerate(row[:-1])]
        out = [pad + c if i in right else c + pad for i, (c, pad) in enumerate(zip(row, pads))]
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
        link = mqtt.get(side) or {}
        if not link.get("connected"):  # with why, as the link last said
            problems.append(f"{side} MQTT is not connected" + (f": {link['error']}" if link.get("error") else ""))
        elif link.get("error"):  # up, but e.g. a subscription the broker refused: not receiving it
            problems.append(f"{side} MQTT: {link['error']}")
        elif link.get("clone_suspected"):  # up between a clone's kicks: still not a steady link
            problems.append(f"{side} MQTT: {link['clone_suspected']}")
    stalled = (mqtt.get("egress") or {}).get("stalled_entry")
    if stalled is not None:
        problems.append(f"the broker does not acknowledge outbox entry {stalled}, and the outbox"
                        f" waits behind it (see the log; flashlexctl outbox drop {stalled} gives it up)")
    damaged = (status.get("store") or {}).get("damaged")
    if damaged:
        problems.append(f"{damaged} (read-only; see flashlexd store recover)")
    store_error = (mqtt.get("ingress") or {}).get("store_error")
    if store_error:
        held = _holding_most(status.get("consumers") or []) if mqtt["ingress"].get("store_full") else ""
        problems.append(f"ingress is not storing (messages stay with the broker): {store_error}{held}")
    quota_pauses = (mqtt.get("egress") or {}).get("quota_pauses_in_a_row") or 0
    if quota_pauses >= QUOTA_PAUSES_SAID:  # 1 + 2 + 4 s of pauses before: no passing rate quota
        problems.append(f"the broker refused every publish of the last {quota_pauses} tries with"
                        f" Quota exceeded (0x97); egress tries again at growing intervals (see the log)")
    delete_error = (mqtt.get("egress") or {}).get("delete_error")
    if delete_error:
        problems.append(f"egress cannot delete sent entries from the store (a restart meanwhile sends"
                        f" them again): {delete_error}")
    refused = (status.get("reload") or {}).get("refused")
    if refused:  # the file on disk is not what runs, and a restart would not start with it
        problems.append(f"the last reload was refused, the previous config runs: {refused}")
    dead = (status.get("outbox") or {}).get("dead")
    if dead:
        problems.append(f"{plural(dead, 'dead letter')} in the outbox (see: flashlexctl outbox --dead)")
    return problems


def plural(count: int, noun: str) -> str:
    many = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{count} {noun}" if count == 1 else f"{count} {many}"


def oldest_text(section: Dict[str, Any]) -> str:
    return f", oldest {ago(section['oldest_age'])}" if section.get("oldest_age") is not None else ""


def drain_line(egress: Dict[str, Any], backlog: int) -> str:
    """"draining 2000 entries at 100/s, ~20 s": the egress's rate in use and time to drain."""
    if not backlog:
        return ""
    if not egress.get("connected"):
        return f"{plural(backlog, 'entry')} waiting for the egress link"
    rate = egress.get("drain_rate") or egress.get("rate_limit") or egress.get("send_rate")
    eta = egress.get("eta_s")
    silence = egress.get("puback_silence")
    at = f" at {rate:g}/s" if rate else ""
    if silence is not None and silence >= PUBACK_STALLED:  # a silent path or broker: no time to tell
        left = f", no PUBACK for {duration(silence)}"
    else:
        left = "" if eta is None else f", ~{eta:.0f} s" if eta < 60 else f", ~{duration(eta)}"
    return f"draining {plural(backlog, 'entry')}{at}{left}"


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
        deaths = [f"{w.get('name', '?')} last died {ago(w['last_death'].get('age'))}: {w['last_death'].get('how')}"
                  for w in workers if w.get("last_death")]  # why it restarts (an OOM kill...)
        worker_table = [table(("WORKER", "PID", "STATE", "RESTARTS", "HEARTBEAT"), rows, right=(1, 3)),
                        *[printable(line) for line in deaths], ""]
    lines: List[str] = []
    mqtt = status.get("mqtt") or {}
    for side in ("ingress", "egress"):  # the worker's own counters: since that process started
        info = dict(mqtt.get(side) or {})
        protocol = info.pop("protocol", None)
        client_id = info.pop("client_id", None)  # which thing: several daemons may share a host
        word = "not connected"
        if info.pop("connected", False):
            word = f"connected with MQTT {protocol}" if protocol else "connected"
        word += f" as {printable(client_id)}" if client_id else ""
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
    lines += [f"inbox     {inbox.get('count', 0)} messages{oldest_text(inbox)}",
              f"outbox    {outbox.get('count', 0)} queued{oldest_text(outbox)}{_in_flight(outbox)}"
              f" (offline queueing: {cap_text}), {plural(outbox.get('dead') or 0, 'dead letter')}",
              f"store     {human_bytes(used)} of {human_bytes(cap)}{share},"
              f" when full: {store.get('when_full', '?')}" + (f", in {printable(store['path'])}"
                                                              if store.get("path") else "")]
    consumers = status.get("consumers") or []
    if consumers:  # named consumers (flashlexctl consumers has the full table)
        lines.append("consumers " + "; ".join(f"{c.get('name')} backlog {backlog_text(c)}"
                                              f" dropped {c.get('dropped')}" for c in consumers))
    if store.get("written_bytes") is not None:
        lines.append("disk      " + wear_text(store))
    draining = drain_line(mqtt.get("egress") or {}, outbox.get("count", 0))
    if draining:
        lines.append(draining)
    counters = dict(status.get("counters") or {})
    this_run = {k: counters.pop(k) for k in RUN_COUNTERS if k in counters}  # the supervisor's own
    if counters:  # the store's running totals, read at this call
        lines.append("totals    " + ", ".join(f"{k} {v}" for k, v in counters.items())
                     + " (since the store was created)"
                     + "".join(f"; {k} {v}" for k, v in this_run.items()) + (" (this run)" if this_run else ""))
    rates = status.get("rates") or {}
    if rates:
        lines.append("rates     " + render_rates(rates))
    for note in (status.get("reload") or {}).get("notes") or ():  # applied, not all of it at once
        lines.append(f"reload    {note}")
    return "\n".join([printable(line) for line in head] + worker_table + [printable(line) for line in lines])


def wear_text(store: Dict[str, Any]) -> str:
    """`written 12.0 MiB since start (9.1 KiB a stored message), 0.74 GiB/day at the current rate`:
    what wears an SD card out (flashlexd/wear.py)."""
    text = f"written {human_bytes(store['written_bytes'])} since start"
    per = store.get("written_per_message")
    if per is not None:
        text += f" ({human_bytes(per)} a stored message)"
    per_day = store.get("written_gib_per_day")
    if per_day is not None:
        text += f", {per_day:.2f} GiB/day at the current rate"
    return text


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


def _holding_most(consumers: List[Dict[str, Any]]) -> str:
    """Which named consumers hold back the most, for a full store: an app reading under a name
    and never acking filled it, and only `flashlexctl consumers` said so (review "consumers").
    Every one at the top is named: counted past its share, a backlog is a lower bound, and two
    at their bound tell nothing apart (re-read 30)."""
    most = max((c.get("backlog") or 0 for c in consumers), default=0)
    if not most:
        return ""
    top = [c for c in consumers if c.get("backlog") == most]
    named = ", ".join(f"{c['name']!r} ({'dynamic' if c.get('dynamic') else 'declared'})" for c in top)
    each = " each" if len(top) > 1 else ""
    return (f"; {'consumers' if len(top) > 1 else 'consumer'} {named} hold{'' if len(top) > 1 else 's'} back"
            f" the most, {backlog_text(top[0])} unacked{each} (an app reading without acking? see"
            f" flashlexctl consumers)")


def backlog_text(consumer: Dict[str, Any]) -> str:
    """A consumer's backlog, `>=N` where status counted only its share of the stored messages
    (`backlog_exact` false): a lower bound, not the count."""
    prefix = "" if consumer.get("backlog_exact", True) else ">="
    return f"{prefix}{consumer.get('backlog')}"


def message_rows(messages: List[Dict[str, Any]]) -> str:
    """AGE is the daemon's real age (README "Clock steps"): the wall clock minus a timestamp
    is negative after a reboot into a clock behind."""
    rows = [(m["pk"], ago(m.get("age")), clipped(m["topic"]), m["qos"], len(m["payload"]),
             preview(m["payload"])) for m in messages]
    return table(("PK", "AGE", "TOPIC", "QOS", "BYTES", "PAYLOAD"), rows, right=(0, 3, 4))


def reader_gone() -> int:
    """The reader of our output went (`flashlexctl tail | head`, `flashlexd check | head -1`):
    later writes, and the interpreter's flush at exit, go to /dev/null instead of raising
    BrokenPipeError as a traceback. Returns 0: the exit code of a command whose output was
    its whole result (`tail`, `service`); see `shown` and `flushed` for those with their own."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def output_failed(prog: str, exc: OSError) -> int:
    """Our output could not be written (`> file` on a full disk, EIO from a hung-up tty): one
    line and exit 1, and later writes and the flush at exit go nowhere instead of a second
    traceback."""
    reader_gone()
    print(f"{prog}: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
    return 1


def flushed(code: int) -> int:
    """`code`, once stdout is flushed: a write that fails is met inside the command's error
    handling, not in the interpreter's flush at exit. A reader gone by then leaves `code` as
    it is (`flashlexctl status | true` is still 1 when degraded)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    return code


def shown(text: str) -> None:
    """Print `text` at once. A reader gone meanwhile does not stop a command whose exit code
    is its outcome (status's health, the check's result): its later lines go to /dev/null."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        reader_gone()


def reader_left() -> bool:
    """Whether the reader of our stdout went (a pipe whose read end closed, a hung-up tty):
    a write into a pipe's buffer succeeds all the same, so only poll tells that nobody reads."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are reported whatever the mask
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or no descriptor (a test's capture)
        return False
