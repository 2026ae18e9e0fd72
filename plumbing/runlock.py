"""One run per --out at a time: the run folder's lock file.

Two train.py runs with the same --out would interleave log.jsonl and trip over each other's
temporary files. So rank 0 takes out/train.lock before it touches anything in the folder (before
--overwrite sets the old run aside, before --resume cuts the log back), and holds it until the
command ends. The file says who holds it, as JSON: {"pid": ..., "host": ...}.

- While the process it names lives (on this host; another host's process is taken to live, as
  nothing here can tell), another run is refused with one line:
  `--out X is in use by process PID (lock file X/train.lock)`.
- A lock left by a process that is gone (killed, its machine rebooted) is taken over with a
  notice.
- Two runs starting at the same moment cannot both take it: the file is also flock()ed, which
  the kernel releases when its process dies, and a taker checks that the file it locked is still
  the one at the path (a holder that finished removes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from plumbing.distributed import print0
from plumbing.errors import UsageError

LOCK_FILE = "train.lock"

_held: dict = {}  # the lock this process holds: {"path": Path, "fd": int}


def _alive(holder: dict) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: nothing here can tell; the user can
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def _holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
        int(holder["pid"])
        return holder
    except (ValueError, TypeError, KeyError):
        return None  # empty (a taker between open and write) or not ours


def _refuse(out: Path, lock: Path, holder: dict | None):
    who = f"process {holder['pid']}" if holder else "another process"
    if holder and holder.get("host") not in (None, socket.gethostname()):
        who += f" on host {holder['host']}"
    raise UsageError(f"--out {out} is in use by {who} (lock file {lock})")


def take_run_lock(out: str | os.PathLike) -> Path:
    """Take out/train.lock for this process (the folder exists), or refuse in one line
    (UsageError) while another live process holds it."""
    out = Path(out)
    lock = out / LOCK_FILE
    if _held.get("path") == lock:
        return lock
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process this very moment
            holder = _holder(os.read(fd, 4096).decode(errors="replace"))
            os.close(fd)
            _refuse(out, lock, holder)
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder finished and removed it between our open and flock
            os.close(fd)
            continue
        holder = _holder(os.read(fd, 4096).decode(errors="replace"))
        if holder is not None and _alive(holder):
            os.close(fd)
            _refuse(out, lock, holder)
        if holder is not None:
            print0(f"notice: --out {out}: taking over the lock of process {holder['pid']}, which is no "
                   f"longer running (lock file {lock})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
        os.fsync(fd)
        _held.update(path=lock, fd=fd)
        return lock


def held_folder() -> Path | None:
    """The run folder whose lock this process holds."""
    return _held["path"].parent if _held else None


def release_run_lock():
    """Remove and release the lock this process holds, if any (at the command's end, however it ends)."""
    if not _held:
        return
    lock, fd = _held.pop("path"), _held.pop("fd")
    try:
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            lock.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
