"""The supervisor <-> worker messages (`linkmsg`): what goes on the wire and back."""
import pytest

from flashlexd.linkmsg import (Committed, Heartbeat, MqttReport, OutboxQueued, StateReport, Stop,
                               build, decode, encode)

EVERY = [Heartbeat({"received": 3}), StateReport("ready"), MqttReport(False, "refused", None),
         Committed(), Stop(), OutboxQueued()]


@pytest.mark.parametrize("message", EVERY, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_round_trip(message):
    wire = encode(message)
    assert wire["t"] == message.kind
    assert decode(wire) == message


def test_the_kinds_on_the_wire_are_the_ones_older_workers_speak():
    assert [m.kind for m in EVERY] == ["hb", "state", "mqtt", "committed", "stop", "outbox"]


def test_fields_a_kind_does_not_declare_are_not_sent():
    assert encode(build("committed", last_id=7, count=2)) == {"t": "committed"}


@pytest.mark.parametrize("raw", [None, [], {"t": "nope"}, {"x": 1}, {"t": "hb", "counters": [1]},
                                 {"t": "state"}, {"t": "state", "state": 3}])
def test_anything_else_decodes_to_none(raw):
    assert decode(raw) is None


def test_an_unknown_kind_cannot_be_built():
    with pytest.raises(ValueError):
        build("reboot")
