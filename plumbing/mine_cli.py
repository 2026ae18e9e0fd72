"""mine.py's command line, read when you need it: the flags, what they name (the dataset and its
query instruction, the kind of teacher, an NV-Embed teacher loaded as the other commands load one),
and the training file and statistics written from the mined negatives. Mining itself: mine.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evaluate import INSTRUCTIONS
from plumbing.builtin import builtin_dataset
from plumbing.datafiles import SkipReport, load_beir
from plumbing.model_folders import is_saved
from plumbing.released import is_released
from plumbing.errors import ArgumentParser, UsageError, add_verbosity_flags
from plumbing.evaluate_cli import resolve_instruction
from plumbing.loading import load_for_command
from plumbing.training_files import beir_training_examples, write_training_file
from pooling import POOLINGS


def build_parser(description: str) -> argparse.ArgumentParser:
    """mine.py's flags; `description`: its docstring, shown as it is written."""
    p = ArgumentParser(description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="teacher: 'bm25' (lexical), a sentence-transformers folder (with "
                        "modules.json; the st extra), a saved NV-Embed folder (e.g. "
                        "runs/stage1/model, mining a second round), HF folder, .gguf or preset")
    p.add_argument("--pooling", default=None, choices=tuple(POOLINGS),
                   help="base models only (default mean)")
    p.add_argument("--causal", action="store_true", default=None,
                   help="base models only: keep the causal mask")
    p.add_argument("--data", default="builtin", help="a BEIR folder, or 'builtin' (default)")
    p.add_argument("--split", default="train",
                   help="qrels split whose queries get negatives (default train)")
    p.add_argument("--instruction", default=None,
                   help="query instruction (default: the dataset's known one)")
    p.add_argument("--teacher-instruction", default=None,
                   help="the teacher's query instruction (default: --instruction for an NV-Embed "
                        "teacher, none for a sentence-transformers folder)")
    p.add_argument("--out", default="runs/mined/train.jsonl",
                   help="training file to write (.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--top-k", type=int, default=30,
                   help="negatives kept per query, hardest first (default 30)")
    p.add_argument("--margin", type=float, default=0.95,
                   help="drop candidates above margin x positive score")
    p.add_argument("--depth", type=int, default=100,
                   help="candidates searched per query (default 100)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_verbosity_flags(p)
    return p


def mining_data(args: argparse.Namespace) -> tuple:
    """(corpus, queries, qrels, instruction) of --data's --split: the built-in dataset's, or a BEIR
    folder's with NV-Embed-v2's instruction for a known name (--instruction: the user's). An
    existing --out without --overwrite is refused first; a folder of another name without
    --instruction as evaluate.py refuses it (every row of the training file carries the
    instruction: an empty one written silently trains another task than the one evaluated)."""
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} already exists; pass --overwrite to replace it")
    _, instruction = resolve_instruction(args.data, args.instruction, INSTRUCTIONS)
    if args.data == "builtin":
        corpus, queries, qrels = builtin_dataset().split(args.split)
    else:
        corpus, queries, qrels = load_beir(args.data, args.split)
    return corpus, queries, qrels, instruction


def teacher_kind(args: argparse.Namespace) -> str:
    """What --model names: 'bm25', 'sentence-transformers' (a folder with modules.json) or
    'nvembed' (a saved, released or base model, `nvembed_teacher`)."""
    if args.model == "tfidf":
        raise UsageError("--model tfidf is gone: the lexical teacher is now --model bm25")
    if args.model == "bm25":
        return "bm25"
    # NV-Embed-v2's released folder has a modules.json too, and a layout="hf" folder a guard one
    # (sentence-transformers refuses it): both are NV-Embed models.
    if (Path(args.model) / "modules.json").is_file() and not (is_released(args.model)
                                                              or is_saved(args.model)):
        if args.pooling is not None or args.causal is not None or args.dtype is not None:
            raise UsageError("--pooling, --causal and --dtype are for NV-Embed base models, not a "
                             "sentence-transformers folder")
        return "sentence-transformers"
    return "nvembed"


def nvembed_teacher(args: argparse.Namespace, device: str):
    """--model as evaluate.py reads it (plumbing/loading.load_for_command)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_for_command(args.model, pooling=args.pooling, causal=args.causal,
                            max_length=args.max_length, dtype=dtype, device=device)


def write_mined(args: argparse.Namespace, corpus, queries, qrels, negatives, instruction: str,
                stats: dict) -> tuple[Path, dict]:
    """--out, a training file in datafiles.py's schema, and its statistics beside it
    (NAME.stats.json, also printed)."""
    out, report = Path(args.out), SkipReport()
    examples = beir_training_examples(corpus, queries, qrels, negatives, instruction, report=report)
    write_training_file(out, examples)
    stats |= dict(examples=len(examples), model=args.model, data=args.data, split=args.split,
                  instruction=instruction, not_made_into_examples=report.total)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    print(f"wrote {len(examples)} examples to {out}")
    return out, stats
