"""Interrupted cleanly: Ctrl-C (SIGINT) and SIGTERM (a scheduler's, `kill`) during train.py.

`stops_cleanly` wraps the command. On either signal the running code is stopped (the handler
raises `Interrupted`): a checkpoint or model being written is abandoned (`written_whole` removes
its .tmp), the one line

    train.py: interrupted at step N; continue with --resume (last checkpoint: PATH, step M)

is printed on stderr (no traceback), and the exit status is the shell's for a signal: 130 for
SIGINT, 143 for SIGTERM. Renaming a complete folder into place (`replace_folder`) is never cut
in the middle: it runs under `deferred_signals`, and a signal arriving then stops the run right
after it.

This module knows signals only. What the run folder does is handed over by the run folder
(run_folder.py, when it takes its lock): `on_interruption` (sweep the .tmp folders, and the
line's "continue with --resume ..." ending) and `at_end` (release the lock, however the command
ends).

Under torchrun every rank gets the signal (the terminal's process group, or torchrun's SIGTERM);
each stops alike, and rank 0 alone says the line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by the signal handler: a BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Reset each time the command starts and ends. "step": the run's step, for the line;
# "say_where": the line's ending (`on_interruption`); "at_end": clean-ups (`at_end`).
_state = {"deferring": 0, "pending": None, "step": None, "say_where": None, "at_end": []}


def _on_signal(signum, frame):
    if _state["deferring"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_signals():
    """A section no signal cuts short (renames that swap a folder into place): one arriving is
    acted on at the section's end."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        if not _state["deferring"] and _state["pending"] is not None:
            pending, _state["pending"] = _state["pending"], None
            raise Interrupted(pending)


def watch(run) -> None:
    """Name the run whose step the interruption line reports (its `.step`)."""
    _state["step"] = lambda: run.step


def on_interruption(say_where: Callable[[], str]) -> None:
    """On an interruption, rank 0 calls `say_where()` once: it cleans up and returns the line's
    ending (the run folder's: where --resume continues)."""
    _state["say_where"] = say_where


def at_end(cleanup: Callable[[], None]) -> None:
    """`cleanup()` once the command that `stops_cleanly` wraps ends, however it ends."""
    if cleanup not in _state["at_end"]:
        _state["at_end"].append(cleanup)


def stops_cleanly(main):
    """Wraps train.py's main(): the signal handlers for its duration, the one line and the exit
    status on an interruption, and the `at_end` clean-ups (the --out lock) however it ends."""

    @functools.wraps(main)
    def main_stopping_cleanly(*args, **kwargs):
        # where handlers can be set
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = ({signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
                    if in_main_thread else {})
        _state.update(deferring=0, pending=None, step=None, say_where=None, at_end=[])
        try:
            return main(*args, **kwargs)
        except Interrupted as interruption:
            for signum in previous:  # a second Ctrl-C does not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            if os.environ.get("RANK", "0") == "0":
                step = _state["step"]() if _state["step"] else None
                at = f" at step {step}" if step is not None else " before training started"
                where = f"; {_state['say_where']()}" if _state["say_where"] else ""
                sys.stdout.flush()
                print(f"{Path(sys.argv[0]).name}: interrupted{at} ({interruption}){where}",
                      file=sys.stderr, flush=True)
            raise SystemExit(128 + interruption.signum) from None
        finally:
            for cleanup in _state["at_end"]:
                cleanup()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _state.update(deferring=0, pending=None, step=None, say_where=None, at_end=[])

    return main_stopping_cleanly
