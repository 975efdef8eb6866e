"""How a command-line entry point reports bad input: one `error: ...` line on stderr and exit status 1.

launch.py and the experiment scripts run their work through `run_reporting_errors`, so a user's mistake (a bad
config value, a missing file, a damaged checkpoint) never ends in a traceback, while a programming error still does.
"""

from __future__ import annotations

import sys
from typing import Callable


# The exception types that mean "the input was wrong", by module. An exception of one of them can only have been
# raised if its module was imported, so only the imported ones are looked up: a bad config is then reported
# without importing the trainer, optax or orbax (launch.py validates the config before it imports them).
USER_ERRORS = {"toyjax.checkpoints": "CheckpointError", "toyjax.config": "ConfigError",
               "toyjax.data.text": "CorpusError", "toyjax.grammar": "GrammarError",
               "toyjax.sample": "SamplingError", "toyjax.train": "NonFiniteLossError"}


def user_errors() -> tuple[type[BaseException], ...]:
    """Returns the user-error types of the toyjax modules imported so far, and FileNotFoundError."""
    loaded = [getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS.items()]
    return (*[kind for kind in loaded if kind is not None], FileNotFoundError)


def one_line(message: object) -> str:
    """Returns a message on one line: its first line, then any further lines (e.g. a list) joined by '; '."""
    first, *rest = [line.strip() for line in str(message).splitlines() if line.strip()] or [""]
    return " ".join([first, "; ".join(rest)]) if rest else first


def run_reporting_errors(fn: Callable, *args) -> int:
    """Returns 0 after fn(*args), or 1 after printing `error: <message>` for a user error (others propagate)."""
    try:
        fn(*args)
    except user_errors() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0
