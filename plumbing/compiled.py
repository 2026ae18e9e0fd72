"""torch.compile plumbing: compile one module's forward in place, and count what was compiled (the
commands log it).

`compile_forward` replaces `module.forward` by its compiled version, as an instance attribute. The
module's `__call__` (and so FSDP2's hooks, which `fully_shard` adds after it) stays eager around the
compiled body, and parameter names do not change (torch.compile(module) would wrap it and prefix
every name with `_orig_mod.`).

Dynamic shapes (`dynamic=True`): every input dimension is symbolic from the first call, so a batch
of another length or another number of rows reuses the graph; only sizes 0 and 1 are specialised (a
one-text batch or a one-token text compiles once more). What does recompile is a change the graph's
guards see: gradients on or off (training against `encode`), a padding mask present or None
(model.Mistral passes None for a batch without padding), causal or not. All decoder layers run the
same code on same-shaped weights, so they share each graph.

Dynamo keeps those graphs per code object (DecoderLayer.forward) for the whole process, for every
model compiled in it, and past `torch._dynamo.config.recompile_limit` graphs (8 by default) it stops
compiling that code and runs it eagerly, with only a warning. A process that compiles several models
(LoRA and not, causal and not, training and encoding: bench/gpu_step.py, an ablation) would reach 8,
so `compile_forward` raises the limit to RECOMPILE_LIMIT; `compile_counts` reports
`recompile_limit_hits`, which must stay 0 for "compiled" to be true.
"""

from __future__ import annotations

import torch
import torch.nn as nn


RECOMPILE_LIMIT = 64


def compile_forward(module: nn.Module, dynamic: bool = True,
                    backend: str = "inductor") -> nn.Module:
    """Compile `module.forward` in place (see the module docstring); returns the module."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    module.forward = torch.compile(module.forward, dynamic=dynamic, backend=backend)
    return module


def compile_counts() -> dict:
    """What torch.compile has done in this process so far: graphs compiled (every recompilation is
    one more), frames compiled and graph breaks. Logged by train.py each log line and by evaluate.py
    after encoding."""
    from torch._dynamo.utils import counters  # 3-4 s to import: not for a run that compiles nothing

    limit_hits = sum(n for reason, n in counters["unimplemented"].items()
                     if "recompile limit exceeded" in reason)
    return dict(graphs=counters["stats"]["unique_graphs"], frames=counters["frames"]["ok"],
                graph_breaks=sum(counters["graph_break"].values()), recompile_limit_hits=limit_hits)
