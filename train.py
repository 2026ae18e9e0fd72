"""Two-stage contrastive instruction tuning of NV-Embed (PAPER.md section 4, paper section 3.3), one CPU or
many GPUs (FSDP2). Stage 1: retrieval data, in-batch plus curated hard negatives. Stage 2: from stage 1, retrieval
blended with classification, clustering and STS, in-batch negatives off (items of one class are no negatives).

    torchrun --nproc_per_node=2 train.py --stage 1    # the tiny default job -> runs/stage1/model
    torchrun --nproc_per_node=2 train.py --stage 2    # continues from runs/stage1
    torchrun --nproc_per_node=8 train.py --stage 1 --model /ckpt/Mistral-7B-v0.1 --data train/*.jsonl

No flags: a tiny random Mistral, the byte tokenizer and the built-in data, printing nDCG@10 before and after.
With --model the defaults are the paper's recipe (train_cli.RECIPES); `python train.py` is one process, no group.
Reading order: loss.py's `contrastive_loss` (InfoNCE with cross-rank negatives), `parallelize` (FSDP2),
`build_model_on_rank0` (only rank 0 reads the checkpoint), `forward_backward` and `forward_backward_cached`
(GradCache: the paper's batch in one softmax on few GPUs), `train_step`, `train`. Checkpoints and the run folder
(--out: config.json, log.jsonl, checkpoints/step_N, model/) are written by checkpoints.py; --resume continues
exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm

import data
import datafiles
import evaluate
import train_cli
from builtin import builtin_dataset, builtin_sources
from checkpoints import (append_log, latest_checkpoint, load_checkpoint, logged_ndcg, model_folder, open_run,
                         save_checkpoint)
from compiled import compile_counts
from distributed import barrier, destroy_distributed, init_distributed, is_distributed, print0, rank, world_size
from errors import DataError, UsageError, UserError, stop_on_user_error
from lora import apply_lora, mark_only_lora_trainable
from loss import contrastive_loss
from model import NVEmbed

# ----------------------------------------------------------------------------
# Model, parallelism, optimizer


def build_model(config: dict):
    """A fresh NVEmbed on the base decoder, or the stage-1 model (`init_from`), set up to train. With LoRA
    (PAPER.md section 4) only the adapters and the pooling train; a stage-1 model's adapters keep training.
    Trainable parameters are fp32 for AdamW even over a bf16 base (FSDP or autocast casts them to compute)."""
    if config["init_from"]:
        # What trains is loaded in fp32, exactly as stage 1 saved it (a trip through bf16
        # would round it): the adapters and the pooling, or the whole model without LoRA.
        # Only a frozen base takes --model-dtype.
        frozen_dtype = _dtype(config["model_dtype"]) if config["lora_rank"] > 0 else torch.float32
        model = NVEmbed.from_pretrained(model_folder(config["init_from"]), dtype=frozen_dtype,
                                        trainable_dtype=torch.float32)
    else:
        model = NVEmbed.from_base(config["model"], pooling=config["pooling"], causal=config["causal"],
                                  max_length=config["max_length"], dtype=_dtype(config["model_dtype"]),
                                  seed=config["seed"], pooling_kwargs=config["pooling_kwargs"])
    model.max_length, model.name = config["max_length"], config["name"]  # the name: --name, or --out's folder's
    if model.lora_config() is None and config["lora_rank"] > 0:
        torch.manual_seed(config["seed"])  # the adapters' init, reproducible from the seed
        apply_lora(model.decoder, rank=config["lora_rank"], alpha=config["lora_alpha"],
                   dropout=config["lora_dropout"])
    if model.lora_config() is not None:
        mark_only_lora_trainable(model.decoder)
        for param in model.pooling.parameters():
            param.requires_grad = True
    else:
        for param in model.parameters():
            param.requires_grad = True
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model.train()


def build_model_on_rank0(config: dict):
    """`build_model` on rank 0 only, so that one process, not each of 8, reads and holds a 7B checkpoint. The
    others build the modules on the meta device (`NVEmbed.skeleton`) from rank 0's broadcast architecture and
    tokenizer (pickled by rank 0 of this job), or stop on rank 0's error, and get their shards in load_from_rank0."""
    model, error = None, None
    message = [None, None, None, False]  # architecture, tokenizer, rank 0's error, whether it is the user's
    if rank() == 0:
        try:
            model = build_model(config)
            message[:2] = model.architecture(), model.tokenizer
        except Exception as e:
            error, message[2], message[3] = e, f"{type(e).__name__}: {e}", isinstance(e, UserError)
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[3]:  # a mistake in the user's input, which rank 0 reports (`main`)
        raise UserError(f"rank 0 could not build the model: {message[2]}")
    if message[2] is not None:
        raise RuntimeError(f"rank 0 could not build the model: {message[2]}")
    return model if model is not None else NVEmbed.skeleton(*message[:2]).train()


def load_from_rank0(model, full_state: dict | None, device: torch.device):
    """After `parallelize`: every rank's shards from rank 0's full state dict (None elsewhere)."""
    if rank() != 0:
        model.to_empty(device=device)  # memory for the meta-device shards, filled just below
    set_model_state_dict(model, full_state if rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def parallelize(model, device: torch.device, activation_checkpointing: bool = False, compute_dtype: str = "bf16",
                compile: bool = False):
    """FSDP2 (torchtitan-style): shard each decoder layer, then the pooling, then the root. Each group is
    gathered just before its forward and freed after it, so one layer is whole at a time. On GPU it computes in
    bf16 and reduces gradients in fp32 (the master shards stay fp32). Without a process group: only moved.
    `compile`: each layer and the pooling compiled first (torchtitan's order), so FSDP's hooks stay eager."""
    model.decoder.activation_checkpointing = activation_checkpointing  # recompute each layer in backward
    if compile:
        model.compile()
    if not is_distributed():
        return model.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    bf16 = device.type == "cuda" and compute_dtype == "bf16"  # on CPU, autocast does the casting
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    if any(True for _ in model.pooling.parameters()):  # mean and eos pooling have no parameters
        fully_shard(model.pooling, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)  # the rest: embeddings and the final norm
    return model


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str = "linear") -> float:
    """Linear warm-up from 0 over `warmup_steps`, then linear (or cosine) decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------
# Data: one data.TrainDataset per source; every batch comes from a single source.


def file_sources(paths: list[str], stage: int, hard_negatives: int, in_batch_negatives: bool) -> list:
    """One TrainDataset per training file (datafiles.py's schema, one task type a file). Stage 1 takes retrieval
    files only (PAPER.md section 4); in-batch negatives go to retrieval data only (data.TrainDataset decides)."""
    sources = []
    for path in paths:
        examples = datafiles.read_training_file(path)
        kinds = sorted({e.task_type for e in examples})
        if stage == 1 and kinds != ["retrieval"]:
            raise DataError(f"{path}: stage 1 trains on retrieval data only (PAPER.md section 4), "
                            f"this file has task types {kinds}; use it in --stage 2")
        sources.append(data.TrainDataset(Path(path).stem, examples, in_batch_negatives=in_batch_negatives,
                                         num_hard_negatives=hard_negatives))
    return sources


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "truncated"}


def forward_backward(model, batch: dict, temperature: float, loss_scale: float, device: torch.device,
                     autocast=None) -> tuple[torch.Tensor, int]:
    """Embed this rank's share of a micro-batch (data.collate's dict), compute the loss, backpropagate;
    returns the detached loss and the number of real (non-padding) tokens."""
    queries, documents = to_device(batch["queries"], device), to_device(batch["documents"], device)
    with autocast or contextlib.nullcontext():
        query_emb = model(queries)  # (B, D)
        doc_emb = model(documents)  # (B*(1+n), D)
    loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], temperature,
                            in_batch_negatives=batch["in_batch_negatives"],
                            known_positive_keys=batch["known_positive_keys"])
    (loss * loss_scale).backward()
    return loss.detach(), int(queries["attention_mask"].sum() + documents["attention_mask"].sum())


# ----------------------------------------------------------------------------
# GradCache (Gao et al. 2021): the whole global batch in one softmax, at the memory of `chunk_size` texts.


def forward_backward_cached(model, batch: dict, temperature: float, chunk_size: int, device: torch.device,
                            autocast=None) -> tuple[torch.Tensor, int]:
    """`forward_backward` in three passes, with the same loss and gradients (tests/test_grad_cache.py):
    1. embed this rank's queries and documents `chunk_size` texts at a time, without a graph;
    2. the loss of the global batch on those embeddings (cross-rank negatives and all), differentiated with
       respect to the embeddings only: (B + B*G, D) numbers, however large the model;
    3. embed each chunk again, with its graph and the random state of its first pass (the same dropout masks),
       and backpropagate its slice of the embeddings' gradient into the parameters.
    Only one chunk's activations are alive at a time; the cost is one more forward. Under FSDP each chunk's
    forward gathers the layers again, and gradients are reduced once, in the last chunk's backward: until then
    each rank accumulates the unsharded gradients of what trains (LoRA's: a few MB; full fine-tuning of a 7B
    model: 28 GB of fp32 per GPU)."""
    queries, documents = to_device(batch["queries"], device), to_device(batch["documents"], device)
    query_chunks, doc_chunks = text_chunks(queries, chunk_size), text_chunks(documents, chunk_size)
    states, cached = [], []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for chunk in query_chunks + doc_chunks:
            states.append(RandomState(device))
            cached.append(model(chunk).detach().requires_grad_())  # (rows, D): leaves to take the gradient at
    query_emb, doc_emb = torch.cat(cached[:len(query_chunks)]), torch.cat(cached[len(query_chunks):])
    loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], temperature,
                            in_batch_negatives=batch["in_batch_negatives"],
                            known_positive_keys=batch["known_positive_keys"])
    loss.backward()  # fills each cached chunk's .grad (on several ranks, GatherWithGradient's all_reduce)
    for i, (chunk, state, first) in enumerate(zip(query_chunks + doc_chunks, states, cached)):
        if is_distributed():
            model.set_requires_gradient_sync(i == len(cached) - 1)  # reduce-scatter once, after the last chunk
        with state.replay(), autocast or contextlib.nullcontext():
            embeddings = model(chunk)  # (rows, D), with its graph
        check_replay(embeddings, first, i)
        embeddings.backward(first.grad)
    return loss.detach(), int(queries["attention_mask"].sum() + documents["attention_mask"].sum())


def text_chunks(inputs: dict, chunk_size: int) -> list[dict]:
    """Rows [i, i + chunk_size) of a right-padded tokenized batch, each cut to its own longest row."""
    chunks = []
    for start in range(0, inputs["input_ids"].shape[0], chunk_size):
        rows = {key: value[start:start + chunk_size] for key, value in inputs.items()}
        width = int(rows["attention_mask"].sum(1).max())
        chunks.append({key: value[:, :width] for key, value in rows.items()})
    return chunks


class RandomState:
    """The CPU (and this GPU's) random state as a chunk is first embedded, to replay when it is embedded again:
    dropout (LoRA's) then draws the same masks, so the graph computes the embeddings the loss saw."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        # fork_rng restores the state on exit: the random stream goes on from where the first pass left it.
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def check_replay(again: torch.Tensor, first: torch.Tensor, chunk: int):
    """The second pass must compute what the loss was taken at: a random draw that is not replayed (dropout
    outside torch's generators, say) would silently give another model's gradients. Same kernels on the same
    inputs agree to the last bit or nearly (a bf16 rounding step, ~4e-3 relative, should another kernel run);
    a different dropout mask moves embeddings by ~1e-1 of their size, except LoRA's at initialisation (B = 0: no
    embedding moves, only B's gradient would be wrong). The bound lies between the two."""
    error = (again.detach() - first.detach()).abs().max().item()
    if error > 2e-2 * max(first.detach().abs().max().item(), 1e-6):
        raise RuntimeError(f"GradCache: chunk {chunk} embedded differently the second time (max difference "
                           f"{error:.2e}): something random in the forward is not replayed by RandomState")


# ----------------------------------------------------------------------------
# Evaluation (BEIR-style nDCG@10; evaluate.py)


def evaluation_set(config: dict):
    """(corpus, queries, qrels, instruction) to evaluate on, or None (--no-eval, or training files without
    --eval-beir). Every rank reads it, at the start: a wrong folder stops them all before the model is built."""
    if not config["eval"]:
        return None
    if config["eval_beir"]:
        corpus, queries, qrels = datafiles.load_beir(config["eval_beir"], config["eval_split"])
        instruction = config["eval_instruction"]
        if instruction is None:
            instruction = evaluate.INSTRUCTIONS.get(Path(config["eval_beir"]).resolve().name.lower(), "")
        return corpus, queries, qrels, instruction
    if not config["data"]:  # the built-in dataset's held-out test queries
        builtin = builtin_dataset(seed=0)
        return (*builtin.split("test"), builtin.instruction)
    return None


def run_evaluation(model, config: dict, evaluation, when: str, step: int, lockstep: bool) -> float | None:
    """nDCG@10 of `model` on `evaluation` (evaluation_set's), every rank encoding a share (evaluate.encode_sharded;
    lockstep: the model is FSDP-sharded), rank 0 scoring; logged (`when`: before, during or after training, at
    `step`) and returned on rank 0 (else None)."""
    if evaluation is None:
        return None
    corpus, queries, qrels, instruction = evaluation
    metrics, _ = evaluate.run_evaluation(model, corpus, queries, qrels, instruction, top_k=100,
                                         batch_size=config["eval_batch_size"], k_values=(1, 10, 100),
                                         lockstep=lockstep)
    if lockstep:  # FSDP2 keeps the root's weights gathered after a forward with no backward: shard them again
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    barrier()  # the other ranks wait while rank 0 searches
    if rank() != 0:
        return None
    moment = f"at step {step}" if when == "during" else f"{when} training"
    print0(f"eval {moment}: nDCG@10 {metrics['NDCG@10']:.4f}  Recall@10 {metrics['Recall@10']:.4f}  "
           f"MRR@10 {metrics['MRR@10']:.4f}")
    append_log(Path(config["out"]), {"event": "eval", "when": when, "step": step, **metrics})
    return metrics["NDCG@10"]


# ----------------------------------------------------------------------------
# Training


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss or gradient norm: the run stops before the optimizer step."""


# Dense bf16 peak per GPU, matched as substrings of the device name in this order
# ("H20" is inside "H200", "L4" inside "L40S").
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # MFU is only reported on GPUs
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def model_shape(model) -> dict:
    """The sizes step_flops counts with (parameter counts are global: a DTensor's numel under FSDP is unsharded).
    matmul: decoder weights used in matrix products (2-D, not the embedding, not the adapters); lora: the adapters';
    first_qkv: layer 0's q/k/v base weights and lora_A, whose input gradient a frozen base never computes."""
    decoder, pooling = model.decoder, model.pooling
    base = [(name, p) for name, p in decoder.named_parameters() if "lora_" not in name]
    frozen_base = model.lora_config() is not None and not any(p.requires_grad for _, p in base)
    first_attn = decoder.layers[0].self_attn
    first_qkv = sum(p.numel() for m in (first_attn.q_proj, first_attn.k_proj, first_attn.v_proj)
                    for name, p in m.named_parameters() if name in ("weight", "lora_A"))
    return dict(params=sum(p.numel() for p in model.parameters()), layers=decoder.config.num_hidden_layers,
                hidden=decoder.config.hidden_size,
                attention_width=decoder.config.num_attention_heads * decoder.config.head_dim, causal=model.causal,
                matmul=sum(p.numel() for name, p in base if p.dim() == 2 and not name.startswith("embed_tokens")),
                lora=sum(p.numel() for name, p in decoder.named_parameters() if "lora_" in name),
                frozen_base=frozen_base, first_qkv=first_qkv if frozen_base else 0,
                pooling=model.pooling_name, latents=getattr(pooling, "num_latents", 0),
                pooling_width=getattr(pooling, "num_heads", 0) * getattr(pooling, "head_dim", 0),
                mlp_ratio=getattr(pooling, "mlp_ratio", 0))


def describe(model, device: torch.device) -> str:
    shape, lora = model_shape(model), model.lora_config()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"model: {shape['params'] / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
            f"({'LoRA ' + json.dumps(lora) if lora else 'full fine-tuning'}), pooling {model.pooling_name}, "
            f"{'causal' if model.causal else 'bidirectional'}; {world_size()} rank(s) on {device.type}")


def step_flops(model_shape: dict, batch: dict) -> float:
    """Useful training FLOPs of one micro-batch (data.collate's queries and documents): the matrix products of
    forward and backward, counted once, over real tokens only (MFU, not HFU). The counting rule, per real token:

    - decoder weights (N = model_shape["matmul"]): 2N forward, 2N for the input gradient, 2N for the weight
      gradient: 6N with full fine-tuning. LoRA on a frozen base computes no weight gradient of the frozen
      matrices, so 4N, less 2 x layer 0's q/k/v (their input is the frozen embedding: no gradient flows to it),
      plus 6 x the adapters' parameters (each adapter is two small matmuls, trained);
    - attention, per layer and row of L real tokens: QK^T and AV are 4 x L x L_keys x (H x Dh) forward and twice
      that backward (12 in all), L_keys = L bidirectional, (L + 1) / 2 on average causal;
    - the pooling, over the pooled tokens P of a row (pool_mask), forward x 3 (every weight trains, and the
      gradient flows on into the decoder): latent attention's to_q, scores and values over the latents, to_out
      and GEGLU MLP per token, plus to_kv on the latents once per forward; self-attention's projections and
      P x P attention; mean and EOS nothing.

    Not counted: padding (zero-padded positions are wasted work), activation-checkpoint recomputation and GradCache's
    re-embedding (the same forward again: call this once per logical batch), norms, softmax and other elementwise
    ops, and the loss's (B x C) similarity product. tests/test_flops.py checks this against FlopCounterMode."""
    s = model_shape
    per_token = (4 * s["matmul"] + 6 * s["lora"]) if s["frozen_base"] else 6 * s["matmul"]
    flops = 0.0
    for part in ("queries", "documents"):
        lengths = batch[part]["attention_mask"].sum(1).double()  # (rows,) real tokens
        keys = (lengths + 1) / 2 if s["causal"] else lengths  # (rows,) keys a token attends to, on average
        flops += float(lengths.sum()) * (per_token - 2 * s["first_qkv"])
        flops += 12 * s["layers"] * s["attention_width"] * float((lengths * keys).sum())
        flops += 3 * _pooling_forward_flops(s, batch[part]["pool_mask"].sum(1).double())
    return flops


def _pooling_forward_flops(s: dict, pooled: torch.Tensor) -> float:
    """Forward matmul FLOPs of the pooling on rows of `pooled` (rows,) pooled tokens (step_flops' rule)."""
    D, width, L = s["hidden"], s["pooling_width"], s["latents"]
    if s["pooling"] == "latent":  # to_q + scores + values + to_out + ff_in + ff_out per token; to_kv once
        per_token = 2 * D * width + 4 * L * width + 2 * width * D + 6 * s["mlp_ratio"] * D * D
        return float(pooled.sum()) * per_token + 2 * L * D * 2 * width
    if s["pooling"] == "self-attention":  # qkv + out per token, then P x P scores and values of width D
        return float(pooled.sum()) * 8 * D * D + 4 * D * float((pooled * pooled).sum())
    return 0.0  # mean, eos: no matrix products


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def training_data(config: dict) -> tuple[list, data.BatchSampler]:
    """The sources (a data.TrainDataset each) and the sampler: step k's global batch depends on (seed, k) alone."""
    if config["data"]:
        sources = file_sources(config["data"], config["stage"], config["hard_negatives"],
                               config["in_batch_negatives"])
    else:
        sources = builtin_sources(config["stage"], config["hard_negatives"], config["in_batch_negatives"],
                                  config["seed"])
    for source in sources:
        print0(source.summary())
        if len(source) < config["batch_size"]:
            raise UsageError(f"--batch-size {config['batch_size']}: {source.name} has only {len(source)} examples")
    if config["batch_size"] % (config["grad_accum"] * world_size()):
        raise UsageError(f"--batch-size {config['batch_size']} must be divisible by --grad-accum "
                         f"{config['grad_accum']} x {world_size()} ranks")
    return sources, data.BatchSampler(sources, config["batch_size"], seed=config["seed"])


def train_step(model, optimizer, scheduler, source, global_batch: list[int], config: dict, device: torch.device,
               autocast) -> dict:
    """One optimizer step on the global batch; returns its loss (the mean over all ranks), gradient norm, lr,
    real tokens (all ranks) and this rank's FLOPs."""
    micro_batches = config["grad_accum"]
    micro_size = config["batch_size"] // micro_batches
    loss_sum, tokens, flops = torch.zeros((), device=device), 0, 0.0
    # Gradient accumulation: gradients are reduced across ranks only on the last
    # micro-batch. In-batch negatives are per micro-batch (the other documents of
    # the same micro-batch on all ranks), so accumulation trades memory for fewer
    # negatives and another loss; 1 micro-batch is the paper's setting, and
    # --grad-cache fits it in memory without changing the loss.
    for micro in range(micro_batches):
        if is_distributed():
            model.set_requires_gradient_sync(micro == micro_batches - 1)
        indices = data.rank_slice(global_batch[micro * micro_size:(micro + 1) * micro_size], rank(), world_size())
        batch = source.collate(indices, model.tokenizer, config["max_length"], model.text_rule)
        if config["grad_cache"]:  # one micro-batch (train_cli), its softmax whole, its memory one chunk's
            loss, real_tokens = forward_backward_cached(model, batch, config["temperature"], config["grad_cache"],
                                                        device, autocast)
        else:
            loss, real_tokens = forward_backward(model, batch, config["temperature"], 1.0 / micro_batches, device,
                                                 autocast)
        loss_sum += loss / micro_batches
        tokens += real_tokens
        flops += step_flops(model_shape(model), batch)
    # The logged loss is the global batch's mean (the ranks hold equal shares).
    stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=device)])
    if is_distributed():
        dist.all_reduce(stats)
        stats[0] /= world_size()
    loss_value = stats[0].item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"the loss is {loss_value}; stopping without an optimizer step or a checkpoint "
                                 f"from this step (last checkpoint: {latest_checkpoint(config['out']) or 'none'})")
    max_norm = config["grad_clip"] if config["grad_clip"] > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor under FSDP
    grad_norm = grad_norm.item()
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"the gradient norm is {grad_norm} (loss {loss_value:.4f}); stopping without an "
                                 "optimizer step or a checkpoint from this step")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss_value, grad_norm=grad_norm, lr=lr, tokens=int(stats[1].item()), flops=flops)


def train(config: dict) -> dict:
    """Run one stage as `config` (train_cli.resolve_config) says; returns a summary dict."""
    device = init_distributed(config["device"])
    out = Path(config["out"])
    resume_from = open_run(config)
    print0("config " + json.dumps(config, indent=2))
    if rank() == 0:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sources, sampler = training_data(config)
    evaluation = evaluation_set(config)

    # The model: built on rank 0 (the others: shapes only), evaluated, sharded, broadcast.
    distributed = is_distributed() and world_size() > 1
    model = build_model_on_rank0(config) if distributed else build_model(config)
    print0(describe(model, device))
    full_state = model.state_dict() if distributed and rank() == 0 else None  # what rank 0 broadcasts
    model = parallelize(model, device, config["activation_checkpointing"], config["dtype"], config["compile"])
    if distributed:
        load_from_rank0(model, full_state, device)
    del full_state
    if resume_from is None:
        ndcg_before = run_evaluation(model, config, evaluation, "before", 0, lockstep=distributed)
    else:
        ndcg_before = logged_ndcg(out, "before")  # evaluated when the run started
    # bf16 compute: FSDP's MixedPrecisionPolicy casts on GPU ranks; otherwise autocast does
    # (on a CPU with AMX, bf16 matrix products are several times faster than fp32).
    fsdp_casts = device.type == "cuda" and is_distributed()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if config["dtype"] == "bf16" and not fsdp_casts else None

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config["warmup_steps"], config["steps"], config["decay"]))
    # Dropout masks differ per rank (each rank sees other examples); reproducible per (seed, rank).
    torch.manual_seed(config["seed"] + 1 + rank())
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, scheduler)
        print0(f"resumed from {resume_from} at step {step}")
    last_step = min(config["steps"], config["stop_after"] or config["steps"])

    step_log = StepLog(config, device, initial_step=step)
    stats = dict(loss=None)
    while step < last_step:
        start = time.perf_counter()
        source_index, global_batch = sampler.batch_for_step(step)
        try:
            stats = train_step(model, optimizer, scheduler, sources[source_index], global_batch, config, device,
                               autocast)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"step {step + 1}: {error}") from None
        step += 1
        step_log.add(step, stats, time.perf_counter() - start, sources[source_index].name, last_step)
        if config["eval_every"] and step % config["eval_every"] == 0 and step < config["steps"]:
            run_evaluation(model, config, evaluation, "during", step, lockstep=distributed)  # eval mode: no dropout
        if step % config["save_every"] == 0 or (step == last_step < config["steps"]):
            path = save_checkpoint(out, model, optimizer, scheduler, step, config, config["keep_checkpoints"])
            print0(f"saved checkpoint {path}")
    step_log.close()

    summary = dict(out=str(out), step=step, loss=stats["loss"], ndcg_before=ndcg_before, ndcg_after=None,
                   model=None)
    if step < config["steps"]:
        print0(f"stopped after step {step} of {config['steps']} (--stop-after); continue with --resume")
        return summary
    # The final model: evaluated as it is (sharded), then gathered to rank 0 and saved.
    summary["ndcg_after"] = run_evaluation(model, config, evaluation, "after", step, lockstep=distributed)
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        model.save(out / "model", state_dict=full_state, overwrite=True)
        print0(f"saved model to {out / 'model'}")
    del model, optimizer, full_state
    barrier()
    summary["model"] = str(out / "model")
    if ndcg_before is not None and summary["ndcg_after"] is not None:
        print0(f"nDCG@10 before {ndcg_before:.4f} -> after {summary['ndcg_after']:.4f}")
    return summary


class StepLog:
    """A log line and log.jsonl record per --log-every steps (loss, lr, grad norm, ms/step, tokens/s, MFU, memory)."""

    def __init__(self, config: dict, device: torch.device, initial_step: int):
        self.config, self.device, self.peak = config, device, peak_flops(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # this run's peak, even after others in the same process
        self.progress = tqdm(total=config["steps"], initial=initial_step, desc=f"stage {config['stage']}",
                             dynamic_ncols=True, disable=rank() != 0 or not config["progress"])
        self.window = dict(time=0.0, steps=0, tokens=0, flops=0.0)

    def add(self, step: int, stats: dict, seconds: float, dataset: str, last_step: int):
        self.progress.update(1)
        for key, value in (("time", seconds), ("steps", 1), ("tokens", stats["tokens"]), ("flops", stats["flops"])):
            self.window[key] += value
        if step % self.config["log_every"] and step != last_step:
            return
        window = self.window
        ms, tokens_per_s = 1000 * window["time"] / window["steps"], window["tokens"] / window["time"]
        mfu = window["flops"] / window["time"] / self.peak if self.peak else None  # this rank's share of the work
        record = dict(step=step, loss=stats["loss"], lr=stats["lr"], grad_norm=stats["grad_norm"], ms_per_step=ms,
                      tokens_per_s=tokens_per_s, mfu=mfu, peak_memory_mib=peak_memory_mib(self.device),
                      dataset=dataset)
        # --compile: graphs compiled so far; growth after the first steps is recompilation (compiled.py's bound).
        if self.config["compile"]:
            record["compiled"] = compile_counts()
        compiled = f" | graphs {record['compiled']['graphs']}" if "compiled" in record else ""
        append_log(Path(self.config["out"]), record)
        if rank() == 0:
            self.progress.write(f"step {step:5d}/{self.config['steps']} | loss {stats['loss']:.4f} | "
                                f"lr {stats['lr']:.2e} | grad norm {stats['grad_norm']:.3f} | {ms:.0f} ms/step | "
                                f"{tokens_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                                f"mem {record['peak_memory_mib']:,.0f} MiB | {dataset}{compiled}")
        self.window = dict(time=0.0, steps=0, tokens=0, flops=0.0)

    def close(self):
        self.progress.close()


def main(argv: list[str] | None = None) -> dict:
    """The command (flags: train_cli.py)."""
    parser = train_cli.build_parser()
    try:
        return train(train_cli.resolve_config(parser.parse_args(argv)))
    except UserError as error:
        # A mistake in the input ends the run as argparse's parser.error does: one line, exit status 2. Under
        # torchrun every rank stops here on the same mistake (each found it, or rank 0 sent it), and rank 0 says it.
        stop_on_user_error(parser.prog, error)
    except NonFiniteLossError as error:
        print(f"[rank {rank()}] {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
