"""The evaluations of a training run: before training, every --eval-every steps and after, each
printed and logged in the run folder's log.jsonl (train.py calls `run_evaluation`)."""

from __future__ import annotations

from pathlib import Path

from torch.distributed.fsdp import FSDPModule

import evaluate
from plumbing.distributed import barrier, print0, rank
from plumbing.run_folder import append_log


def run_evaluation(model, config: dict, evaluation, when: str, step: int,
                   lockstep: bool) -> float | None:
    """nDCG@10 of `model` on `evaluation` (BEIR's way: evaluate.run_evaluation, every rank encoding
    a share), logged as `when` (before, during or after training) at `step`; returned on rank 0."""
    if evaluation is None:
        return None
    corpus, queries, qrels, instruction = evaluation
    metrics, _ = evaluate.run_evaluation(model, corpus, queries, qrels, instruction, top_k=100,
                                         batch_size=config["eval_batch_size"],
                                         k_values=(1, 10, 100), lockstep=lockstep)
    # FSDP2 keeps the root's weights gathered after a forward with no backward: shard them again.
    if lockstep:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    barrier()  # the other ranks wait while rank 0 searches
    if rank() != 0:
        return None
    moment = f"at step {step}" if when == "during" else f"{when} training"
    print0(f"eval {moment}: nDCG@10 {metrics['NDCG@10']:.4f}  "
           f"Recall@10 {metrics['Recall@10']:.4f}  MRR@10 {metrics['MRR@10']:.4f}")
    append_log(Path(config["out"]), {"event": "eval", "when": when, "step": step, **metrics})
    return metrics["NDCG@10"]
