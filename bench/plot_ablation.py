"""Draw an ablation table (bench/ablate.py's JSON) as PNG pictures.

    python bench/plot_ablation.py bench/history/ablation-full.json
        # -> bench/history/ablation-full.png, ...
    python bench/plot_ablation.py --runs runs/stage1 runs/other
        # -> curves.png: loss and nDCG@10 per step

- ablation-SETTING.png: SciFact test nDCG@10 per pooling, causal beside bidirectional,
  trained (solid: the seeds' mean, each seed a dot) over zero-shot (pale), with BM25's
  published 0.665 as a line; the rows at the setting's own steps and learning rate.
- loss-SETTING.png: each trained row's logged training loss against the step.
- steps-SETTING.png (where rows of more than one length were measured): latent pooling's
  nDCG@10 against the training steps, bidirectional beside causal, each seed a dot, the
  line through the seeds' means, the bar +-1 standard deviation between seeds.
- curves.png (--runs): for train.py run folders, the logged loss beside the nDCG@10 of the
  evaluations before, during (train.py --eval-every N) and after training, against the step.

Needs matplotlib, which nothing else in the project uses, so it is not a requirement:
`pip install matplotlib` to redraw the committed pictures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POOLING_ORDER = ("eos", "mean", "latent", "self-attention")
ATTENTION_COLOURS = {"causal": "tab:orange", "bidirectional": "tab:blue"}
POOLING_COLOURS = {"eos": "tab:red", "mean": "tab:green", "latent": "tab:blue",
                   "self-attention": "tab:purple"}
BM25_SCIFACT_NDCG10 = 0.665  # PAPER.md section 6


def read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    for key in ("setting", "config", "rows"):
        if key not in table:
            raise ValueError(f"{path}: no {key!r} field; is this bench/ablate.py's ablation.json?")
    for i, row in enumerate(table["rows"]):
        missing = {"pooling", "attention", "trained", "ndcg@10"} - set(row)
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks {sorted(missing)}")
    # Tables since the runner kept zero-shot rows apart and gave each row its schedule: one list,
    # each row with its steps and lr (an older table's are its setting's).
    config = table["config"]
    table["rows"] = [dict(row, steps=row.get("steps", config.get("steps")),
                          lr=row.get("lr", config.get("lr")))
                     for row in table["rows"] + [dict(r, trained=False)
                                                 for r in table.get("zero_shot", [])]]
    if "hardware" not in table:
        table["hardware"] = ", ".join(sorted({r["gpu"] or r["cpu"] for r in table["rows"]
                                              if r.get("cpu")})) or "hardware not recorded"
    return table


def at_setting(table: dict) -> list[dict]:
    """The rows trained at the setting's own steps and lr, and the zero-shot rows."""
    config = table["config"]
    return [r for r in table["rows"] if not r["trained"]
            or (r["steps"], r["lr"]) == (config.get("steps"), config.get("lr"))]


def bar_chart(table: dict, out: Path):
    import matplotlib.pyplot as plt

    seeds = {}
    for r in at_setting(table):  # the trained rows of one configuration: one per seed
        if r.get("teacher", "bm25") == "bm25":
            seeds.setdefault((r["pooling"], r["attention"], r["trained"]), []).append(r["ndcg@10"])
    by = {key: sum(values) / len(values) for key, values in seeds.items()}
    poolings = [p for p in POOLING_ORDER if any(key[0] == p for key in by)]
    width = 0.38
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (attention, colour) in enumerate(ATTENTION_COLOURS.items()):
        x_of = {p: i + (j - 0.5) * width for i, p in enumerate(poolings)}
        for trained, style in ((True, dict(width=width, color=colour,
                                           label=f"{attention}, trained")),
                               (False, dict(width=width * 0.6, color="white", edgecolor=colour,
                                            hatch="//", label=f"{attention}, zero-shot"))):
            # a row not run draws no bar
            present = [p for p in poolings if (p, attention, trained) in by]
            if present:
                ax.bar([x_of[p] for p in present], [by[p, attention, trained] for p in present],
                       **style)
        for p in poolings:
            if (p, attention, True) in by:
                values = seeds[p, attention, True]
                ax.plot([x_of[p]] * len(values), values, "k.", markersize=3)  # each seed
                ax.text(x_of[p], max(values) + 0.01, f"{by[p, attention, True]:.3f}", ha="center",
                        fontsize=7)
    ax.axhline(BM25_SCIFACT_NDCG10, color="grey", linestyle="--", linewidth=1)
    ax.text(len(poolings) - 0.5, BM25_SCIFACT_NDCG10 + 0.01, "BM25 0.665", ha="right", fontsize=8,
            color="grey")
    ax.set_xticks(range(len(poolings)), poolings)
    ax.set_ylabel("SciFact test nDCG@10")
    ax.set_ylim(0, max(0.75, max(by.values()) + 0.08))
    model = Path(table.get("model", "model not recorded")).name
    ax.set_title(f"{model} + LoRA, stage 1, setting '{table['setting']}' ({table['hardware']})",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def loss_curves(table: dict, out: Path):
    import matplotlib.pyplot as plt

    rows = [r for r in at_setting(table) if r["trained"] and r.get("loss_curve")]
    if not rows:
        raise ValueError("no trained row has a loss_curve (written by bench/ablate.py since it "
                         "logs them)")
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
    ax.set_title(f"Training loss, setting '{table['setting']}': {c['steps']} steps of "
                 f"{c['batch_size']} queries, {c['hard_negatives']} hard negatives, "
                 f"{c['max_length']} tokens, lr {c['lr']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def steps_curve(table: dict, out: Path) -> bool:
    """Latent pooling's nDCG@10 against the steps trained (BM25 negatives, the setting's lr), one
    line per attention; False (nothing drawn) when only one length was measured."""
    import matplotlib.pyplot as plt

    config = table["config"]
    rows = [r for r in table["rows"] if r["trained"] and r["pooling"] == "latent"
            and r.get("teacher", "bm25") == "bm25" and r["lr"] == config.get("lr")]
    if len({r["steps"] for r in rows}) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for attention, colour in ATTENTION_COLOURS.items():
        by_steps = {}
        for r in rows:
            if r["attention"] == attention:
                by_steps.setdefault(r["steps"], []).append(r["ndcg@10"])
        if not by_steps:
            continue
        steps = sorted(by_steps)
        means = [sum(by_steps[s]) / len(by_steps[s]) for s in steps]
        spread = [(sum((v - m) ** 2 for v in by_steps[s]) / max(1, len(by_steps[s]) - 1)) ** 0.5
                  for s, m in zip(steps, means)]
        shift = 1.03 if attention == "causal" else 1 / 1.03  # side by side on the log axis
        ax.errorbar([s * shift for s in steps], means, yerr=spread, color=colour, marker="o",
                    capsize=3,
                    label=f"{attention} (seeds: {', '.join(str(len(by_steps[s])) for s in steps)})")
        for s in steps:
            ax.plot([s * shift] * len(by_steps[s]), by_steps[s], ".", color=colour, alpha=0.5)
    ax.set_xscale("log")
    measured = sorted({r["steps"] for r in rows})
    ax.set_xticks(measured, [str(s) for s in measured])
    ax.minorticks_off()
    ax.set_xlabel(f"training steps ({config['batch_size']} queries each; warm-up "
                  f"{config['warmup_steps'] / config['steps']:.0%} of the steps, then linear "
                  "decay)")
    ax.set_ylabel("SciFact test nDCG@10")
    ax.set_title(f"Latent pooling, BM25 negatives, lr {config['lr']:g}: bidirectional against "
                 f"causal ({table['hardware']})", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


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
        raise ValueError(f"{log_file}: no evaluation logged (train.py without --no-eval; "
                         "--eval-every N for a curve)")
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
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="*", type=Path,
                   help="ablation JSON files written by bench/ablate.py")
    p.add_argument("--runs", nargs="+", type=Path, default=[],
                   help="train.py run folders: curves.png")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the PNGs (default: each JSON's folder; for --runs, the first "
                        "run's)")
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
        for name, draw in ((f"ablation-{table['setting']}.png", bar_chart),
                           (f"loss-{table['setting']}.png", loss_curves),
                           (f"steps-{table['setting']}.png", steps_curve)):
            if draw(table, folder / name) is not False:
                print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
