"""How tests run the CLI: a console wide enough that rich never wraps a message or a table
cell, and no colour codes even where the suite runs with FORCE_COLOR set. Tests still
assert on meaning (exit codes, JSON, a message's words), never on layout."""

from __future__ import annotations

import os

#: columns for rich: wider than any message or temporary path a test produces
WIDTH = 1000
_FORCING = ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERMINAL_WIDTH")


def plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FORCING}
    env.update({"COLUMNS": str(WIDTH), "NO_COLOR": "1"}, **extra)
    return env
