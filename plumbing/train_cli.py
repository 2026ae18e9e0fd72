"""train.py's command line, read when you need it: the flags, and how a run's configuration is
resolved from them (flags left out take the saved model's value with --init-from, or the recipe's,
which train.py gives for the stage) and checked, every mistake named by its flag; then what the
flags name: the training data and the sampler, and the evaluation set. The recipes and the stage
rules are train.py's."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

import evaluate
from data import TrainDataset, encode_texts, tokenize
from model import PRESETS, MistralConfig
from plumbing import datafiles, tracking, training_files
from plumbing.builtin import builtin_dataset, builtin_sources
from plumbing.distributed import print0, world_size
from plumbing.errors import (ArgumentParser, DataError, MissingFileError, UsageError,
                             add_verbosity_flags, configure_logging)
from plumbing.loading import saved_architecture
from plumbing.mfu import choose_dtype
from plumbing.sampler import BatchSampler
from pooling import POOLINGS


def _recipe_text(recipe: dict) -> str:
    """A recipe as the help shows it: 'lr 2e-05/1.5e-05, steps 20000/18000, batch-size 128, ...'."""
    stage1, stage2 = recipe["stage1"], recipe["stage2"]
    per_stage = {key: f"{stage1[key]}/{stage2[key]}" for key in stage1}
    shared = {key: value for key, value in recipe.items() if key not in ("stage1", "stage2")}
    values = per_stage | shared
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in values.items())


def build_parser(recipes: dict) -> argparse.ArgumentParser:
    """The flags; `recipes`: train.RECIPES, shown in the help and named by --recipe."""
    p = ArgumentParser(  # said once under torchrun (errors.py)
        description="Two-stage contrastive instruction tuning of NV-Embed (PAPER.md section 4). "
                    "Run under torchrun for several ranks; flags left out take the recipe's "
                    "default (the paper's with --model, the tiny CPU job without, or "
                    "--recipe's).",
        epilog="recipe defaults (stage 1 / stage 2 where two values): " + "; ".join(
            f"{name}: {_recipe_text(recipe)}" for name, recipe in recipes.items()))
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", type=int, choices=(1, 2), default=1,
                   help="1: retrieval data, in-batch + hard negatives; 2: retrieval + "
                        "non-retrieval blend, in-batch negatives off, from a stage-1 model "
                        "(default %(default)s)")
    g.add_argument("--model", default=None,
                   help="base decoder: HF checkpoint folder, .gguf file or preset name "
                        "(model.PRESETS); default: the 'tiny' preset with the byte tokenizer")
    g.add_argument("--recipe", choices=tuple(recipes), default=None,
                   help="the defaults of every flag left out (train.RECIPES, below); "
                        "default: tiny for the tiny preset, paper for any other model")
    g.add_argument("--init-from", default=None,
                   help="start from this saved model (a run folder or its model/); stage 2 "
                        "without --model defaults to runs/stage1")
    g.add_argument("--data", nargs="+", default=None,
                   help="training data, one dataset each: .jsonl, .json, .csv or .parquet "
                        "files, folders datasets' save_to_disk wrote, or hub names; columns in "
                        "training_files.py's schema or FlagEmbedding's or tevatron's (mapped by "
                        "name) or sentence-transformers' (anchor, positive, negatives... by "
                        "position); default: plumbing/builtin.py's built-in dataset")
    g.add_argument("--data-split", default="train",
                   help="the split of --data datasets that have several (default %(default)s)")
    g.add_argument("--instruction", default=None, metavar="TEXT",
                   help="the query instruction of --data rows that have none (a table without an "
                        "instruction column, or \"\"); the log says how many got it")
    g.add_argument("--data-weights", nargs="+", type=float32_number, default=None,
                   help="sampling weight of each --data dataset, in order (default: its size)")
    g.add_argument("--pooling", choices=tuple(POOLINGS), default=None,
                   help="pooling (default latent; with --init-from, the saved model's)")
    g.add_argument("--num-latents", type=int, default=None,
                   help="latent pooling: latents (paper 512, tiny 32)")
    g.add_argument("--latent-head-dim", type=int, default=None,
                   help="latent pooling: head dim (paper: the hidden size, tiny 8)")
    mask = g.add_mutually_exclusive_group()
    mask.add_argument("--causal", dest="causal", action="store_true", default=None,
                      help="keep the decoder's causal mask (the paper's ablation)")
    mask.add_argument("--bidirectional", dest="causal", action="store_false",
                      help="remove the causal mask (the paper's choice; default)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank; 0 = full fine-tuning (paper 16)")
    g.add_argument("--lora-alpha", type=float32_number, default=32.0,
                   help="LoRA alpha (default %(default)s)")
    g.add_argument("--lora-dropout", type=float32_number, default=0.1,
                   help="LoRA dropout (default %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (paper ~20k / 18k)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch: queries per step, all ranks")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step, each its own softmax: fewer negatives, "
                        "another loss; --grad-cache keeps the loss (default %(default)s)")
    g.add_argument("--grad-cache", type=int, default=0, metavar="CHUNK",
                   help="GradCache: embed CHUNK texts per forward pass, the whole batch in one "
                        "softmax, the paper's loss at any batch size for one more forward "
                        "(default 0: off)")
    g.add_argument("--hard-negatives", type=int, default=None,
                   help="hard negatives per query (paper 7)")
    g.add_argument("--in-batch-negatives", action=argparse.BooleanOptionalAction, default=None,
                   help="use the other documents of the global batch as negatives, for "
                        "retrieval data only (default: on in stage 1, off in stage 2)")
    g.add_argument("--temperature", type=float32_number, default=None,
                   help="softmax temperature tau (0.01)")
    g.add_argument("--max-length", type=int, default=None, help="max tokens per text (paper 512)")
    g.add_argument("--lr", type=float32_number, default=None,
                   help="peak learning rate (paper 2e-5 / 1.5e-5)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (paper 500)")
    g.add_argument("--decay", choices=("linear", "cosine"), default="linear",
                   help="learning-rate decay to 0 after the warm-up (default %(default)s)")
    g.add_argument("--weight-decay", type=float32_number, default=0.0,
                   help="AdamW weight decay (default %(default)s: the paper uses Adam)")
    g.add_argument("--grad-clip", type=float32_number, default=1.0,
                   help="max gradient norm; 0 = no clipping (default %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the model init, data order and dropout (default %(default)s)")
    _add_hardware_and_output_flags(p)
    return p


def _add_hardware_and_output_flags(p: argparse.ArgumentParser):

    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda if available")
    g.add_argument("--dtype", choices=("bf16", "fp32", "auto"), default=None,
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU); auto: bf16 on GPU, "
                        "on a CPU the faster by a timed matmul (said at start; in config.json)")
    g.add_argument("--model-dtype", choices=("bf16", "fp32"), default=None,
                   help="dtype the frozen base is stored in (default: bf16 for LoRA with bf16 "
                        "compute, else fp32); trainable parameters are always fp32")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (less memory, ~30%% "
                        "more compute)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer and the pooling (NVEmbed.compile; "
                        "dynamic shapes, so other lengths do not recompile); the log counts the "
                        "graphs compiled")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/stage{1,2})")
    g.add_argument("--name", default=None,
                   help="the saved model's name, which evaluate.py and the MTEB adapter report "
                        "with its weights' fingerprint (default: --out's folder name)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --out (without it, or --resume, an existing "
                        "run is refused)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as if interrupted; the "
                        "schedule still spans --steps")
    g.add_argument("--log-every", type=int, default=None, help="steps between log lines")
    g.add_argument("--log-seconds", type=float, default=30.0,
                   help="also log a step line once this many seconds have passed since the last "
                        "(each step when steps are slower); 0: by --log-every only "
                        "(default %(default)s)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    g.add_argument("--save-every-minutes", type=float, default=10.0,
                   help="also save a checkpoint once this many minutes have passed since the last "
                        "(or the start): a slow run stopped keeps its work; 0: by steps only "
                        "(default %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="newest checkpoints to keep, 0: all (default %(default)s)")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="nDCG@10 before and after training (built-in test split, or "
                        "--eval-beir; default on)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also evaluate every N steps during training, logging nDCG@10 to "
                        "log.jsonl (default 0: off); every rank encodes a share of the texts")
    g.add_argument("--eval-beir", default=None, help="BEIR folder to evaluate on")
    g.add_argument("--eval-split", default="test",
                   help="qrels split of --eval-beir (default %(default)s)")
    g.add_argument("--eval-instruction", default=None,
                   help="query instruction for --eval-beir (default: NV-Embed-v2's for a known "
                        "BEIR folder name, as evaluate.py picks it)")
    g.add_argument("--eval-batch-size", type=int, default=64,
                   help="texts per batch when encoding (default %(default)s)")
    g.add_argument("--report-to", choices=tracking.REPORT_TO, default="none",
                   help="also log what log.jsonl logs to TensorBoard, in --out's tensorboard/ "
                        "(needs the tensorboard package; default %(default)s)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    add_verbosity_flags(p)


def default_recipe(args: argparse.Namespace) -> str:
    """'tiny' when the decoder is the tiny preset (no --model, or --init-from a model trained from
    it), else 'paper'."""
    if args.init_from is not None and args.model is None:
        saved = saved_architecture(args.init_from)["decoder"]  # a saved or released model's
        tiny = dataclasses.asdict(MistralConfig.preset("tiny"))
        return "tiny" if {"rope_scaling": None, **saved} == tiny else "paper"
    return "tiny" if args.model in (None, "tiny") else "paper"


def resolve_config(args: argparse.Namespace, recipe: str, defaults: dict) -> dict:
    """Fill every flag left out: with --init-from from the saved model, else (and for the rest) from
    `defaults`, the values of `recipe` for this stage (train.configure gives them)."""

    config = dict(vars(args))
    if config["init_from"] is not None:
        if config["model"] is not None:
            raise UsageError("pass either --model (start from a base decoder) or --init-from "
                             "(a saved model)")
        saved = saved_architecture(config["init_from"])  # a saved model's, or a released one's
        saved_lora = (saved["lora"] or {}).get("rank", 0)
        for key, value in (("pooling", saved["pooling"]), ("causal", saved["causal"])):
            if config[key] is not None and config[key] != value:
                raise UsageError(f"--{key}={config[key]!r} differs from the model in "
                                 f"{config['init_from']} ({key} {value!r})")
            config[key] = value
        if saved_lora and config["lora_rank"] not in (None, saved_lora):
            raise UsageError(f"--lora-rank {config['lora_rank']}: {config['init_from']} carries "
                             f"rank-{saved_lora} adapters, which training continues")
        config["lora_rank"] = saved_lora or config["lora_rank"] or 0
        config["pooling_kwargs"] = saved["pooling_kwargs"]
    else:
        config["model"] = config["model"] or "tiny"
        if config["model"] not in PRESETS and not Path(config["model"]).exists():
            raise MissingFileError(f"--model {config['model']}: no such checkpoint folder, .gguf "
                                   f"file or preset ({sorted(PRESETS)})")
        config["pooling"] = config["pooling"] or "latent"
        config["causal"] = bool(config["causal"])
    if config["instruction"] is not None and not config["data"]:
        raise UsageError("--instruction sets the instruction of --data rows; the built-in data "
                         "has its own")
    config["recipe"] = recipe
    for key in ("lr", "steps", "batch_size", "hard_negatives", "warmup_steps", "max_length",
                "temperature", "lora_rank", "log_every", "save_every"):
        if config[key] is None:
            config[key] = defaults[key]
    if config["init_from"] is None:
        latent = dict(num_latents=config["num_latents"] or defaults["num_latents"])
        head_dim = config["latent_head_dim"] or defaults["latent_head_dim"]
        if head_dim is not None:
            latent["head_dim"] = head_dim
        config["pooling_kwargs"] = latent if config["pooling"] == "latent" else {}
    if config["pooling"] != "latent" and (config["num_latents"] or config["latent_head_dim"]):
        raise UsageError("--num-latents / --latent-head-dim apply to latent pooling, not "
                         f"{config['pooling']!r}")
    if config["init_from"] is not None and (config["num_latents"] or config["latent_head_dim"]):
        raise UsageError("--num-latents / --latent-head-dim: the pooling of --init-from is kept "
                         "as it was saved")
    del config["num_latents"], config["latent_head_dim"]
    config["device"] = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    config["dtype"] = config["dtype"] or ("bf16" if config["device"] == "cuda" else "fp32")
    config["dtype"], config["dtype_choice"] = choose_dtype(config["dtype"], config["device"])
    if config["dtype_choice"]["chosen_by"] != "--dtype":
        speed = config["dtype_choice"].get("gflops")
        why = (f"a 1024 x 1024 matmul ran at {speed['bf16']:,.0f} GFLOP/s in bf16, "
               f"{speed['fp32']:,.0f} in fp32 at {torch.get_num_threads()} threads") if speed \
            else "a GPU computes in bf16"
        print0(f"--dtype auto: {config['dtype']} ({why})")
    if config["model_dtype"] is None:
        config["model_dtype"] = ("bf16" if config["dtype"] == "bf16" and config["lora_rank"] > 0
                                 else "fp32")
    if config["model_dtype"] == "bf16" and config["dtype"] != "bf16":
        raise UsageError("--model-dtype bf16 needs --dtype bf16 "
                         "(a bf16 base cannot compute in fp32)")
    config["name"] = config["name"] or Path(config["out"]).resolve().name
    # the notices' level: how the run talks, not what it computes
    configure_logging(config.pop("log_level"))
    if config["progress"] is None:
        config["progress"] = sys.stderr.isatty()
    check_numbers(config)
    check_paths(config)
    if config["report_to"] == "tensorboard":
        tracking.summary_writer_class()  # a missing package is said before the run folder is made
    return config


# training_files.read_training_file's
TRAINING_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def check_paths(config: dict):
    """A UserError for a --data or --eval-beir path of the wrong kind, before the run folder is
    made: a path that does not exist says so first, and a BEIR folder given as training data
    points to mine.py, which makes one."""
    for path in config["data"] or ():
        local = Path(path)
        if (local / "corpus.jsonl").is_file():
            raise UsageError(f"--data {path}: a BEIR folder (corpus, queries, qrels), not a "
                             "training file; mine one with hard negatives: python mine.py "
                             f"--data {path} --out {local.name}-train.jsonl")
        if local.is_dir() and not training_files.is_dataset_folder(local):
            raise UsageError(f"--data {path}: a folder, neither a training file "
                             f"({', '.join(TRAINING_FILE_SUFFIXES)}) nor a dataset "
                             "save_to_disk wrote")
        if not local.exists() and local.suffix in TRAINING_FILE_SUFFIXES:
            raise MissingFileError(f"--data {path}: no such file")
    weights = config.get("data_weights")
    if weights is not None and len(weights) != len(config["data"] or ()):
        raise UsageError(f"--data-weights: {len(weights)} weights for "
                         f"{len(config['data'] or ())} --data datasets (one each, in order)")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise UsageError(f"--data-weights {weights}: want non-negative weights, not all zero")
    beir = config["eval_beir"]
    if beir is not None and not Path(beir).is_dir():
        raise MissingFileError(f"--eval-beir {beir}: no such folder (want a BEIR folder: "
                               "corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")


def float32_number(text: str) -> float:
    """argparse's type for every float flag: a finite number float32 holds, as AdamW and the model
    compute in float32 (1e39 is finite in Python, inf there; AdamW refuses it mid-run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max):
        raise argparse.ArgumentTypeError(f"{text} is not a finite float32 number (|x| <= 3.4e38)")
    return value


def check_numbers(config: dict):
    """A UsageError for a count, size or rate out of range, or flags that cannot go together."""
    for key in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("log_seconds", "save_every_minutes"):
        if not (math.isfinite(config[key]) and config[key] >= 0):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0 (0: off), "
                             f"got {config[key]}")
    if config["eval_every"] < 0:
        raise UsageError(f"--eval-every must be >= 1 step (0: off), got {config['eval_every']}")
    if config["grad_cache"] < 0:
        raise UsageError("--grad-cache must be >= 1 text per chunk (0: off), got "
                         f"{config['grad_cache']}")
    if config["grad_cache"] and config["grad_accum"] > 1:
        raise UsageError("--grad-cache keeps the batch in one softmax, --grad-accum splits it: "
                         "choose one")
    if not (math.isfinite(config["lr"]) and config["lr"] > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {config['lr']}")
    if config["weight_decay"] < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {config['weight_decay']}")
    if not 0 <= config["lora_dropout"] < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {config['lora_dropout']}")
    if config["lora_alpha"] <= 0:
        raise UsageError(f"--lora-alpha must be > 0, got {config['lora_alpha']}")
    if config["warmup_steps"] < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {config['warmup_steps']}")
    if not (math.isfinite(config["grad_clip"]) and config["grad_clip"] >= 0):
        raise UsageError("--grad-clip must be a finite number >= 0 (0: no clipping), got "
                         f"{config['grad_clip']}")
    if config["hard_negatives"] < 0:
        raise UsageError(f"--hard-negatives must be >= 0, got {config['hard_negatives']}")
    if config["temperature"] <= 0:
        raise UsageError(f"--temperature must be > 0, got {config['temperature']}")
    if config["hard_negatives"] == 0 and not config["in_batch_negatives"]:
        raise UsageError("--hard-negatives 0 without in-batch negatives leaves no negative: the "
                         "loss would be 0")


# -----------------------------------------------------------------------------
# What the flags name: the training data (--data, else the built-in set) and the evaluation
# set (--eval-beir)


def check_max_length(config: dict, sources: list, tokenizer, rule) -> None:
    """A UsageError when --max-length leaves no room for a text after an instruction's tokens (BOS,
    the template filled with it) and EOS: found here, before the first step, not as a ValueError
    mid-batch."""
    instructions = {instruction for source in sources for example in source.examples
                    for instruction in (example.instruction, example.document_instruction)
                    if instruction}
    one_token = "x"  # a text of one token: the shortest that still leaves room for some text
    for instruction in sorted(instructions):
        row = tokenize(tokenizer, [one_token], instruction, None, rule)["attention_mask"][0]
        # BOS + instruction
        head = int(row.sum()) - len(encode_texts(tokenizer, [one_token])[0]) - 1
        if config["max_length"] < head + 2:
            shown = instruction if len(instruction) <= 40 else instruction[:37] + "..."
            raise UsageError(f"--max-length {config['max_length']} leaves no room for text: the "
                             f"instruction {shown!r} takes {head} tokens in its template (BOS "
                             "included, where the tokenizer adds one), EOS 1 more; want "
                             f"--max-length >= {head + 2}")


def file_sources(paths: list[str], hard_negatives: int, in_batch_negatives: bool,
                 split: str = "train", retrieval_only: bool = False,
                 instruction: str | None = None) -> list:
    """One TrainDataset per training file (training_files.py's schema, one task type a file);
    in-batch negatives go to retrieval data only (data.TrainDataset decides). retrieval_only: a
    file of another task type is a DataError. instruction: --instruction, for rows without one."""
    sources = []
    for path in paths:
        examples = training_files.read_training_file(path, split=split, instruction=instruction)
        kinds = sorted({e.task_type for e in examples})
        if retrieval_only and kinds != ["retrieval"]:
            raise DataError(f"{path}: stage 1 trains on retrieval data only (PAPER.md section 4), "
                            f"this file has task types {kinds}; use it in --stage 2")
        sources.append(TrainDataset(Path(path).stem, examples,
                                    in_batch_negatives=in_batch_negatives,
                                    num_hard_negatives=hard_negatives))
    return sources


def query_prompt(sources: list, rule) -> str | None:
    """The saved model's prompts["query"] (sentence-transformers' encode_query): the template filled
    with the run's instruction where every training query has that one instruction; else None."""
    instructions = {example.instruction for source in sources for example in source.examples}
    if len(instructions) != 1 or not (instruction := instructions.pop()):
        return None
    return rule.template.format(instruction=instruction)


def training_data(config: dict, retrieval_only: bool = False) -> tuple[list, BatchSampler]:
    """The sources (a data.TrainDataset each) and the sampler: step k's global batch depends on
    (seed, k) alone. retrieval_only (train.py's stage 1): --data files of other task types are
    refused."""
    if config["data"]:
        sources = file_sources(config["data"], config["hard_negatives"],
                               config["in_batch_negatives"], config.get("data_split", "train"),
                               retrieval_only, config.get("instruction"))
    else:  # the built-in data: its retrieval examples, and in stage 2 a classification task
        sources = builtin_sources(config["stage"], config["hard_negatives"],
                                  config["in_batch_negatives"], config["seed"])
    for source in sources:
        print0(source.summary())
        if len(source) < config["batch_size"]:
            raise UsageError(f"--batch-size {config['batch_size']}: {source.name} has only "
                             f"{len(source)} examples")
    if config["batch_size"] % (config["grad_accum"] * world_size()):
        raise UsageError(f"--batch-size {config['batch_size']} must be divisible by --grad-accum "
                         f"{config['grad_accum']} x {world_size()} ranks")
    return sources, BatchSampler(sources, config["batch_size"], seed=config["seed"],
                                 weights=config.get("data_weights"))


def evaluation_set(config: dict):
    """(corpus, queries, qrels, instruction) to evaluate on, or None (--no-eval, or training files
    without --eval-beir). Every rank reads it, at the start: a wrong folder stops them all before
    the model is built."""
    if not config["eval"]:
        return None
    if config["eval_beir"]:
        corpus, queries, qrels = datafiles.load_beir(config["eval_beir"], config["eval_split"])
        instruction = config["eval_instruction"]
        if instruction is None:
            instruction = evaluate.INSTRUCTIONS.get(
                Path(config["eval_beir"]).resolve().name.lower(), "")
        return corpus, queries, qrels, instruction
    if not config["data"]:  # the built-in dataset's held-out test queries
        builtin = builtin_dataset(seed=0)
        return (*builtin.split("test"), builtin.instruction)
    return None
