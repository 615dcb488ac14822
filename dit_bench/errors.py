"""The errors commands stop on, and the SIGTERM handler that raises one. Standard library only
at import: the command line catches them around every command, `report` (pandas and scipy,
no torch) included, and `dit_bench.config`, which imports torch, re-exports them."""

from __future__ import annotations


class OutOfMemory(MemoryError):
    """A run that does not fit the memory of its device; the message says what lowers it."""


# Errors whose message says what to fix (a bad value, a missing or broken file, a diverged
# run, a batch too large): commands print the message alone. Anything else is a bug, shown
# with its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, OutOfMemory)


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad key and what is allowed."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (`kill`, `timeout`, a preemption) raised as Ctrl-C is, so a command stops the
    same way (`raise_terminated`). Unlike Ctrl-C, which the terminal sends to every process of
    the command, it reaches one process: one with workers of its own passes it on."""


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler of the CLI and of the processes it starts."""
    raise Terminated
