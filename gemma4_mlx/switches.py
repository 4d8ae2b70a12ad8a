"""The project's on/off environment switches, read one way (ablations and opt-outs)."""

from __future__ import annotations

import os

OFF_VALUES = ("0", "off", "false", "no")


def env_flag(name: str, default: bool = True) -> bool:
    """``$name`` as a switch: unset or empty gives ``default``; 0 / off / false / no (any case)
    turn it off; any other value turns it on."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in OFF_VALUES
