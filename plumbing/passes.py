"""How a training step runs its texts through the model, in passes (train.py's step calls these):
long documents sorted by length and run in passes of similar lengths (`embed_documents`), and
GradCache's chunks (`text_chunks`) with the random state each chunk's second pass replays
(`RandomState`, `check_replay`). Each gives the embeddings the plain padded batch gives, for less
padding or less memory. Tests: tests/test_train.py (the sorted passes), tests/test_grad_cache.py.
"""

from __future__ import annotations

import contextlib

import torch

from plumbing.distributed import is_distributed


# Documents of this many tokens or more are sorted by length and run in passes of similar lengths
# (`length_chunks`): shorter ones waste little on padding (SciFact: 97-99% real tokens at 64-128,
# 92% at 256, 62% at 512), and one pass keeps the dropout masks GradCache replays for them. A pass
# costs about as much as PASS_COST_SLOTS padded token slots more (bench/quick_step.py --baseline).
SORT_FROM_LENGTH = 256
PASS_COST_SLOTS = 512


def embed_documents(model, documents: dict) -> torch.Tensor:
    """model(documents), (rows, D), for a right-padded batch; long ones (SORT_FROM_LENGTH) sorted by
    length and embedded in the passes `length_chunks` picks, each cut to its longest row: each
    row's embedding is the one the padded batch gives (the same masks and positions), for less
    padding. Under torchrun one pass: every rank must run as many forwards as the others (FSDP
    gathers the weights in each)."""
    if is_distributed() or documents["input_ids"].shape[1] < SORT_FROM_LENGTH:
        return model(documents)
    lengths = documents["attention_mask"].sum(1)  # (rows,)
    order = torch.argsort(lengths, descending=True, stable=True)  # (rows,): longest first
    passes = length_chunks(lengths[order].tolist(), PASS_COST_SLOTS)
    if len(passes) == 1:
        return model(documents)
    ordered = {key: value[order] for key, value in documents.items()}
    embeddings = [model({key: value[start:end, :int(lengths[order[start]])]
                         for key, value in ordered.items()}) for start, end in passes]
    return torch.cat(embeddings)[torch.argsort(order)]  # (rows, D), back in the batch's order


def length_chunks(lengths: list[int], pass_cost: float) -> list[tuple[int, int]]:
    """Row ranges [start, end) of `lengths` (longest first) that minimise the padded token slots
    (rows x the range's longest row) plus `pass_cost` per range: dynamic programming over the
    range ends, at most ~64 candidate ends (a step of rows // 64)."""
    step = max(1, len(lengths) // 64)
    ends = sorted(set(range(step, len(lengths), step)) | {len(lengths)}) if lengths else []
    best = {0: (0.0, None)}  # end -> (cost of rows [0, end), the previous end)
    for end in ends:
        best[end] = min((cost + (end - start) * lengths[start] + pass_cost, start)
                        for start, (cost, _) in best.items())
    cuts, end = [], len(lengths)
    while end:
        cuts.append((best[end][1], end))
        end = best[end][1]
    return cuts[::-1]


def text_chunks(inputs: dict, chunk_size: int) -> list[dict]:
    """Rows [i, i + chunk_size) of a right-padded tokenized batch, each cut to its own longest
    row."""
    chunks = []
    for start in range(0, inputs["input_ids"].shape[0], chunk_size):
        rows = {key: value[start:start + chunk_size] for key, value in inputs.items()}
        width = int(rows["attention_mask"].sum(1).max())
        chunks.append({key: value[:, :width] for key, value in rows.items()})
    return chunks


class RandomState:
    """The CPU (and this GPU's) random state as a chunk is first embedded, to replay when it is
    embedded again: dropout (LoRA's) then draws the same masks, so the graph computes the embeddings
    the loss saw."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        # fork_rng restores the state on exit: the random stream goes on from where the first pass
        # left it.
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def check_replay(again: torch.Tensor, first: torch.Tensor, chunk: int):
    """The second pass must compute what the loss was taken at: a random draw that is not replayed
    (dropout outside torch's generators, say) would silently give another model's gradients."""
    # Same kernels on the same inputs agree to the last bit or nearly (a bf16 rounding step, ~4e-3
    # relative, should another kernel run); a different dropout mask moves embeddings by ~1e-1 of
    # their size, except LoRA's at initialisation (B = 0: no embedding moves, only B's gradient
    # would be wrong). The bound lies between the two.
    error = (again.detach() - first.detach()).abs().max().item()
    if error > 2e-2 * max(first.detach().abs().max().item(), 1e-6):
        raise RuntimeError(f"GradCache: chunk {chunk} embedded differently the second time (max "
                           f"difference {error:.2e}): something random in the forward is not "
                           "replayed by RandomState")
