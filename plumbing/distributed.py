"""torchrun's process group in a few helpers: who am I, how many are we, print once.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them a run is a plain single process
and no process group exists at all, so every helper here also works without one.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs):
    """print on rank 0 only (every rank runs the same code)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def on_rank0_for_all(action) -> None:
    """Run `action()` on rank 0 alone, and let every rank act on its outcome (every_rank_agrees): a
    UserError it raises (a refused lock, an unwritable --out) stops all on the one mistake, rank 0
    saying it, none left in a collective to die with a traceback when rank 0 exits."""
    every_rank_agrees(lambda: action() if rank() == 0 else None)


def every_rank_agrees(action):
    """`action()` on every rank (reading the data, say), and its result; if it raised on any rank,
    every rank raises: that rank its own exception, the others one naming the rank and its host
    (a UserError for a user's mistake, so rank 0 says it in one line; a RuntimeError for a bug),
    none left in a later collective to hang or die with a traceback. The case it is for: a file on
    one node's disk only. `action` must run no collective itself."""
    import socket

    from plumbing.errors import UserError

    result, error = None, None
    try:
        result = action()
    except Exception as raised:  # noqa: BLE001 - re-raised below, after the others heard of it
        error = raised
    if is_distributed() and world_size() > 1:
        said = [None] * world_size()
        dist.all_gather_object(said, None if error is None else (
            isinstance(error, UserError), socket.gethostname(), str(error)))
        failed = [(r, *what) for r, what in enumerate(said) if what is not None]
        if error is None and failed:
            first, users_mistake, host, message = failed[0]
            others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            kind = UserError if users_mistake else RuntimeError
            error = kind(f"rank {first} on {host}{others}: {message}")
    if error is not None:
        raise error
    return result


def init_distributed(device: str | None = None) -> torch.device:
    """Start the process group if launched by torchrun; return this rank's device.

    nccl on GPU, gloo on CPU. Without torchrun's environment, nothing is initialised.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    launched = all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device)
    if launched and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 evaluates before and after training while the others wait in a barrier;
        # an hour leaves room for a real BEIR corpus.
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(hours=1))
    return device


def destroy_distributed():
    if is_distributed():
        dist.destroy_process_group()


def barrier():
    if is_distributed():
        dist.barrier()


def gather_rows_to_rank0(local: torch.Tensor | None, rows_per_rank: list[list[int]], total: int,
                         block: int = 16384):
    """Rank 0 gets a (total, D) CPU tensor whose row rows_per_rank[r][j] is rank r's local[j]; other
    ranks get None. local (n_r, D) float32 on the CPU, None where a rank has no rows; at least one
    rank has some. Every rank must call it. Gathered `block` rows per rank at a time, each block
    moved to the CPU before the next, so the GPU never holds the corpus (8.8M x 4096 floats would be
    144 GB)."""
    # nccl moves CUDA tensors only; gloo, CPU ones.
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    width = torch.tensor([local.shape[1] if local is not None else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # D, known to every rank with rows
    out = torch.empty(total, int(width)) if rank() == 0 else None
    for start in range(0, max(len(rows) for rows in rows_per_rank), block):
        # (block, D): gather wants equal shapes
        padded = torch.zeros(block, int(width), device=device)
        if local is not None and start < len(local):
            padded[:len(local[start:start + block])] = local[start:start + block].to(device)
        shares = [torch.empty_like(padded) for _ in rows_per_rank] if rank() == 0 else None
        dist.gather(padded, shares, dst=0)
        if rank() == 0:
            for rows, share in zip(rows_per_rank, shares):
                rows = rows[start:start + block]
                out[rows] = share[:len(rows)].cpu()
    return out


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (a broadcast), for decisions all ranks must take together."""
    if not is_distributed():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
