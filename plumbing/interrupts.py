"""Interrupted cleanly: Ctrl-C (SIGINT) and SIGTERM (a scheduler's, `kill`) during train.py.

`stops_cleanly` wraps the command. On either signal the running code is stopped (the handler
raises `Interrupted`): a checkpoint or model being written is abandoned (`written_whole` removes
its .tmp, and whatever .tmp is left in the run folder is swept), the one line

    train.py: interrupted at step N; continue with --resume (last checkpoint: PATH, step M)

is printed on stderr (no traceback), the --out lock is released, and the exit status is the
shell's for a signal: 130 for SIGINT, 143 for SIGTERM. Renaming a complete folder into place
(`replace_folder`) is never cut in the middle: it runs under `deferred_signals`, and a signal
arriving then stops the run right after it.

Under torchrun every rank gets the signal (the terminal's process group, or torchrun's SIGTERM);
each stops alike, and rank 0 alone says the line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from plumbing import runlock

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by the signal handler: a BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state = {"deferring": 0, "pending": None, "step": None}


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


def _sweep(out: Path) -> None:
    """Remove the temporary folders an interrupted save may have left (the lock makes them ours)."""
    for path in [out / "model.tmp", *(out / "checkpoints").glob("*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)


def _where_to_resume(out: Path) -> str:
    from plumbing.checkpoints import checkpoint_folder, checkpoint_problem

    found = sorted((p for p in checkpoint_folder(out).glob("step_*") if p.name[len("step_"):].isdigit()),
                   key=lambda p: int(p.name[len("step_"):]), reverse=True)
    last = next((p for p in found if checkpoint_problem(p) is None), None)
    if last is None:
        return f"no checkpoint was saved in {out}, so --resume has nothing to continue: start again with --overwrite"
    return f"continue with --resume (last checkpoint: {last}, step {int(last.name[len('step_'):])})"


def stops_cleanly(main):
    """Wraps train.py's main(): the signal handlers for its duration, the one line and the exit status
    on an interruption, and the --out lock released however it ends."""

    @functools.wraps(main)
    def main_stopping_cleanly(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
        previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS} if in_main_thread else {}
        _state.update(deferring=0, pending=None, step=None)
        try:
            return main(*args, **kwargs)
        except Interrupted as interruption:
            for signum in previous:  # a second Ctrl-C does not cut the clean-up short
                signal.signal(signum, signal.SIG_IGN)
            held = runlock.held_folder()
            if os.environ.get("RANK", "0") == "0":
                if held is not None:
                    _sweep(held)
                step = _state["step"]() if _state["step"] else None
                at = f" at step {step}" if step is not None else " before training started"
                where = f"; {_where_to_resume(held)}" if held is not None else ""
                sys.stdout.flush()
                print(f"{Path(sys.argv[0]).name}: interrupted{at} ({interruption}){where}", file=sys.stderr,
                      flush=True)
            raise SystemExit(128 + interruption.signum) from None
        finally:
            runlock.release_run_lock()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _state.update(deferring=0, pending=None, step=None)

    return main_stopping_cleanly
