"""`python data.py check-beir FOLDER SPLIT [--skip-bad]` and `python data.py check-train FILE
[--skip-bad]`: read a file as evaluation or training would, and print its counts (data.py calls
`main`). Tests: tests/test_data.py, tests/test_errors.py.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Sequence

from plumbing.datafiles import load_beir
from plumbing.errors import add_verbosity_flags, configure_logging, exits_on_user_error
from plumbing.training_files import read_training_file


def check_beir(folder: str | Path, split: str, skip_bad: bool = False) -> None:
    corpus, queries, qrels = load_beir(folder, split, skip_bad=skip_bad)
    print(f"{folder} ({split}): {len(corpus)} documents, {len(queries)} queries, "
          f"{sum(len(d) for d in qrels.values())} judgements")


def check_training_file(path: str | Path, skip_bad: bool = False) -> None:
    examples = read_training_file(path, skip_bad=skip_bad)
    print(f"{path}: {len(examples)} examples, task types "
          f"{dict(Counter(e.task_type for e in examples))}, hard negatives per example min "
          f"{min(len(e.negatives) for e in examples)} max "
          f"{max(len(e.negatives) for e in examples)}")
    without = [e for e in examples if not e.negatives]
    if without:  # allowed by the schema, refused by training unless it asks for no hard negative
        print(f"{len(without)} example{' has' if len(without) == 1 else 's have'} no hard negative "
              f"(first: {without[0].location}); training refuses them unless --hard-negatives is 0")


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NV-Embed data: check data files (`python -m "
                                                 "plumbing.builtin OUT` writes the built-in "
                                                 "dataset).")
    commands = parser.add_subparsers(dest="command", required=True)
    check_beir_command = commands.add_parser("check-beir",
                                             help="read a BEIR folder's split and print its counts")
    check_beir_command.add_argument("folder")
    check_beir_command.add_argument("split")
    check_beir_command.add_argument("--skip-bad", action="store_true",
                                    help="skip bad records (counted) instead of failing")
    check_train = commands.add_parser("check-train",
                                      help="read a training file and print its counts")
    check_train.add_argument("path")
    check_train.add_argument("--skip-bad", action="store_true",
                             help="skip bad rows (counted) instead of failing")
    for command in (check_beir_command, check_train):
        add_verbosity_flags(command)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "check-beir":
        check_beir(args.folder, args.split, skip_bad=args.skip_bad)
    else:
        check_training_file(args.path, skip_bad=args.skip_bad)

