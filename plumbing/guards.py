"""Guards of a training run: a non-finite loss, gradient or weight stops it before anything of it is
saved; a loss stuck where a collapsed model's sits is warned about (train.py's loop)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing.run_folder import latest_checkpoint
from plumbing.distributed import is_distributed, rank

log = logging.getLogger("nvembed.train")


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss, gradient norm or trainable weight: the run stops, saving nothing of it."""


# A model whose embeddings have all become the same (too high an lr, say) scores every candidate
# alike: its loss is the mean of ln(each query's candidates) whatever it is shown (loss.py's
# collapsed_loss, known positives and copies masked), and it learns nothing from then on.
COLLAPSE_STEPS = 10  # steps in a row at that loss before the warning
COLLAPSE_TOLERANCE = 0.01  # relative: a collapsed model's scores are equal up to rounding


def check_finite_weights(model):
    """Raise NonFiniteLossError if a trainable weight holds a NaN or inf. One host sync: run before
    a checkpoint or the model is saved, so nothing non-finite is ever written."""
    trainable = [p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
                 for p in model.parameters() if p.requires_grad]
    bad = torch.stack([~torch.isfinite(p.detach()).all() for p in trainable]).float()
    if is_distributed():  # a tensor is bad if any rank's shard of it is: counted once, not per rank
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.sum().item():
        raise NonFiniteLossError(f"{int(bad.sum().item())} trainable weight tensor(s) hold NaN or "
                                 "inf")


def non_finite_stop(config: dict, step: int, what: str) -> NonFiniteLossError:
    """The one line a non-finite value ends the run with: where, the flags that cause it most
    often, and what is left on disk to continue from."""
    out = Path(config["out"])
    last = latest_checkpoint(out)
    kept = "; the previous model/ is kept" if (out / "model").exists() else ""
    return NonFiniteLossError(
        f"step {step}: {what} (--lr {config['lr']:g}, --grad-clip {config['grad_clip']:g}); "
        f"nothing from this step is saved; last good checkpoint: {last or 'none'}{kept}")



class CollapseWatch:
    """Counts the steps in a row whose loss sits at the collapsed model's (each step's own, as
    duplicates change the candidates), and warns (rank 0, once per stretch) after COLLAPSE_STEPS."""

    def __init__(self, config: dict):
        self.config, self.steps = config, 0

    def see(self, step: int, loss: float, collapsed: float):
        at_collapse = abs(loss - collapsed) <= COLLAPSE_TOLERANCE * collapsed
        self.steps = self.steps + 1 if at_collapse else 0
        if self.steps == COLLAPSE_STEPS and rank() == 0:
            log.warning("warning: step %d: the loss has been a collapsed model's (the mean of "
                        "ln(candidates), now %.4f) for %d steps: the model scores every document "
                        "alike; a lower --lr (now %g) or --grad-clip (now %g) may avoid it", step,
                        collapsed, COLLAPSE_STEPS, self.config["lr"], self.config["grad_clip"])
