"""The user's mistakes, told apart from bugs: what every command prints for them.

A `UserError` is a mistake in what a user gave a command (a file, a flag, a checkpoint), not
in the code. Its message names the culprit: the file and line, the field, or the flag. A
command stops on one as argparse stops on a bad flag: one line `<command>: error: <message>`
on stderr and exit status 2, no traceback (`exits_on_user_error`, every command uses it).
Any other exception is a bug and keeps its traceback.

Under torchrun every rank meets the same mistake, or hears of it from the rank that met it alone
(distributed.every_rank_agrees, on_rank0_for_all); rank 0 alone says it (the usage of a bad flag
too: `ArgumentParser`), and exits first (`stop_on_user_error`). torchrun then prints its own
report of the failed ranks after our line and exits with status 1, whatever status ours had.

Notices (texts cut at max_length, records skipped) are logged as warnings under the logger
"nvembed", so a library user routes or silences them with `logging`; the commands print them on
stderr, `--quiet` hides them (`add_verbosity_flags`, `configure_logging`). Progress bars and results
stay on the console.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time


class UserError(Exception):
    """A mistake in a command's input; the subclasses say what is at fault."""


class DataError(UserError, ValueError):
    """Bad input; the message names the file and line (or the row / field) at fault."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that the user named, or that must be in one, does not exist."""


class UsageError(UserError, ValueError):
    """A flag's value that cannot work, alone or with the others (the message names the flags)."""


class DiskFullError(UserError, OSError):
    """The disk filled while a model or checkpoint was written; names the path (what was there is
    kept)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or holds a model this project does not implement; names its
    file."""


class MissingExtraError(UserError, ImportError):
    """An optional package a command needs for what it was asked (an extra of pyproject.toml)."""


def require(module: str, extra: str, needed_for: str):
    """`import module`, or a MissingExtraError naming what needs it and the install line: the
    default job never imports gguf, accelerate or bm25s, so they are extras, not requirements."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{needed_for} needs the {module} package: pip install -e "
                                f"'.[{extra}]'") from None


def on_rank0() -> bool:
    """Whether this process is rank 0 of torchrun's ranks, or runs alone. Read from torchrun's
    environment, so that it holds before the process group is up (a bad flag is found before
    that)."""
    return os.environ.get("RANK", "0") == "0"


# How long a rank other than 0 waits before it stops on a user's mistake under torchrun (see
# stop_on_user_error).
RANK0_FIRST_S = 10.0


def let_rank0_stop_first() -> bool:
    """Under torchrun, wait a little on ranks other than 0 before stopping on a user's mistake.
    torchrun ends every rank (SIGTERM) as soon as one exits with a failure and names that one the
    root cause: a rank 1 that stopped first could cut rank 0 off before it printed the mistake, and
    would be blamed for it. Waiting lets rank 0 say it and exit first. Returns whether this rank
    waited and is still alive: then rank 0 did not stop on the mistake, and this rank must say it.
    Spawned ranks without torchrun (the tests) do not wait."""
    if on_rank0() or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    time.sleep(RANK0_FIRST_S)
    return True


def stop_on_user_error(command: str, error: UserError):
    """End the command on a user's mistake: `<command>: error: <error>` on stderr (rank 0 only),
    exit status 2."""
    if on_rank0() or let_rank0_stop_first():
        sys.stdout.flush()
        where = "" if on_rank0() else f"(rank {os.environ['RANK']}) "
        print(f"{command}: error: {where}{error}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def exits_on_user_error(main):
    """Wraps a command's main(): a UserError ends it as argparse's `parser.error` does, with the one
    line `<command>: error: <message>` on stderr and exit status 2. Other exceptions pass through
    untouched."""

    @functools.wraps(main)
    def main_ending_user_errors(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            # argparse's name for the command (parser.prog), so both kinds of error read alike.
            stop_on_user_error(os.path.basename(sys.argv[0]), error)

    return main_ending_user_errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the commands torchrun starts: on ranks other than 0 it prints nothing
    (usage, error, --help), so that a bad flag is said once, and it stops after rank 0
    (`let_rank0_stop_first`)."""

    def print_usage(self, file=None):
        if on_rank0():
            super().print_usage(file)

    def print_help(self, file=None):
        if on_rank0():
            super().print_help(file)

    def exit(self, status=0, message=None):
        if not on_rank0() and not (status and let_rank0_stop_first()):
            message = None
        super().exit(status, message)


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """--quiet / --verbose, read by `configure_logging(args.log_level)`."""
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", dest="log_level", action="store_const", const=logging.ERROR,
                           default=logging.INFO,
                           help="no notices (texts truncated, records skipped), only errors")
    verbosity.add_argument("--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                           help="debug messages too")


def configure_logging(level: int) -> None:
    """Print the "nvembed" logger's records at `level` and above on stderr: a fresh handler per
    command run, so that it writes to the sys.stderr of the moment (pytest swaps it). The level is
    the handler's: records still reach the root logger's handlers (a caller's logging setup,
    pytest's caplog) whatever a previous --quiet run asked."""
    logger = logging.getLogger("nvembed")
    for handler in [h for h in logger.handlers if getattr(h, "nvembed_command", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    handler.nvembed_command = True
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.INFO))
