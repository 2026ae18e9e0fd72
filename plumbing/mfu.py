"""MFU for train.py's log line: the useful FLOPs of a training step (`step_flops`, over
`model_shape`, computed once per run), the hardware's peak (a GPU's from its datasheet, a CPU's
measured once per process: `cpu_peak_flops`), and `StepLog`, the log line and log.jsonl record
every --log-every steps (and at least every --log-seconds). Tests: tests/test_flops.py (against
torch's FlopCounterMode)."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora import lora_config
from plumbing.run_folder import append_log
from plumbing.compiled import compile_counts
from plumbing.distributed import rank, world_size
from pooling import LastTokenPooling, LatentAttentionPooling, MeanPooling, SelfAttentionPooling

# Dense bf16 peak per GPU, matched as substrings of the device name in this order
# ("H20" is inside "H200", "L4" inside "L40S").
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


log = logging.getLogger("nvembed.train")


def matmul_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 4, tries: int = 3) -> float:
    """FLOP/s of an (n, n) @ (n, n) product in `dtype` on the CPU at this process's threads: the
    best of `tries` timings of `repeats` products (a shared CPU's other jobs only slow it down)."""
    generator = torch.Generator().manual_seed(0)  # its own: the run's random stream is untouched
    a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
    for _ in range(2):
        a @ b  # warm-up: the first products pick their kernels
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * repeats / best


_cpu_peaks: dict = {}  # (dtype, threads) -> FLOP/s, measured once per process


def cpu_peak_flops(dtype: torch.dtype = torch.bfloat16, remeasure: bool = False) -> float:
    """The CPU's matrix-product rate in `dtype` at this process's threads, the denominator of CPU
    MFU: measured (`matmul_flops`) at the first call, then remembered for the process. remeasure:
    timed again, keeping the highest: another job on the CPU only slows a timing down, so a peak
    measured beside one is too low (an MFU over 100%), and a long process (bench/ablate.py, once a
    row) corrects it when the CPU is free."""
    key = (dtype, torch.get_num_threads())
    if key not in _cpu_peaks or remeasure:
        _cpu_peaks[key] = max(_cpu_peaks.get(key, 0.0), matmul_flops(dtype))
    return _cpu_peaks[key]


def choose_dtype(requested: str, device: str) -> tuple[str, dict]:
    """'bf16' or 'fp32', and why: as requested; on a GPU bf16; on a CPU whichever multiplies
    faster by `cpu_peak_flops` (with native bf16, AMX or avx512_bf16, bf16 was 2-12x fp32; without
    it, about 8x slower)."""
    if requested != "auto":
        return requested, dict(chosen_by="--dtype")
    if device == "cuda":
        return "bf16", dict(chosen_by="GPU")
    speed = {name: round(cpu_peak_flops(dtype) / 1e9, 1) for name, dtype in DTYPES.items()}
    return max(speed, key=speed.get), dict(chosen_by="matmul GFLOP/s", gflops=speed)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """FLOP/s MFU divides by: a GPU's dense bf16 peak (None for a GPU not in the table), a CPU's
    measured matmul rate in `dtype`."""
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def model_shape(model) -> dict:
    """The sizes step_flops counts with (parameter counts are global: a DTensor's numel under FSDP
    is unsharded). matmul: decoder weights used in matrix products (2-D, not the embedding, not the
    adapters); lora: the adapters'; first_qkv: layer 0's q/k/v base weights and lora_A, whose input
    gradient a frozen base never computes."""
    decoder, pooling = model.decoder, model.pooling
    base = [(name, p) for name, p in decoder.named_parameters() if "lora_" not in name]
    frozen_base = lora_config(model.decoder) is not None and not any(p.requires_grad
                                                                     for _, p in base)
    first_attn = decoder.layers[0].self_attn
    first_qkv = sum(p.numel() for m in (first_attn.q_proj, first_attn.k_proj, first_attn.v_proj)
                    for name, p in m.named_parameters() if name in ("weight", "lora_A"))
    return dict(params=sum(p.numel() for p in model.parameters()),
                layers=decoder.config.num_hidden_layers,
                hidden=decoder.config.hidden_size,
                attention_width=decoder.config.num_attention_heads * decoder.config.head_dim,
                causal=model.causal,
                matmul=sum(p.numel() for name, p in base
                           if p.dim() == 2 and not name.startswith("embed_tokens")),
                lora=sum(p.numel() for name, p in decoder.named_parameters() if "lora_" in name),
                frozen_base=frozen_base, first_qkv=first_qkv if frozen_base else 0,
                pooling=model.pooling_name,
                pooling_flops=lambda pooled: pooling_flops(pooling, pooled))


def pooling_flops(pooling, pooled: torch.Tensor) -> float:
    """Forward matmul FLOPs of a pooling.py pooling on rows of `pooled` (rows,) pooled tokens."""
    if isinstance(pooling, LatentAttentionPooling):
        D, width, L = pooling.hidden_size, pooling.num_heads * pooling.head_dim, pooling.num_latents
        # Per pooled token: to_q, the scores and values over the latents, to_out, ff_in and ff_out.
        per_token = 2 * D * width + 4 * L * width + 2 * width * D + 6 * pooling.mlp_ratio * D * D
        return float(pooled.sum()) * per_token + 2 * L * D * 2 * width  # + to_kv, once per forward
    if isinstance(pooling, SelfAttentionPooling):
        # qkv and out per token, then each row's P x P scores and values of width D.
        D = pooling.hidden_size
        return float(pooled.sum()) * 8 * D * D + 4 * D * float((pooled * pooled).sum())
    if isinstance(pooling, (MeanPooling, LastTokenPooling)):
        return 0.0  # no matrix products
    raise TypeError(f"pooling_flops: no FLOP count for {type(pooling).__name__}")


def describe(model, device: torch.device) -> str:
    shape, lora = model_shape(model), lora_config(model.decoder)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"model: {shape['params'] / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
            f"({'LoRA ' + json.dumps(lora) if lora else 'full fine-tuning'}), pooling "
            f"{model.pooling_name}, {'causal' if model.causal else 'bidirectional'}; "
            f"{world_size()} rank(s) on {device.type}")


def step_flops(model_shape: dict, batch: dict) -> float:
    """Useful training FLOPs of one micro-batch (data.collate's queries and documents): the matrix
    products of forward and backward, counted once, over real tokens only (MFU, not HFU). The
    counting rule, per real token:

    - decoder weights (N = model_shape["matmul"]): 2N forward, 2N for the input gradient, 2N for the
      weight gradient: 6N with full fine-tuning. LoRA on a frozen base computes no weight gradient
      of the frozen matrices, so 4N, less 2 x layer 0's q/k/v (their input is the frozen embedding:
      no gradient flows to it), plus 6 x the adapters' parameters (each adapter is two small
      matmuls, trained);
    - attention, per layer and row of L real tokens: QK^T and AV are 4 x L x L_keys x (H x Dh)
      forward and twice that backward (12 in all), L_keys = L bidirectional, (L + 1) / 2 on average
      causal;
    - the pooling, over the pooled tokens P of a row (pool_mask), forward x 3 (every weight trains,
      and the gradient flows on into the decoder): latent attention's to_q, scores and values over
      the latents, to_out and GEGLU MLP per token, plus to_kv on the latents once per forward;
      self-attention's projections and P x P attention; mean and EOS nothing.

    Not counted: padding (zero-padded positions are wasted work), activation-checkpoint
    recomputation and GradCache's re-embedding (the same forward again: call this once per logical
    batch), norms, softmax and other elementwise ops, and the loss's (B x C) similarity product.
    tests/test_flops.py checks this against FlopCounterMode."""
    s = model_shape
    per_token = (4 * s["matmul"] + 6 * s["lora"]) if s["frozen_base"] else 6 * s["matmul"]
    flops = 0.0
    for part in ("queries", "documents"):
        lengths = batch[part]["attention_mask"].sum(1).double()  # (rows,) real tokens
        # (rows,) keys a token attends to, on average
        keys = (lengths + 1) / 2 if s["causal"] else lengths
        flops += float(lengths.sum()) * (per_token - 2 * s["first_qkv"])
        flops += 12 * s["layers"] * s["attention_width"] * float((lengths * keys).sum())
        flops += 3 * s["pooling_flops"](batch[part]["pool_mask"].sum(1).double())
    return flops


def forward_flops(model_shape: dict, inputs: dict) -> float:
    """Useful FLOPs of one forward (encoding) of a tokenized batch: 2 x the decoder's and adapters'
    weights per real token, 4 x L x L_keys x (H x Dh) of attention per layer and row, the pooling's
    forward; padding not counted (step_flops' rule, forward only)."""
    s = model_shape
    lengths = inputs["attention_mask"].sum(1).double()  # (rows,) real tokens
    keys = (lengths + 1) / 2 if s["causal"] else lengths
    return (float(lengths.sum()) * 2 * (s["matmul"] + s["lora"])
            + 4 * s["layers"] * s["attention_width"] * float((lengths * keys).sum())
            + s["pooling_flops"](inputs["pool_mask"].sum(1).double()))


def encode_mfu(model, batches, seconds: float) -> float | None:
    """MFU of encoding `batches` (tokenized dicts) in `seconds`: forward_flops against the peak of
    the model's device in the decoder's dtype (None where no peak is known)."""
    weight = model.decoder.embed_tokens.weight
    peak = peak_flops(weight.device, weight.dtype)
    flops = sum(forward_flops(model_shape(model), inputs) for inputs in batches)
    return flops / seconds / peak if peak else None


def logged_mfu(log_file: Path) -> float | None:
    """A run's MFU over all its logged steps, from its log.jsonl: each record's MFU weighted by the
    time of the steps it covers (None without any)."""
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines()]
    records = [r for r in records if r.get("mfu") is not None and "ms_per_step" in r]
    weighted, seconds, previous = 0.0, 0.0, 0
    for record in records:
        window = record["ms_per_step"] * (record["step"] - previous)
        weighted, seconds = weighted + record["mfu"] * window, seconds + window
        previous = record["step"]
    return weighted / seconds if seconds else None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: KiB; the process's peak RSS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



class StepLog:
    """A log line and log.jsonl record (loss, lr, grad norm, ms/step, tokens/s, MFU, memory) per
    --log-every steps, and after any step that ends --log-seconds or more after the last line: a
    slow run shows its progress off a terminal too. MFU on a CPU: against its matmul rate in the
    run's dtype."""

    def __init__(self, config: dict, device: torch.device, initial_step: int):
        dtype = DTYPES.get(config.get("dtype"), torch.bfloat16)
        self.config, self.device, self.peak = config, device, peak_flops(device, dtype)
        self.last_line = time.monotonic()
        if device.type == "cuda":
            # this run's peak, even after others in the same process
            torch.cuda.reset_peak_memory_stats(device)
        self.progress = tqdm(total=config["steps"], initial=initial_step,
                             desc=f"stage {config['stage']}", dynamic_ncols=True,
                             disable=rank() != 0 or not config["progress"])
        self.window = dict(time=0.0, steps=0, tokens=0, flops=0.0, truncated=0)
        self.truncated = 0  # texts cut at --max-length, all steps of this process's run

    def add(self, step: int, stats: dict, seconds: float, dataset: str, last_step: int):
        self.progress.update(1)
        for key, value in (("time", seconds), ("steps", 1), ("tokens", stats["tokens"]),
                           ("flops", stats["flops"]), ("truncated", stats.get("truncated", 0))):
            self.window[key] += value
        self.truncated += stats.get("truncated", 0)
        seconds_due = self.config.get("log_seconds", 0)
        late = seconds_due > 0 and time.monotonic() - self.last_line >= seconds_due
        if step % self.config["log_every"] and step != last_step and not late:
            return
        self.last_line = time.monotonic()
        window = self.window
        ms, tokens_per_s = (1000 * window["time"] / window["steps"],
                            window["tokens"] / window["time"])
        # this rank's share of the work
        mfu = window["flops"] / window["time"] / self.peak if self.peak else None
        record = dict(step=step, loss=stats["loss"], lr=stats["lr"], grad_norm=stats["grad_norm"],
                      ms_per_step=ms, tokens_per_s=tokens_per_s, mfu=mfu,
                      peak_memory_mib=peak_memory_mib(self.device), dataset=dataset,
                      truncated=window["truncated"])
        # --compile: graphs compiled so far; growth after the first steps is recompilation
        # (compiled.py's bound).
        if self.config["compile"]:
            record["compiled"] = compile_counts()
        compiled = f" | graphs {record['compiled']['graphs']}" if "compiled" in record else ""
        # Texts longer than --max-length, cut since the last line (evaluate warns of the same)
        compiled += f" | truncated {window['truncated']}" if window["truncated"] else ""
        append_log(Path(self.config["out"]), record)
        if rank() == 0:
            self.progress.write(f"step {step:5d}/{self.config['steps']} | loss {stats['loss']:.4f} "
                                f"| lr {stats['lr']:.2e} | grad norm {stats['grad_norm']:.3f} | "
                                f"{ms:.0f} ms/step | {tokens_per_s:,.0f} tok/s | mfu "
                                f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | mem "
                                f"{record['peak_memory_mib']:,.0f} MiB | {dataset}{compiled}")
        self.window = dict(time=0.0, steps=0, tokens=0, flops=0.0, truncated=0)

    def close(self):
        self.progress.close()
        if self.truncated and rank() == 0:
            log.warning("training truncated %d texts longer than --max-length %d", self.truncated,
                        self.config["max_length"])
