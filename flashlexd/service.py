"""Render the systemd unit in packaging/systemd for one install (the old `{{dir}}` template)."""
from __future__ import annotations

from pathlib import Path

UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "flashlexd.service"


def render_unit(venv: str, config: str, user: str = "root", group: str = "") -> str:
    """The unit text with the venv, config path and service user filled in."""
    text = UNIT_TEMPLATE.read_text()
    values = {"venv": venv.rstrip("/"), "config": config, "user": user, "group": group or user}
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text
