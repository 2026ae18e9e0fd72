"""A folder written whole or not at all: it is written under NAME.tmp, flushed to disk, and renamed
over NAME only then. Whatever fails on the way (a full disk, Ctrl-C) leaves NAME as it was. Model
folders (model_folders.py, released.py) and training checkpoints (run_folder.py) are written so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from plumbing.distributed import rank
from plumbing.errors import DiskFullError
from plumbing.interrupts import deferred_signals


@contextlib.contextmanager
def written_whole(temporary: Path, final: Path):
    """Around the writing of `temporary`: on any failure it is removed (on rank 0), and a full disk
    is said as such (DiskFullError) instead of the writer's own words (torch's zip writer says
    "unexpected pos 704 vs 598")."""
    try:
        yield
    except BaseException as error:
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        if _disk_full(error):
            kept = f"; the previous {final} is kept" if final.exists() else ""
            free = shutil.disk_usage(final.parent if final.parent.exists() else ".").free
            raise DiskFullError(f"{final}: no space left on device while writing it "
                                f"({free / 2**20:,.0f} MiB free; the partial {temporary.name} was "
                                f"removed{kept})") from error
        raise


def _disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or the message of a writer that swallowed it (torch's zip
    writer, dcp's wrapped exceptions from the ranks)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(words in str(error) for words in ("No space left on device", "unexpected pos",
                                                  "file write failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(temporary: Path, final: Path):
    """Rename the complete `temporary` over `final`. Its files are flushed to disk first (a rename
    that reaches the disk before the data would leave a complete-looking folder of empty files after
    a power cut); an older `final` is renamed aside, then deleted only once the new one is in
    place."""
    for path in temporary.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(temporary)
    old = final.with_name(final.name + ".old")
    with deferred_signals():  # Ctrl-C or SIGTERM here: acted on once the new folder is in place
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(temporary, final)
        _fsync(final.parent)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)
