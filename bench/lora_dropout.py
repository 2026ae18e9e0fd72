"""LoRA's dropout on CPU: lora.LoRADropout against nn.Dropout, in the same run.

(a) the dropout alone, on the input of SmolLM2's up/gate projections in the quick
    ablation setting (32 documents x 64 tokens x 576), and of down_proj (x 1536);
(b) one LoRA training step (forward, backward, AdamW) of a SmolLM2-135M-shaped decoder
    (random weights, bf16 autocast) on 8 queries x (1 + 3) documents of 64 tokens, with
    every adapter's dropout one or the other.

    python bench/lora_dropout.py
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_step import ByteSizedTokenizer, random_batch  # noqa: E402
from lora import LoRADropout, apply_lora, mark_only_lora_trainable  # noqa: E402
from model import Mistral, MistralConfig, NVEmbed  # noqa: E402
from pooling import MeanPooling  # noqa: E402
from loss import contrastive_loss  # noqa: E402


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def use_dropout(model, cls):
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout = cls(module.lora_dropout.p)


def main():
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads")
    print(f"{'':<44}{'nn.Dropout ms':>14}{'LoRADropout ms':>15}{'speed-up':>10}")
    for width in (576, 1536):
        x = torch.randn(32, 64, width, dtype=torch.bfloat16)
        ref, ours = nn.Dropout(0.1).train(), LoRADropout(0.1).train()
        a, b = median_ms(lambda: ref(x), 20), median_ms(lambda: ours(x), 20)
        print(f"{f'(a) dropout of (32, 64, {width}) bf16':<44}{a:>14.2f}{b:>15.2f}{a / b:>10.2f}")

    config = MistralConfig.preset("smollm2-135m")
    decoder = Mistral(config)
    model = NVEmbed(decoder, MeanPooling(), ByteSizedTokenizer(config.vocab_size), "mean")
    apply_lora(model.decoder, rank=16, alpha=32, dropout=0.1)
    mark_only_lora_trainable(model.decoder)
    model.decoder.to(torch.bfloat16)  # the frozen base in bf16, as the ablation's model_dtype
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    queries = random_batch(8, 64, config.vocab_size, "cpu", generator)
    documents = random_batch(32, 64, config.vocab_size, "cpu", generator)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = contrastive_loss(model(queries), model(documents), doc_keys=torch.arange(32),
                                    temperature=0.01, in_batch_negatives=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {}
    for _ in range(3):  # alternate, so both see the same machine load
        for cls in (nn.Dropout, LoRADropout):
            use_dropout(model, cls)
            times.setdefault(cls.__name__, []).append(median_ms(step, 1))
    a, b = statistics.median(times["Dropout"]), statistics.median(times["LoRADropout"])
    print(f"{'(b) SmolLM2-135M LoRA training step':<44}{a:>14.0f}{b:>15.0f}{a / b:>10.2f}")


if __name__ == "__main__":
    main()
