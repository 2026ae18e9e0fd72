"""evaluate.py's command line, read when you need it: the flags, the default model, and the query
instruction of a dataset (the built-in one's, NV-Embed-v2's for a known BEIR folder, or the user's:
never a silent none); then the model and the data loaded (`prepare`), and the table printed and the
files written (`write_results`). evaluate.py's `main` runs the evaluation between the two; this
module does not import evaluate.py."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from model import PRESETS, NVEmbed
from plumbing.builtin import builtin_dataset
from plumbing.model_folders import is_saved
from plumbing.compiled import compile_counts
from plumbing.datafiles import format_table, load_beir, write_trec
from plumbing.distributed import init_distributed, print0, rank, world_size
from plumbing.loading import load_for_command
from plumbing.released import is_released

from plumbing.builtin import BUILTIN_INSTRUCTION
from plumbing.errors import (ArgumentParser, MissingFileError, UsageError, add_verbosity_flags,
                             configure_logging, exits_on_user_error)
from pooling import POOLINGS

log = logging.getLogger("nvembed.evaluate")  # notices: errors.py

DEFAULT_MODELS = ("runs/stage2/model", "runs/stage1/model")  # what `train.py --stage 2 / 1` writes


def _parse_k_values(text):
    try:
        k_values = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got "
                                         f"{text!r}") from None
    if not k_values or min(k_values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(k_values)))


def _positive_int(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(text)


def build_parser(instructions: Mapping[str, str],
                 default_k_values: tuple[int, ...]) -> argparse.ArgumentParser:
    parser = ArgumentParser(  # said once under torchrun (errors.py)
        description="Evaluate an NV-Embed model on a BEIR dataset the way BEIR does (exact "
                    "search, trec_eval metrics). With no flags: the built-in dataset's test split "
                    "with runs/stage{2,1}/model if train.py wrote one, else a fresh random tiny "
                    "model.")
    parser.add_argument("--model", help="a saved NV-Embed folder (train.py's runs/stageN/model), "
                                        "or for a zero-shot baseline a base checkpoint: an HF "
                                        "folder, a .gguf file or a preset name ('tiny'). Default: "
                                        "runs/stage2/model, runs/stage1/model, else 'tiny'")
    parser.add_argument("--data", default="builtin",
                        help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or "
                             "'builtin' (default)")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--instruction", default=None,
                        help="the task instruction for the queries (documents get none). Default: "
                             "the built-in dataset's, or NV-Embed-v2's for a known BEIR folder "
                             f"name ({', '.join(sorted(instructions))}); any other folder needs "
                             "one ('' for none)")
    parser.add_argument("--pooling", default=None, choices=tuple(POOLINGS),
                        help="base checkpoints only (default mean). mean and eos have no weights, "
                             "so an untrained baseline measures the decoder alone")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--causal", dest="causal", action="store_const", const=True,
                           default=None,
                           help="base checkpoints only: keep the decoder's causal mask")
    attention.add_argument("--bidirectional", dest="causal", action="store_const", const=False,
                           help="base checkpoints only: remove the causal mask, as NV-Embed does "
                                "(default)")
    parser.add_argument("--max-length", type=_positive_int, default=None,
                        help="tokens per text, truncating the text (default: the model's, 512 for "
                             "a base)")
    parser.add_argument("--batch-size", type=_positive_int, default=32,
                        help="texts per forward pass (default 32)")
    parser.add_argument("--top-k", type=_positive_int, default=1000,
                        help="documents kept per query (default 1000, BEIR's)")
    parser.add_argument("--k-values", type=_parse_k_values, default=default_k_values,
                        help="metric cutoffs, comma-separated (default "
                             f"{','.join(map(str, default_k_values))})")
    identical = parser.add_mutually_exclusive_group()
    identical.add_argument("--ignore-identical-ids", dest="ignore_identical_ids",
                           action="store_true", default=True,
                           help="drop a document whose id is the query's from its ranking, as "
                                "BEIR does by default (ArguAna, Quora: queries that are corpus "
                                "documents). mteb's default is off; its tasks turn it on one by "
                                "one (default: on)")
    identical.add_argument("--keep-identical-ids", dest="ignore_identical_ids",
                           action="store_false",
                           help="score a document with the query's id as any other (mteb's "
                                "default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights' dtype (default: a saved model's own, float32 for a base)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder's layers and the pooling "
                             "(NVEmbed.compile; dynamic shapes: batches of other lengths reuse "
                             "the graphs)")
    parser.add_argument("--out", default=None,
                        help="folder for DATASET-SPLIT.json (metrics) and DATASET-SPLIT.trec (the "
                             "run). Default: MODEL/eval for a saved model, "
                             "runs/eval/NAME-POOLING-ATTENTION for a base")
    parser.add_argument("--run-name", default=None,
                        help="the TREC run name column (default: nvembed-MODELNAME)")
    parser.add_argument("--per-query", action="store_true",
                        help="also write each query's metrics, OUT/DATASET-SPLIT.per_query.json "
                             "(significance.py compares two such files)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_verbosity_flags(parser)
    return parser


def resolve_instruction(data: str, given: str | None,
                        instructions: Mapping[str, str]) -> tuple[str, str]:
    """(dataset name, query instruction) for --data and --instruction. A folder whose name has no
    known instruction needs --instruction: a renamed copy of SciFact would otherwise be encoded bare
    and score low with no error."""
    if data == "builtin":
        return "builtin", BUILTIN_INSTRUCTION if given is None else given
    if not Path(data).is_dir():  # before any word on its name's instruction
        raise MissingFileError(f"--data {data}: no such folder (want a BEIR folder: corpus.jsonl, "
                               "queries.jsonl, qrels/SPLIT.tsv, or 'builtin')")
    name = Path(data).resolve().name
    if given is not None:
        return name, given
    if name.lower() not in instructions:
        raise UsageError(f"--data {data}: no instruction known for a folder named {name!r} (known: "
                         f"{', '.join(sorted(instructions))}); pass --instruction TEXT, or "
                         "--instruction '' for none")
    return name, instructions[name.lower()]


# ----------------------------------------------------------------------------
# The command (`python evaluate.py`, evaluate.main): prints a BEIR-style table, writes the metrics
# (JSON) and the run (TREC format).


@dataclass
class EvaluationJob:
    """What the command scores, with what settings, and where it writes."""

    args: argparse.Namespace  # the flags
    model: NVEmbed
    corpus: dict
    queries: dict
    qrels: dict
    dataset_name: str
    instruction: str
    max_length: int
    config: dict  # printed at the start, saved with the metrics
    out: Path
    metrics_file: Path
    run_file: Path
    per_query_file: Path


def prepare(argv, instructions: Mapping[str, str],
            default_k_values: tuple[int, ...]) -> EvaluationJob:
    """The flags read and checked, the output files free (or --overwrite), the model and the split
    loaded, the configuration printed. Under torchrun every rank loads the model
    (`init_distributed`)."""
    parser = build_parser(instructions, default_k_values)  # the flags: above
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    # Which model: a saved NV-Embed (from train.py) or a base decoder with a fresh pooling.
    model_spec = args.model
    if model_spec is None:
        model_spec = next((path for path in DEFAULT_MODELS if is_saved(path)), "tiny")
        print0("model: " + (f"{model_spec} (trained by train.py)" if model_spec != "tiny" else
                            "a fresh tiny model with random weights (no runs/stage{1,2}/model "
                            "found: run `torchrun train.py --stage 1` to train one); expect "
                            "scores near chance"))
    # load_for_command (below, after the cheap checks) refuses a --model not found, and base-only
    # flags for a saved one.
    saved = is_saved(model_spec)
    pooling = args.pooling or "mean"
    causal = bool(args.causal)
    dataset_name, instruction = resolve_instruction(args.data, args.instruction, instructions)
    # Where the results go; refuse to overwrite before any expensive work.
    model_name = Path(model_spec).name if model_spec not in PRESETS else model_spec
    if args.out is not None:
        out = Path(args.out)
    elif saved:
        out = Path(model_spec) / "eval"
    elif is_released(model_spec):  # not inside NVIDIA's folder: it is a copy of their repository
        out = Path("runs") / "eval" / Path(model_name).stem
    else:
        out = Path("runs") / "eval" / (f"{Path(model_name).stem}-{pooling}-"
                                       f"{'causal' if causal else 'bidirectional'}")
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # found now, not by mkdir after the evaluation (a traceback)
        what = "" if blocked == out else f"{blocked} is "
        raise UsageError(f"--out {out}: {what}a file, not a folder (the results are written in it)")
    stem = f"{dataset_name}-{args.split}"
    metrics_file, run_file, per_query_file = (out / f"{stem}.json", out / f"{stem}.trec",
                                              out / f"{stem}.per_query.json")
    existing = [str(p)
                for p in (metrics_file, run_file, *([per_query_file] if args.per_query else []))
                if p.exists()]
    if existing and not args.overwrite:
        parser.error(f"{' and '.join(existing)} already exist; pass --overwrite to replace them or "
                     "--out elsewhere")
    run_name = args.run_name or "nvembed-" + "_".join(Path(model_name).stem.split())
    device = init_distributed(args.device)  # this rank's device; a process group under torchrun
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_for_command(model_spec, pooling=args.pooling, causal=args.causal,
                             max_length=args.max_length, dtype=dtype, device=device)
    if args.compile:
        model.compile()
    if args.data == "builtin":
        corpus, queries, qrels = builtin_dataset().split(args.split)
    else:
        corpus, queries, qrels = load_beir(args.data, args.split)
    max_length = args.max_length or model.max_length
    # the model's name and fingerprint say which weights scored (a folder's name alone may not)
    config = dict(
        model=str(model_spec), name=model.name, fingerprint=model.fingerprint(),
        model_kind=("saved NV-Embed" if saved else "released NV-Embed" if is_released(model_spec)
                    else "base (zero-shot)"),
        pooling=model.pooling_name, causal=model.causal, data=args.data, split=args.split,
        instruction=instruction, max_length=max_length, batch_size=args.batch_size,
        top_k=args.top_k,
        k_values=list(args.k_values),
        dtype=str(model.decoder.embed_tokens.weight.dtype).removeprefix("torch."),
        device=str(device), ranks=world_size(), num_queries=len(qrels), num_documents=len(corpus),
        run_name=run_name, ignore_identical_ids=args.ignore_identical_ids, compile=args.compile,
    )
    print0("configuration:\n" + "\n".join(f"  {key}: {value}" for key, value in config.items()))
    if args.top_k < max(args.k_values) and rank() == 0:
        log.warning("note: --top-k %d < largest k %d: metrics beyond it see a truncated run",
                    args.top_k, max(args.k_values))
    return EvaluationJob(args, model, corpus, queries, qrels, dataset_name, instruction, max_length,
                         config, out, metrics_file, run_file, per_query_file)


def write_results(job: EvaluationJob, metrics: dict, run: dict, seconds: float) -> None:
    """Rank 0: the table printed, the metrics (JSON) and the run (TREC) written."""
    args = job.args
    print(f"\n{job.dataset_name} ({args.split}): {len(run)} queries, {len(job.corpus)} documents, "
          f"{seconds:.1f} s ({(len(run) + len(job.corpus)) / seconds:.0f} texts/s)")
    print(format_table(metrics))
    if args.compile:
        print("torch.compile: " + ", ".join(f"{key} {value}"
                                            for key, value in compile_counts().items()))
    job.out.mkdir(parents=True, exist_ok=True)
    job.metrics_file.write_text(json.dumps(dict(metrics=metrics, config=job.config,
                                                seconds=seconds), indent=2)
                                + "\n")
    write_trec(run, job.run_file, job.config["run_name"])
    print(f"wrote {job.metrics_file} and {job.run_file}")


def write_per_query(job: EvaluationJob, per_query: dict) -> None:
    """Rank 0, --per-query: each query's metrics (significance.py compares two such files)."""
    job.per_query_file.write_text(json.dumps(dict(per_query=per_query, config=job.config),
                                             indent=1) + "\n")
    print(f"wrote {job.per_query_file}")
