"""Draw an ablation table (bench/ablate.py's JSON) as two PNG pictures.

    python bench/plot_ablation.py bench/history/ablation-full.json   # -> bench/history/ablation-full.png, ...
    python bench/plot_ablation.py --runs runs/stage1 runs/other  # -> curves.png: loss and nDCG@10 per step

- ablation-SETTING.png: SciFact test nDCG@10 per pooling, causal beside bidirectional,
  trained (solid) over zero-shot (pale), with BM25's published 0.665 as a line.
- loss-SETTING.png: each trained row's logged training loss against the step.
- curves.png (--runs): for train.py run folders, the logged loss beside the nDCG@10 of the evaluations before,
  during (train.py --eval-every N) and after training, against the step.

Needs matplotlib, which nothing else in the project uses, so it is not a requirement:
`pip install matplotlib` to redraw the committed pictures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POOLING_ORDER = ("eos", "mean", "latent", "self-attention")
ATTENTION_COLOURS = {"causal": "tab:orange", "bidirectional": "tab:blue"}
POOLING_COLOURS = {"eos": "tab:red", "mean": "tab:green", "latent": "tab:blue", "self-attention": "tab:purple"}
BM25_SCIFACT_NDCG10 = 0.665  # PAPER.md section 6


def read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    for key in ("setting", "config", "rows", "hardware"):
        if key not in table:
            raise ValueError(f"{path}: no {key!r} field; is this bench/ablate.py's ablation.json?")
    for i, row in enumerate(table["rows"]):
        missing = {"pooling", "attention", "trained", "ndcg@10"} - set(row)
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks {sorted(missing)}")
    return table


def bar_chart(table: dict, out: Path):
    import matplotlib.pyplot as plt

    by = {(r["pooling"], r["attention"], r["trained"]): r["ndcg@10"] for r in table["rows"]}
    poolings = [p for p in POOLING_ORDER if any(key[0] == p for key in by)]
    width = 0.38
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (attention, colour) in enumerate(ATTENTION_COLOURS.items()):
        x_of = {p: i + (j - 0.5) * width for i, p in enumerate(poolings)}
        for trained, style in ((True, dict(width=width, color=colour, label=f"{attention}, trained")),
                               (False, dict(width=width * 0.6, color="white", edgecolor=colour, hatch="//",
                                            label=f"{attention}, zero-shot"))):
            present = [p for p in poolings if (p, attention, trained) in by]  # a row not run draws no bar
            if present:
                ax.bar([x_of[p] for p in present], [by[p, attention, trained] for p in present], **style)
        for p in poolings:
            if (p, attention, True) in by:
                ax.text(x_of[p], by[p, attention, True] + 0.01, f"{by[p, attention, True]:.3f}", ha="center",
                        fontsize=7)
    ax.axhline(BM25_SCIFACT_NDCG10, color="grey", linestyle="--", linewidth=1)
    ax.text(len(poolings) - 0.5, BM25_SCIFACT_NDCG10 + 0.01, "BM25 0.665", ha="right", fontsize=8, color="grey")
    ax.set_xticks(range(len(poolings)), poolings)
    ax.set_ylabel("SciFact test nDCG@10")
    ax.set_ylim(0, max(0.75, max(by.values()) + 0.08))
    model = Path(table.get("model", "model not recorded")).name
    ax.set_title(f"{model} + LoRA, stage 1, setting '{table['setting']}' ({table['hardware']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def loss_curves(table: dict, out: Path):
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["trained"] and r.get("loss_curve")]
    if not rows:
        raise ValueError("no trained row has a loss_curve (written by bench/ablate.py since it logs them)")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, losses = zip(*r["loss_curve"])
        ax.plot(steps, losses, color=POOLING_COLOURS[r["pooling"]],
                linestyle="-" if r["attention"] == "bidirectional" else ":", marker=".",
                label=f"{r['pooling']}, {r['attention']}")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss (the logged step's batch)")
    ax.set_yscale("log")
    c = table["config"]
    ax.set_title(f"Training loss, setting '{table['setting']}': {c['steps']} steps of {c['batch_size']} queries, "
                 f"{c['hard_negatives']} hard negatives, {c['max_length']} tokens, lr {c['lr']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run_curves(folder: Path) -> dict:
    """A train.py run's log.jsonl as {"loss": [(step, loss)], "ndcg": [(step, nDCG@10)]}."""
    log_file = folder / "log.jsonl"
    if not log_file.is_file():
        raise ValueError(f"{log_file}: not found; is {folder} a train.py run folder (--out)?")
    curves = dict(loss=[], ndcg=[])
    for number, line in enumerate(log_file.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{log_file}:{number}: not JSON ({e})") from None
        if record.get("event") == "eval":
            curves["ndcg"].append((record["step"], record["NDCG@10"]))
        elif "loss" in record:
            curves["loss"].append((record["step"], record["loss"]))
    if not curves["ndcg"]:
        raise ValueError(f"{log_file}: no evaluation logged (train.py without --no-eval; --eval-every N for a curve)")
    return curves


def training_curves(folders: list[Path], out: Path):
    import matplotlib.pyplot as plt

    fig, (loss_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for folder in folders:
        curves = run_curves(folder)
        for ax, key in ((loss_ax, "loss"), (ndcg_ax, "ndcg")):
            if curves[key]:
                ax.plot(*zip(*curves[key]), marker=".", label=folder.name)
    loss_ax.set(xlabel="step", ylabel="InfoNCE loss (the logged step's batch)", yscale="log")
    ndcg_ax.set(xlabel="step", ylabel="nDCG@10 (the run's evaluation set)")
    for ax in (loss_ax, ndcg_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="*", type=Path, help="ablation JSON files written by bench/ablate.py")
    p.add_argument("--runs", nargs="+", type=Path, default=[], help="train.py run folders: curves.png")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the PNGs (default: each JSON's folder; for --runs, the first run's)")
    args = p.parse_args(argv)
    if not args.tables and not args.runs:
        p.error("give ablation JSON files, or --runs with train.py run folders")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
    except ImportError:
        p.error("needs matplotlib: pip install matplotlib")
    if args.runs:
        folder = args.out or args.runs[0]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            training_curves(args.runs, folder / "curves.png")
        except ValueError as error:
            p.error(str(error))
        print(f"wrote {folder / 'curves.png'}")
    for path in args.tables:
        table = read_table(path)
        folder = args.out or path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for name, draw in ((f"ablation-{table['setting']}.png", bar_chart), (f"loss-{table['setting']}.png",
                                                                               loss_curves)):
            draw(table, folder / name)
            print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
