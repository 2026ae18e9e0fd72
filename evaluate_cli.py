"""evaluate.py's command line, read when you need it: the flags, the default model, and the query instruction of a
dataset (the built-in one's, NV-Embed-v2's for a known BEIR folder, or the user's: never a silent none)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from builtin import BUILTIN_INSTRUCTION
from errors import ArgumentParser, MissingFileError, UsageError, add_verbosity_flags

DEFAULT_MODELS = ("runs/stage2/model", "runs/stage1/model")  # what `train.py --stage 2 / 1` writes


def _parse_k_values(text):
    try:
        k_values = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not k_values or min(k_values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(sorted(set(k_values)))


def _positive_int(text):
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return int(text)


def build_parser(instructions: Mapping[str, str], default_k_values: tuple[int, ...]) -> argparse.ArgumentParser:
    parser = ArgumentParser(  # said once under torchrun (errors.py)
        description="Evaluate an NV-Embed model on a BEIR dataset the way BEIR does (exact search, trec_eval "
                    "metrics). With no flags: the built-in dataset's test split with runs/stage{2,1}/model if "
                    "train.py wrote one, else a fresh random tiny model.")
    parser.add_argument("--model", help="a saved NV-Embed folder (train.py's runs/stageN/model), or for a zero-shot "
                                        "baseline a base checkpoint: an HF folder, a .gguf file or a preset name "
                                        "('tiny'). Default: runs/stage2/model, runs/stage1/model, else 'tiny'")
    parser.add_argument("--data", default="builtin",
                        help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or 'builtin' (default)")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--instruction", default=None,
                        help="the task instruction for the queries (documents get none). Default: the built-in "
                             "dataset's, or NV-Embed-v2's for a known BEIR folder name "
                             f"({', '.join(sorted(instructions))}); any other folder needs one ('' for none)")
    parser.add_argument("--pooling", default=None, choices=("mean", "eos", "latent", "self-attention"),
                        help="base checkpoints only (default mean). mean and eos have no weights, so an untrained "
                             "baseline measures the decoder alone")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--causal", dest="causal", action="store_const", const=True, default=None,
                           help="base checkpoints only: keep the decoder's causal mask")
    attention.add_argument("--bidirectional", dest="causal", action="store_const", const=False,
                           help="base checkpoints only: remove the causal mask, as NV-Embed does (default)")
    parser.add_argument("--max-length", type=_positive_int, default=None,
                        help="tokens per text, truncating the text (default: the model's, 512 for a base)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--top-k", type=_positive_int, default=1000,
                        help="documents kept per query (default 1000, BEIR's)")
    parser.add_argument("--k-values", type=_parse_k_values, default=default_k_values,
                        help=f"metric cutoffs, comma-separated (default {','.join(map(str, default_k_values))})")
    identical = parser.add_mutually_exclusive_group()
    identical.add_argument("--ignore-identical-ids", dest="ignore_identical_ids", action="store_true", default=True,
                           help="drop a document whose id is the query's from its ranking, as BEIR does by default "
                                "(ArguAna, Quora: queries that are corpus documents). mteb's default is off; its "
                                "tasks turn it on one by one (default: on)")
    identical.add_argument("--keep-identical-ids", dest="ignore_identical_ids", action="store_false",
                           help="score a document with the query's id as any other (mteb's default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights' dtype (default: a saved model's own, float32 for a base)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder's layers and the pooling (NVEmbed.compile; dynamic shapes: "
                             "batches of other lengths reuse the graphs)")
    parser.add_argument("--out", default=None,
                        help="folder for DATASET-SPLIT.json (metrics) and DATASET-SPLIT.trec (the run). Default: "
                             "MODEL/eval for a saved model, runs/eval/NAME-POOLING-ATTENTION for a base")
    parser.add_argument("--run-name", default=None, help="the TREC run name column (default: nvembed-MODELNAME)")
    parser.add_argument("--per-query", action="store_true",
                        help="also write each query's metrics, OUT/DATASET-SPLIT.per_query.json (significance.py "
                             "compares two such files)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_verbosity_flags(parser)
    return parser


def resolve_instruction(data: str, given: str | None, instructions: Mapping[str, str]) -> tuple[str, str]:
    """(dataset name, query instruction) for --data and --instruction. A folder whose name has no known instruction
    needs --instruction: a renamed copy of SciFact would otherwise be encoded bare and score low with no error."""
    if data == "builtin":
        return "builtin", BUILTIN_INSTRUCTION if given is None else given
    if not Path(data).is_dir():  # before any word on its name's instruction
        raise MissingFileError(f"--data {data}: no such folder (want a BEIR folder: corpus.jsonl, queries.jsonl, "
                               "qrels/SPLIT.tsv, or 'builtin')")
    name = Path(data).resolve().name
    if given is not None:
        return name, given
    if name.lower() not in instructions:
        raise UsageError(f"--data {data}: no instruction known for a folder named {name!r} (known: "
                         f"{', '.join(sorted(instructions))}); pass --instruction TEXT, or --instruction '' for none")
    return name, instructions[name.lower()]
