"""Two-stage contrastive instruction tuning of NV-Embed (PAPER.md section 4, paper section 3.3), one
CPU or many GPUs (FSDP2). Stage 1: retrieval data, in-batch plus curated hard negatives. Stage 2:
from stage 1, retrieval blended with classification, clustering and STS, in-batch negatives off
(items of one class are no negatives).

    torchrun --nproc_per_node=2 train.py --stage 1    # the tiny default job -> runs/stage1/model
    torchrun --nproc_per_node=2 train.py --stage 2    # continues from runs/stage1
    torchrun --nproc_per_node=8 train.py --stage 1 --model /ckpt/Mistral-7B-v0.1 --data t/*.jsonl
    python train.py --stage 1 --model SmolLM2-135M.gguf --recipe quick --data t.jsonl   # a CPU

No flags: a tiny random Mistral, the byte tokenizer and the built-in data, printing nDCG@10 before
and after. Flags left out take a recipe's values (`RECIPES`: tiny, the paper's with --model, or
--recipe's); `python train.py` is one process, no group. Reading order: `RECIPES` and `configure`
(every difference between the stages), loss.py's `contrastive_loss` (InfoNCE with cross-rank
negatives), then here `build_model` and `parallelize` (FSDP2), the step
(`forward_backward`, and `forward_backward_cached`: GradCache, the paper's batch in one softmax on
few GPUs), `train_step`, and the loop (`setup`, `loop`, `finish`). The run folder (--out:
config.json, log.jsonl, checkpoints/step_N, model/) is written by plumbing/run_folder.py; --resume
continues exactly where the last checkpoint stopped. MFU and the log line: plumbing/mfu.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lora import apply_lora, lora_config, mark_only_lora_trainable
from loss import collapsed_loss, contrastive_loss
from plumbing import tracking
from plumbing.run_folder import (discard_previous_run, logged_eval, logged_ndcg, open_run, resume,
                                 save_checkpoint)
from plumbing.distributed import (barrier, destroy_distributed, every_rank_agrees, init_distributed,
                                  is_distributed, print0, rank, rank0_decides, world_size)
from plumbing.errors import exits_on_user_error, let_rank0_stop_first
from plumbing.guards import CollapseWatch, NonFiniteLossError, check_finite_weights, non_finite_stop
from plumbing.interrupts import stops_cleanly, watch
from plumbing.loading import build_on_rank0, from_base, load_any, load_from_rank0
from plumbing.mfu import StepLog, describe, model_shape, step_flops
from plumbing.passes import RandomState, check_replay, embed_documents, text_chunks
from plumbing.sampler import BatchSampler, rank_slice
from plumbing.train_eval import run_evaluation
from plumbing.train_cli import (build_parser, check_max_length, default_recipe, evaluation_set,
                                 query_prompt, resolve_config, training_data)

# ----------------------------------------------------------------------------
# The recipes and the two stages (PAPER.md section 4)

# A recipe gives each flag left out its value; stage1 / stage2 hold what differs between the stages.
# paper: a real decoder on GPUs, the values commonly quoted from the appendix (temperature from
# NV-Retriever). tiny: the tiny preset on the built-in data, under 3 minutes on a 2-core CPU; its
# decoder starts from random weights, so all of it trains (LoRA would adapt a random matrix).
# quick: any --model on a CPU in minutes, bench/ablate.py's quick setting (a SmolLM2-135M row,
# trained and evaluated: 8.4 min on 2 cores); its stage 2 repeats stage 1's, not measured apart.
RECIPES = {
    "paper": dict(stage1=dict(lr=2e-5, steps=20000), stage2=dict(lr=1.5e-5, steps=18000),
                  batch_size=128, hard_negatives=7, warmup_steps=500, max_length=512,
                  temperature=0.01, lora_rank=16, num_latents=512, latent_head_dim=None,
                  log_every=10, save_every=1000),
    "tiny": dict(stage1=dict(lr=3e-3, steps=200), stage2=dict(lr=1.5e-3, steps=100),
                 batch_size=32, hard_negatives=7, warmup_steps=20, max_length=192,
                 temperature=0.01, lora_rank=0, num_latents=32, latent_head_dim=8,
                 log_every=20, save_every=100),
    "quick": dict(stage1=dict(lr=3e-4, steps=30), stage2=dict(lr=3e-4, steps=30),
                  batch_size=8, hard_negatives=3, warmup_steps=3, max_length=64,
                  temperature=0.01, lora_rank=16, num_latents=64, latent_head_dim=None,
                  log_every=5, save_every=10),
}
STAGE1_OUT = "runs/stage1"  # where stage 1 saves by default, and stage 2 starts from


def configure(argv: list[str] | None = None) -> dict:
    """The run's configuration from the command line: plumbing/train_cli.py parses and checks the
    flags; here, the stage rules and the recipe's value for each flag left out."""
    args = build_parser(RECIPES).parse_args(argv)
    stage = args.stage
    if stage == 2 and args.init_from is None and args.model is None:
        args.init_from = STAGE1_OUT  # stage 2 starts from stage 1's model
    # In-batch negatives in stage 1 only: in stage 2's classification, clustering and STS data,
    # another item of the batch may share the query's class (retrieval only: data.TrainDataset).
    if args.in_batch_negatives is None:
        args.in_batch_negatives = stage == 1
    args.out = args.out or f"runs/stage{stage}"
    recipe = args.recipe or default_recipe(args)  # tiny for the tiny preset, else paper
    shared = {key: value for key, value in RECIPES[recipe].items() if not key.startswith("stage")}
    return resolve_config(args, recipe, shared | RECIPES[recipe][f"stage{stage}"])


# ----------------------------------------------------------------------------
# Model, parallelism, schedule


def build_model(config: dict):
    """A fresh NVEmbed on the base decoder, or the stage-1 model (`init_from`), set up to train."""
    if config["init_from"]:
        # What trains is loaded in fp32, exactly as stage 1 saved it (a trip through bf16
        # would round it): the adapters and the pooling, or the whole model without LoRA.
        # Only a frozen base takes --model-dtype.
        frozen_dtype = _dtype(config["model_dtype"]) if config["lora_rank"] > 0 else torch.float32
        # A run folder, its model/, or a released NV-Embed folder.
        model = load_any(config["init_from"], dtype=frozen_dtype, trainable_dtype=torch.float32)
    else:
        model = from_base(config["model"], pooling=config["pooling"], causal=config["causal"],
                          max_length=config["max_length"], dtype=_dtype(config["model_dtype"]),
                          seed=config["seed"], pooling_kwargs=config["pooling_kwargs"])
    model.max_length = config["max_length"]
    model.name = config["name"]  # --name, or --out's folder's
    if lora_config(model.decoder) is None and config["lora_rank"] > 0:
        torch.manual_seed(config["seed"])  # the adapters' init, reproducible from the seed
        apply_lora(model.decoder, rank=config["lora_rank"], alpha=config["lora_alpha"],
                   dropout=config["lora_dropout"])
    # With LoRA (PAPER.md section 4) only the adapters and the pooling train; a stage-1 model's
    # adapters keep training.
    if lora_config(model.decoder) is not None:
        mark_only_lora_trainable(model.decoder)
        for param in model.pooling.parameters():
            param.requires_grad = True
    else:
        for param in model.parameters():
            param.requires_grad = True
    # Trainable parameters are fp32 for AdamW even over a bf16 base (FSDP or autocast casts them).
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model.train()


def parallelize(model, device: torch.device, activation_checkpointing: bool = False,
                compute_dtype: str = "bf16", compile: bool = False):
    """FSDP2 (torchtitan-style): shard each decoder layer, then the pooling, then the root. Without
    a process group: only moved."""
    model.decoder.activation_checkpointing = activation_checkpointing  # recompute in backward
    if compile:  # each layer and the pooling first (torchtitan's order): FSDP's hooks stay eager
        model.compile()
    if not is_distributed():
        return model.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    # On GPU: compute in bf16, reduce gradients in fp32 (the master shards stay fp32). On CPU,
    # autocast does the casting.
    bf16 = device.type == "cuda" and compute_dtype == "bf16"
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # Each group is gathered just before its forward and freed after it: one layer is whole at a
    # time.
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    if any(True for _ in model.pooling.parameters()):  # mean and eos pooling have no parameters
        fully_shard(model.pooling, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)  # the rest: embeddings and the final norm
    return model


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "linear") -> float:
    """Linear warm-up from 0 over `warmup_steps`, then linear (or cosine) decay to 0 at
    `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------
# The step: embed, InfoNCE over the global batch, backward


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "truncated"}


def forward_backward(model, batch: dict, temperature: float, loss_scale: float,
                     device: torch.device, autocast=None) -> tuple[torch.Tensor, int]:
    """Embed this rank's share of a micro-batch (data.collate's dict), compute the loss,
    backpropagate; returns the detached loss and the number of real (non-padding) tokens."""
    queries, documents = to_device(batch["queries"], device), to_device(batch["documents"], device)
    with autocast or contextlib.nullcontext():
        query_emb = model(queries)  # (B, D)
        doc_emb = embed_documents(model, documents)  # (B*(1+n), D)
    loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], temperature,
                            in_batch_negatives=batch["in_batch_negatives"],
                            known_positive_keys=batch["known_positive_keys"])
    (loss * loss_scale).backward()
    return loss.detach(), int(queries["attention_mask"].sum() + documents["attention_mask"].sum())


# ----------------------------------------------------------------------------
# GradCache (Gao et al. 2021): the whole global batch in one softmax, at the memory of `chunk_size`
# texts.


def forward_backward_cached(model, batch: dict, temperature: float, chunk_size: int,
                            device: torch.device, autocast=None) -> tuple[torch.Tensor, int]:
    """`forward_backward` in three passes, with the same loss and gradients
    (tests/test_grad_cache.py); only one chunk's activations are alive at a time, for one more
    forward."""
    queries, documents = to_device(batch["queries"], device), to_device(batch["documents"], device)
    query_chunks, doc_chunks = text_chunks(queries, chunk_size), text_chunks(documents, chunk_size)
    # 1. Embed this rank's queries and documents `chunk_size` texts at a time, without a graph.
    states, cached = [], []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for chunk in query_chunks + doc_chunks:
            states.append(RandomState(device))
            cached.append(model(chunk).detach().requires_grad_())  # (rows, D): gradient leaves
    query_emb = torch.cat(cached[:len(query_chunks)])  # (B, D)
    doc_emb = torch.cat(cached[len(query_chunks):])  # (B*G, D)
    # 2. The loss of the global batch on those embeddings (cross-rank negatives and all),
    # differentiated with respect to the embeddings only: (B + B*G, D) numbers, however large the
    # model.
    loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], temperature,
                            in_batch_negatives=batch["in_batch_negatives"],
                            known_positive_keys=batch["known_positive_keys"])
    loss.backward()  # fills each cached chunk's .grad (with ranks: GatherWithGradient's all_reduce)
    # 3. Embed each chunk again, with its graph and the random state of its first pass (the same
    # dropout masks), and backpropagate its slice of the embeddings' gradient into the parameters.
    # Under FSDP each chunk's forward gathers the layers again, and gradients are reduced once, in
    # the last chunk's backward: until then each rank accumulates the unsharded gradients of what
    # trains (LoRA's: a few MB; full fine-tuning of a 7B model: 28 GB of fp32 per GPU).
    for i, (chunk, state, first) in enumerate(zip(query_chunks + doc_chunks, states, cached)):
        if is_distributed():
            model.set_requires_gradient_sync(i == len(cached) - 1)  # reduce after the last one
        with state.replay(), autocast or contextlib.nullcontext():
            embeddings = model(chunk)  # (rows, D), with its graph
        check_replay(embeddings, first, i)
        embeddings.backward(first.grad)
    return loss.detach(), int(queries["attention_mask"].sum() + documents["attention_mask"].sum())


# ----------------------------------------------------------------------------
# The loop: setup, steps, finish


@dataclass
class Run:
    """What one training run holds from `setup` through `loop` to `finish`."""

    config: dict  # configure's: every flag resolved, saved as the run's config.json
    device: torch.device
    model: torch.nn.Module  # the NVEmbed, FSDP-sharded under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sources: list  # a data.TrainDataset per source
    sampler: BatchSampler  # step k's source and global batch
    evaluation: tuple | None  # train_cli.evaluation_set's
    autocast: torch.autocast | None  # bf16 compute where FSDP does not cast
    shape: dict  # mfu.model_shape, the sizes step_flops counts with
    lockstep: bool  # several ranks: every forward gathers from all of them
    ndcg_before: float | None
    step: int = 0


def train_step(run: Run, source, global_batch: list[int]) -> dict:
    """One optimizer step on the global batch; returns its loss (the mean over all ranks), gradient
    norm, lr, real tokens (all ranks) and this rank's FLOPs."""
    config, model, device = run.config, run.model, run.device
    micro_batches = config["grad_accum"]
    micro_size = config["batch_size"] // micro_batches
    loss_sum, tokens, flops, truncated = torch.zeros((), device=device), 0, 0.0, 0
    collapsed = torch.zeros((), device=device)  # the loss if every score were equal (guards.py)
    # Gradient accumulation: gradients are reduced across ranks only on the last micro-batch.
    # In-batch negatives are per micro-batch (the other documents of the same micro-batch on all
    # ranks), so accumulation trades memory for fewer negatives and another loss; 1 micro-batch is
    # the paper's setting, and --grad-cache fits it in memory without changing the loss.
    for micro in range(micro_batches):
        if is_distributed():
            model.set_requires_gradient_sync(micro == micro_batches - 1)
        micro_batch = global_batch[micro * micro_size:(micro + 1) * micro_size]
        indices = rank_slice(micro_batch, rank(), world_size())
        batch = source.collate(indices, model.tokenizer, config["max_length"], model.text_rule)
        # texts cut at --max-length (CPU flags: no device sync); the log counts them
        truncated += int(batch["queries"]["truncated"].sum())
        truncated += int(batch["documents"]["truncated"].sum())
        if config["grad_cache"]:  # one micro-batch (train_cli): a whole softmax, one chunk's memory
            loss, real_tokens = forward_backward_cached(model, batch, config["temperature"],
                                                        config["grad_cache"], device, run.autocast)
        else:
            loss, real_tokens = forward_backward(model, batch, config["temperature"],
                                                 1.0 / micro_batches, device, run.autocast)
        loss_sum += loss / micro_batches
        collapsed += collapsed_loss(batch["doc_keys"], len(indices), batch["in_batch_negatives"],
                                    batch["known_positive_keys"]).to(device) / micro_batches
        tokens += real_tokens
        flops += step_flops(run.shape, batch)
    # The logged loss is the global batch's mean (the ranks hold equal shares).
    stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=device),
                         torch.tensor(float(truncated), device=device), collapsed])
    if is_distributed():
        dist.all_reduce(stats)
        stats[0] /= world_size()
        stats[3] /= world_size()
    loss_value = stats[0].item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"the loss is {loss_value}")
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    # FSDP: DTensor
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    grad_norm = grad_norm.item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"the gradient norm is {grad_norm} (loss {loss_value:.4f})")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss_value, grad_norm=grad_norm, lr=lr, tokens=int(stats[1].item()),
                truncated=int(stats[2].item()), flops=flops, collapsed_loss=stats[3].item())


def setup(config: dict) -> Run:
    """The run folder, the data, the model (built on rank 0, sharded, broadcast) evaluated before
    training, the optimizer and schedule; with --resume, the newest checkpoint's state."""
    device = init_distributed(config["device"])
    out = Path(config["out"])
    # The data read and checked before anything is written into --out: a bad line leaves
    # nothing there that the same command, run again, would trip over.
    # Stage 1 trains on retrieval data only (PAPER.md section 4); stage 2 blends in the rest.
    # Every rank reads them; a mistake found on one rank alone (a node without the file) stops all.
    sources, sampler, evaluation = every_rank_agrees(lambda: (
        *training_data(config, retrieval_only=config["stage"] == 1), evaluation_set(config)))
    candidates = open_run(config)  # with --resume, its checkpoints newest first
    print0("config " + json.dumps(config, indent=2))

    # The model: built on rank 0 (the others: shapes only), evaluated, sharded, broadcast.
    lockstep = is_distributed() and world_size() > 1
    # (under torchrun only rank 0 reads the checkpoint; the others get their shards)
    model = build_on_rank0(build_model, config) if lockstep else build_model(config)
    print0(describe(model, device))
    check_max_length(config, sources, model.tokenizer, model.text_rule)
    if (prompt := query_prompt(sources, model.text_rule)) is not None:
        model.prompts["query"] = prompt  # the run's one instruction: encode_query's prefix
    if rank() == 0:  # the model built and the texts fit: the run has started
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tracking.start(config.get("report_to"), out)  # --report-to tensorboard; stopped by train()
    full_state = model.state_dict() if lockstep and rank() == 0 else None  # what rank 0 broadcasts
    model = parallelize(model, device, config["activation_checkpointing"], config["dtype"],
                        config["compile"])
    if lockstep:
        load_from_rank0(model, full_state, device)
    del full_state
    if candidates is None:
        ndcg_before = run_evaluation(model, config, evaluation, "before", 0, lockstep=lockstep)
    else:
        ndcg_before = logged_ndcg(out, "before")  # evaluated when the run started
    # bf16 compute: FSDP's MixedPrecisionPolicy casts on GPU ranks; otherwise autocast does
    # (on a CPU with AMX, bf16 matrix products are several times faster than fp32).
    fsdp_casts = device.type == "cuda" and is_distributed()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if config["dtype"] == "bf16" and not fsdp_casts else None

    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters; torch's CPU default loops in Python, ~10 small ops per
    # parameter (420 of them with LoRA on SmolLM2). FSDP's sharded parameters keep the default.
    optimizer = torch.optim.AdamW(trainable, lr=config["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config["weight_decay"], fused=not is_distributed())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config["warmup_steps"], config["steps"], config["decay"]))
    # Dropout masks differ per rank (each rank sees other examples); reproducible per (seed, rank).
    torch.manual_seed(config["seed"] + 1 + rank())
    run = Run(config, device, model, optimizer, scheduler, sources, sampler, evaluation, autocast,
              model_shape(model), lockstep, ndcg_before)
    if candidates is not None:  # the newest that verifies and loads (others named, passed over)
        resume_from, run.step = resume(config, candidates, model, optimizer, scheduler)
        print0(f"resumed from {resume_from} at step {run.step}")
    return run


def loop(run: Run) -> float | None:
    """Steps up to --steps (or --stop-after), logging every --log-every, evaluating every
    --eval-every and saving a checkpoint every --save-every; returns the last step's loss."""
    config = run.config
    last_step = min(config["steps"], config["stop_after"] or config["steps"])
    step_log = StepLog(config, run.device, initial_step=run.step)
    stats, collapse = dict(loss=None), CollapseWatch(config)
    saved_at = time.monotonic()  # --save-every-minutes counts from here
    while run.step < last_step:
        start = time.perf_counter()
        source_index, global_batch = run.sampler.batch_for_step(run.step)
        source = run.sources[source_index]
        try:
            stats = train_step(run, source, global_batch)
        except NonFiniteLossError as error:
            raise non_finite_stop(config, run.step + 1, str(error)) from None
        run.step += 1
        collapse.see(run.step, stats["loss"], stats["collapsed_loss"])  # warns once stuck there
        step_log.add(run.step, stats, time.perf_counter() - start, source.name, last_step)
        evaluate_now = config["eval_every"] and run.step % config["eval_every"] == 0
        if evaluate_now and run.step < config["steps"]:  # eval mode: no dropout
            run_evaluation(run.model, config, run.evaluation, "during", run.step, run.lockstep)
        by_time = run.step < config["steps"] and minutes_passed(saved_at, config, run.device)
        stopping = run.step == last_step < config["steps"]  # --stop-after: resumable from here
        if run.step % config["save_every"] == 0 or by_time or stopping:
            try:
                check_finite_weights(run.model)
            except NonFiniteLossError as error:
                raise non_finite_stop(config, run.step, str(error)) from None
            path = save_checkpoint(Path(config["out"]), run.model, run.optimizer, run.scheduler,
                                   run.step, config, config["keep_checkpoints"])
            print0(f"saved checkpoint {path}")
            saved_at = time.monotonic()
    step_log.close()
    return stats["loss"]


def minutes_passed(since: float, config: dict, device: torch.device) -> bool:
    """Whether --save-every-minutes (0: never) have passed since `since` by rank 0's clock: every
    rank takes part in a checkpoint, so all follow rank 0."""
    minutes = config["save_every_minutes"]
    return rank0_decides(minutes > 0 and time.monotonic() - since >= 60 * minutes, device)


def finish(run: Run, loss: float | None) -> dict:
    """The final model, evaluated as it is (sharded), then gathered to rank 0 and saved; the
    summary."""
    config, out = run.config, Path(run.config["out"])
    summary = dict(out=str(out), step=run.step, loss=loss, ndcg_before=run.ndcg_before,
                   ndcg_after=None, model=None)
    if run.step < config["steps"]:
        print0(f"stopped after step {run.step} of {config['steps']} (--stop-after); "
               "continue with --resume")
        return summary
    try:  # before the evaluation too: a NaN model would only score 0
        check_finite_weights(run.model)
    except NonFiniteLossError as error:
        raise non_finite_stop(config, run.step, str(error)) from None
    summary["ndcg_after"] = run_evaluation(run.model, config, run.evaluation, "after", run.step,
                                           lockstep=run.lockstep)
    full_state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
    if rank() == 0:
        beir = config["eval_beir"]  # the card's model-index names the evaluation's data
        evaluation = dict(data=Path(beir).name, split=config["eval_split"]) if beir else \
            dict(data="built-in", split="test")
        training = dict(data=config["data"] or "built-in", steps=run.step,  # for the model card
                        metrics=logged_eval(out, "after"), evaluation=evaluation)
        run.model.save(out / "model", state_dict=full_state, overwrite=True, training=training)
        print0(f"saved model to {out / 'model'}")
        discard_previous_run(out)  # --overwrite's set-aside run: replaced now
    run.model = run.optimizer = full_state = None
    barrier()
    summary["model"] = str(out / "model")
    if run.ndcg_before is not None and summary["ndcg_after"] is not None:
        print0(f"nDCG@10 before {run.ndcg_before:.4f} -> after {summary['ndcg_after']:.4f}")
    return summary


def train(config: dict) -> dict:
    """Run one stage as `config` (`configure`'s) says; returns a summary dict."""
    try:
        run = setup(config)
        watch(run)  # its step, for the line an interruption prints
        return finish(run, loop(run))
    finally:
        tracking.stop(config["out"])


@exits_on_user_error  # a mistake in the input: one line, exit status 2, said by rank 0 (errors.py)
@stops_cleanly  # Ctrl-C, SIGTERM: one line, exit 130 / 143; --out's lock released (interrupts.py)
def main(argv: list[str] | None = None) -> dict:
    """The command (flags: plumbing/train_cli.py)."""
    try:
        return train(configure(argv))
    except NonFiniteLossError as error:
        # Every rank holds the same all-reduced values and stops alike; rank 0 says it once. Exit
        # status 1: the input was well-formed, the training diverged.
        # Other ranks wait for rank 0 to exit first, as on user errors (errors.py), so that
        # torchrun names rank 0 the root cause.
        if rank() == 0 or let_rank0_stop_first():
            sys.stdout.flush()
            print(f"train.py: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
