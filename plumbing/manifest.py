"""A checkpoint's manifest, step_N/manifest.json: every file's size and content hash at save time.

    {"__0_0.distcp": {"size": 123456, "blake2b": "9f2c..."}, ".metadata": {...}, ...}

Two checks read it (plumbing/run_folder.py):
- `size_problem`, cheap (a stat per file): a shard cut short or lost. Every search for the newest
  checkpoint asks it (--resume, the interruption line, the non-finite stop).
- `content_problem`, a read of every byte: a shard of the right size whose bytes changed (a disk
  or copy fault). --resume asks it of the checkpoint it is about to load, and passes over one that
  fails, naming the file.

The hash is BLAKE2b (hashlib; 128-bit digests), read in 1 MiB chunks: 0.31 GB/s on one busy core
of the shared 2-core CPU machine, 10 ms of a tiny-model checkpoint's 263 ms save (2.5 MB). Under
torchrun each rank hashes the shards it wrote (dcp names them __RANK_N.distcp), and verifies the
same share, so a save or a check costs one rank's share of the bytes, not all of them on rank 0.
A manifest of older runs holds sizes alone ({"name": size}): it is size-checked only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from plumbing.distributed import is_distributed, rank, world_size

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def file_hash(path: Path) -> str:
    """BLAKE2b (16-byte digest, hex) of the file's contents, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _owner(name: str, ranks: int) -> int:
    """The rank that hashes (and verifies) the file `name`: dcp's __RANK_N.distcp its writer's,
    the rest (.metadata, trainer_state.json) rank 0's."""
    parts = name.split("_")
    if name.startswith("__") and len(parts) > 3 and parts[2].isdigit():
        return int(parts[2]) % ranks
    return 0


def _gathered(mine: dict) -> dict:
    """Every rank's dict merged (a collective under torchrun)."""
    if not is_distributed():
        return mine
    every = [None] * world_size()
    dist.all_gather_object(every, mine)
    return {key: value for part in every for key, value in part.items()}


def write_manifest(folder: Path) -> None:
    """Every rank: hash its share of `folder`'s files; rank 0 writes the manifest (last, so that a
    folder with one was saved whole). Call after all of the folder's files are written."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {str(p.relative_to(folder)): dict(size=p.stat().st_size, blake2b=file_hash(p))
            for p in files if _owner(p.name, world_size()) == rank()}
    entries = _gathered(mine)
    if rank() == 0:
        entries = dict(sorted(entries.items()))
        (folder / MANIFEST).write_text(json.dumps(entries, indent=1) + "\n")


def read_manifest(folder: Path) -> dict:
    """{name: {"size": n, "blake2b": hex or None}}; OSError or ValueError if unreadable."""
    entries = json.loads((folder / MANIFEST).read_text())
    return {name: entry if isinstance(entry, dict) else dict(size=entry, blake2b=None)
            for name, entry in entries.items()}


def size_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, or None when its files are all there at
    the sizes they were saved with and its trainer_state.json reads."""
    try:
        entries = read_manifest(folder)
    except (OSError, ValueError, TypeError) as error:
        return f"{folder / MANIFEST} is unreadable ({error})"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{path} has {path.stat().st_size} bytes, {entry['size']} when saved"
    try:
        json.loads((folder / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError) as error:
        return f"{folder / 'trainer_state.json'} is unreadable ({error})"
    return None


def content_problem(folder: Path) -> str | None:
    """Whether `folder`'s files hold the bytes they were saved with: None, or the first that does
    not. Every rank verifies its share and all learn the answer (a collective under torchrun), so
    that they pass over the same checkpoint."""
    entries = read_manifest(folder)  # size_problem has read it
    mine = {}
    for name, entry in entries.items():
        if entry["blake2b"] and _owner(Path(name).name, world_size()) == rank():
            if file_hash(folder / name) != entry["blake2b"]:
                mine[name] = (f"{folder / name} does not hold the bytes it was saved with (its "
                              "checksum differs)")
    problems = _gathered(mine)
    return problems[min(problems)] if problems else None
