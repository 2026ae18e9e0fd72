"""The training run folder, --out: its lock, its checkpoints, its log.

    out/train.lock                one run per folder at a time (below)
    out/config.json, log.jsonl    the resolved configuration; one JSON record a log line or eval
    out/checkpoints/step_N/       training state: dcp shards (tensors only), trainer_state.json
                                  (the rest, as JSON), manifest.json (sizes, hashes)
    out/model/                    the trained model (plumbing/model_folders.py)
    out/previous/                 --overwrite: the replaced run, until the new model is saved

Training state is saved with torch.distributed.checkpoint (each rank writes its own shards), and
--resume continues from the newest complete checkpoint (`latest_checkpoint`, the one search for
it). A save is written whole or not at all (plumbing/atomic_folders.py). On Ctrl-C or SIGTERM
(plumbing/interrupts.py) the lock's holder sweeps its .tmp folders and says where --resume
continues (`after_interruption`), and the lock is released however the command ends.

The lock. Two train.py runs with the same --out would interleave log.jsonl and trip over each
other's temporary files. So rank 0 takes out/train.lock before it touches anything in the folder
(before --overwrite sets the old run aside, before --resume cuts the log back), and holds it until
the command ends. The file says who holds it, as JSON: {"pid": ..., "host": ...}.

- While the process it names lives (on this host; another host's process is taken to live, as
  nothing here can tell), another run is refused with one line:
  `--out X is in use by process PID (lock file X/train.lock)`.
- A lock left by a dead process (killed, its machine rebooted) is taken over with a notice.
- Two runs starting at the same moment cannot both take it: the file is also flock()ed, which
  the kernel releases when its process dies, and a taker checks that the file it locked is still
  the one at the path (a holder that finished removes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from plumbing import interrupts, tracking
from plumbing.atomic_folders import replace_folder, written_whole
from plumbing.distributed import (barrier, is_distributed, on_rank0_for_all, print0, rank,
                                  world_size)
from plumbing.errors import CheckpointError, UsageError
from plumbing.manifest import content_problem, size_problem, write_manifest

# ----------------------------------------------------------------------------
# The lock: one run per --out at a time


LOCK_FILE = "train.lock"

_held: dict = {}  # the lock this process holds: {"path": Path, "fd": int}


def _alive(holder: dict) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: nothing here can tell; the user can
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def _holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
        int(holder["pid"])
        return holder
    except (ValueError, TypeError, KeyError):
        return None  # empty (a taker between open and write) or not ours


def _refuse(out: Path, lock: Path, holder: dict | None):
    who = f"process {holder['pid']}" if holder else "another process"
    if holder and holder.get("host") not in (None, socket.gethostname()):
        who += f" on host {holder['host']}"
    raise UsageError(f"--out {out} is in use by {who} (lock file {lock})")


def take_run_lock(out: str | os.PathLike) -> Path:
    """Make `out` and take out/train.lock for this process, or refuse in one line (UsageError) if
    it cannot be written or another live process holds it. Under `interrupts.stops_cleanly` it is
    released when the command ends, and an interruption sweeps the folder first."""
    out = Path(out)
    try:  # a read-only file system or a folder of someone else's: said before anything runs
        out.mkdir(parents=True, exist_ok=True)
        (out / f".write-test-{os.getpid()}").touch()
        (out / f".write-test-{os.getpid()}").unlink()
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror})") from None
    lock = out / LOCK_FILE
    if _held.get("path") != lock:
        _take(out, lock)
    interrupts.at_end(release_run_lock)
    interrupts.on_interruption(functools.partial(after_interruption, out))
    return lock


def _take(out: Path, lock: Path) -> None:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process this very moment
            holder = _holder(os.read(fd, 4096).decode(errors="replace"))
            os.close(fd)
            _refuse(out, lock, holder)
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder finished and removed it between our open and flock
            os.close(fd)
            continue
        holder = _holder(os.read(fd, 4096).decode(errors="replace"))
        if holder is not None and _alive(holder):
            os.close(fd)
            _refuse(out, lock, holder)
        if holder is not None:
            print0(f"notice: --out {out}: taking over the lock of process {holder['pid']}, which "
                   f"is no longer running (lock file {lock})")
        os.ftruncate(fd, 0)
        os.pwrite(fd,
                  (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(),
                  0)
        os.fsync(fd)
        _held.update(path=lock, fd=fd)
        return


def release_run_lock():
    """Remove and release the lock this process holds, if any (at the command's end, however it
    ends)."""
    if not _held:
        return
    lock, fd = _held.pop("path"), _held.pop("fd")
    try:
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            lock.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Training state (torch.distributed.checkpoint: each rank writes its own shards)



def _rng_state() -> dict:
    """The RNG states training draws from: torch's (dropout). The data order needs none:
    plumbing.sampler.BatchSampler is a pure function of (seed, step), and nothing here uses Python's
    or numpy's global generators. Tensors only, as everything dcp saves (`_training_state`)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict_options(model):

    # Under LoRA the frozen base is not saved: resuming rebuilds it from the same
    # --model / --init-from and seed (the config check at resume makes sure of that).
    # Loading is then not strict about the frozen keys; dcp.load still fails on any
    # trainable key the checkpoint lacks.
    lora = any("lora_" in name for name, _ in model.named_parameters())
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _training_state(model, optimizer, with_rng: bool = True) -> tuple[dict, list]:
    """(what dcp saves and loads: tensors only, the optimizer's param groups).

    dcp writes any entry that is not a tensor with torch.save, and loads it back with
    torch.load(weights_only=False), which unpickles arbitrary objects. So the non-tensor
    state (the step, the schedule, the param groups: lr, betas, eps...) stays out of it and
    goes to trainer_state.json (`save_checkpoint`)."""

    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=_state_dict_options(model))
    # per parameter: exp_avg, step...
    state = {"model": model_state, "optimizer": optimizer_state["state"]}
    if with_rng:
        # One key per rank: dcp would keep only one copy of a key that every rank writes.
        state[f"rng_rank{rank()}"] = _rng_state()

    def check_tensors(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                check_tensors(item, f"{where}.{key}")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint: {where} is a {type(value).__name__}, not a tensor (dcp "
                            "would pickle it)")

    check_tensors(state, "state")
    return state, optimizer_state["param_groups"]


@contextlib.contextmanager
def _single_process_dcp():
    """dcp works without a process group (no_dist=True), but warns each time that it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_folder(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def saved_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoints of the run folder `out`, newest first: out/checkpoints/step_N (a save
    in progress is step_N.tmp, and not one of them)."""
    found = [p for p in checkpoint_folder(out).glob("step_*") if p.name[len("step_"):].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len("step_"):])


def latest_checkpoint(out: str | os.PathLike, skipped: list | None = None) -> Path | None:
    """The newest complete checkpoint of the run folder `out` (plumbing/manifest.py's
    `size_problem` finds none), or None; a newer, incomplete one is passed over, and (its folder,
    its problem) appended to `skipped` when given. --resume, the interruption line and the
    non-finite stop all ask here."""
    for folder in saved_checkpoints(out):
        problem = size_problem(folder)
        if problem is None:
            return folder
        if skipped is not None:
            skipped.append((folder, problem))
    return None


def save_checkpoint(out, model, optimizer, scheduler, step: int, config: dict,
                    keep: int = 2) -> Path:
    """Write the training state after `step` optimizer steps to out/checkpoints/step_N.

    Every rank writes its shards into step_N.tmp; only when all have finished (dcp.save
    returns after the coordinator wrote the metadata) does rank 0 rename the folder to
    step_N. A rename is atomic, so a crash mid-save leaves a .tmp folder that nothing
    mistakes for a checkpoint (it is deleted by the next save). The dcp files hold tensors
    only (model, optimizer moments, RNG); step_N/trainer_state.json holds the rest: the
    step (also the sampler's position: plumbing.sampler.BatchSampler is a pure function of (seed,
    step)), the schedule's state_dict, the optimizer's param groups, the configuration.
    """

    final = checkpoint_folder(out) / f"step_{step:08d}"
    temporary = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    tensors, param_groups = _training_state(model, optimizer)
    with written_whole(temporary, final):
        with _single_process_dcp():
            dcp.save(tensors, checkpoint_id=temporary, no_dist=not is_distributed())
        if rank() == 0:
            # Param groups name their parameters by FQN and are the same on every rank; so is the
            # schedule. JSON writes floats exactly (shortest repr that reads back the same).
            trainer_state = {"step": step, "world_size": world_size(), "config": config,
                             "scheduler": scheduler.state_dict(),
                             "optimizer_param_groups": param_groups}
            (temporary / "trainer_state.json").write_text(json.dumps(trainer_state,
                                                                     indent=2) + "\n")
        # Every file's size and hash, written last: --resume checks them before it loads (a cut,
        # lost or altered shard is found by name, and the checkpoint before it used instead).
        write_manifest(temporary)
    if rank() == 0:
        # the new checkpoint in place and the old ones gone, or neither
        with interrupts.deferred_signals():
            replace_folder(temporary, final)
            for stale in saved_checkpoints(out)[keep:] if keep > 0 else []:
                shutil.rmtree(stale)
    barrier()
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, schedule and RNG from `folder` in place; return its step.

    RNG states are per rank; on another world size they are not restored (the run then
    continues correctly, but dropout masks differ from an uninterrupted run's).

    What is unpickled: dcp reads its own step_N/.metadata file with pickle.load (its file
    format has no other), so a checkpoint folder must be trusted as far as that file goes;
    the tensors it reads with torch.load(weights_only=True), which unpickles tensors and
    nothing else; everything else comes from trainer_state.json.
    """
    saved = json.loads((folder / "trainer_state.json").read_text())
    missing = [key for key in ("scheduler", "optimizer_param_groups") if key not in saved]
    if missing:
        raise CheckpointError(f"{folder / 'trainer_state.json'} has no {' or '.join(missing)}: the "
                              "checkpoint was written by an older train.py (which pickled them "
                              "into the dcp files); it cannot be resumed")
    same_world = saved["world_size"] == world_size()
    if not same_world:
        print0(f"resume: {folder} was written by {saved['world_size']} ranks, this run has "
               f"{world_size()}; RNG states are not restored (dropout masks will differ from an "
               "uninterrupted run)")
    state, _ = _training_state(model, optimizer, with_rng=same_world)
    with _single_process_dcp():
        dcp.load(state, checkpoint_id=folder, no_dist=not is_distributed())
    # JSON has lists where the optimizer had tuples (AdamW's betas): give back the live groups'
    # types.
    param_groups = [{key: tuple(value) if isinstance(live.get(key), tuple) else value
                     for key, value in group.items()}
                    for group, live in zip(saved["optimizer_param_groups"], optimizer.param_groups)]
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": param_groups},
                   options=_state_dict_options(model))
    scheduler.load_state_dict(saved["scheduler"])
    if same_world:
        _set_rng_state(state[f"rng_rank{rank()}"])
    return int(saved["step"])


def prepare_run_folder(config: dict):
    """Create --out and take its lock (above; released as the command ends); refuse to mix a fresh
    run into an old one unless --overwrite."""
    out = Path(config["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a folder (the run folder is made there)")
    # one run per --out (the lock, above): rank 0 takes it, and every rank stops if refused
    on_rank0_for_all(functools.partial(take_run_lock, out))
    if not config["resume"]:
        # Every rank looks, not rank 0 alone, so that all of them stop on this mistake.
        old = [out / name for name in ("checkpoints", "model", "log.jsonl", "config.json")
               if (out / name).exists()]
        if old and not config["overwrite"] and not started(out):
            # A start that failed (a bad data line, a crash before the first save) left its
            # config and log: the same command again starts afresh, setting them aside as
            # --overwrite does, rather than ask for a --resume that has nothing to continue.
            print0(f"notice: --out {out} holds a run that saved no checkpoint and no model "
                   f"({', '.join(p.name for p in old)}): starting it again")
        elif old and not config["overwrite"]:
            raise UsageError(f"--out {out} already holds a run ({', '.join(p.name for p in old)}); "
                             "pass --resume to continue it, --overwrite to replace it, or another "
                             "--out")
        if rank() == 0 and old:
            set_aside_previous_run(out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()


def started(out: Path) -> bool:
    """Whether the run folder `out` holds what a run must not lose: a checkpoint or a model."""
    return bool(saved_checkpoints(out)) or (out / "model").exists()


PREVIOUS_RUN = "previous"  # --overwrite: the replaced run's log, config and checkpoints, until done


def set_aside_previous_run(out: Path):
    """--overwrite deletes nothing before its replacement exists: the old run's checkpoints, log and
    config move to out/previous/ (the new run must not count them as its own), and its model/ stays
    where it is until the new model/ is renamed over it (`_write_folder`). `discard_previous_run`
    deletes out/previous/ once the new model is saved; a run that fails leaves both behind."""
    previous = out / PREVIOUS_RUN
    shutil.rmtree(previous, ignore_errors=True)  # an older generation's, still beside a model/
    previous.mkdir()
    for name in ("checkpoints", "log.jsonl", "config.json"):
        if (out / name).exists():
            os.replace(out / name, previous / name)


def discard_previous_run(out: Path):
    if rank() == 0:
        shutil.rmtree(Path(out) / PREVIOUS_RUN, ignore_errors=True)


# Config keys that may change between a run and its resumption (compile: the same step, faster;
# dtype_choice: --dtype auto's timings, the dtype itself is compared).
RESUMABLE_CHANGES = {"resume", "overwrite", "log_every", "save_every", "keep_checkpoints",
                     "stop_after", "eval", "eval_every", "eval_batch_size", "device", "progress",
                     "compile", "report_to", "log_seconds", "save_every_minutes", "dtype_choice"}


# Config keys added since runs were first saved, and the value an older run had without them.
ADDED_KEYS = {"data_split": "train", "data_weights": None, "instruction": None}


def check_resume_config(folder: Path, config: dict):
    saved = ADDED_KEYS | json.loads((folder / "trainer_state.json").read_text())["config"]
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}"
                            for k in differ)
        raise UsageError(f"--resume: {folder} was written with another configuration ({details})")


def logged_eval(out: Path, when: str) -> dict | None:
    """The record of an evaluation already written to out/log.jsonl."""
    records = log_records(out)
    return next((r for r in records if r.get("event") == "eval" and r["when"] == when), None)


def logged_ndcg(out: Path, when: str) -> float | None:
    """nDCG@10 of an evaluation already recorded in out/log.jsonl."""
    record = logged_eval(out, when)
    return None if record is None else record["NDCG@10"]


def open_run(config: dict) -> list[Path] | None:
    """Make the run folder --out ready (`prepare_run_folder`); with --resume, the checkpoints to
    resume from, newest first (`resume` loads the first that verifies), after checking that the
    newest complete one was written with the same configuration."""
    out = Path(config["out"])
    prepare_run_folder(config)
    if not config["resume"]:
        return None
    if not saved_checkpoints(out):
        never = " (the run saved none: run it without --resume to start again)" \
            if (out / "config.json").exists() else ""
        raise UsageError(f"--resume: no checkpoint in {checkpoint_folder(out)}{never}")
    skipped = []
    resume_from = latest_checkpoint(out, skipped)  # a corrupt newer one is named and passed over
    for folder, problem in skipped:
        print0(f"notice: --resume skips {folder.name}: {problem}")
    if resume_from is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {checkpoint_folder(out)} "
                              f"({'; '.join(problem for _, problem in skipped)})")
    check_resume_config(resume_from, config)
    return saved_checkpoints(out)[len(skipped):]


def resume(config: dict, candidates: list[Path], model, optimizer, scheduler) -> tuple[Path, int]:
    """Load the newest of `candidates` (`open_run`'s) whose files hold the bytes they were saved
    with and whose load succeeds; each one passed over is named in a notice. The log is cut back
    to its step (the steps logged after it were lost and will run again). Returns (its folder,
    its step); a CheckpointError if none loads."""
    out, problems = Path(config["out"]), []
    for folder in candidates:
        problem = size_problem(folder) if problems else None  # the first: open_run's check
        problem = problem or content_problem(folder)
        if problem is None:
            check_resume_config(folder, config)
            try:
                step = load_checkpoint(folder, model, optimizer, scheduler)
            except (Exception, dcp.api.CheckpointException) as error:  # not an Exception
                failures = getattr(error, "failures", None) or {}  # dcp's: {rank: (error, stack)}
                cause = next(iter(failures.values()))[0] if failures else error
                said = (str(cause).strip().splitlines() or [""])[0][:200]
                problem = f"{folder} does not load ({type(error).__name__}: {said})"
        if problem is None:
            if rank() == 0:
                kept = [r for r in log_records(out) if r.get("step", 0) <= step]
                (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
            return folder, step
        print0(f"notice: --resume skips {folder.name}: {problem}")
        problems.append(problem)
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_folder(out)} loads "
                          f"({'; '.join(problems)})")


def log_records(out: Path) -> list[dict]:
    """The records of out/log.jsonl ([] before its first)."""
    log_file = out / "log.jsonl"
    if not log_file.is_file():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines()]


def append_log(out: Path, record: dict) -> None:
    """One JSON record appended to out/log.jsonl, by rank 0."""
    if rank() == 0:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.record(out, record)  # --report-to tensorboard: the same record as scalars


def after_interruption(out: Path) -> str:
    """On Ctrl-C or SIGTERM (interrupts.py, rank 0): the temporary folders an interrupted save
    may have left in `out` removed (the lock makes them ours), and where --resume continues."""
    for path in [out / "model.tmp", *checkpoint_folder(out).glob("*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)
    last = latest_checkpoint(out)
    if last is None:
        return (f"no checkpoint was saved in {out}, so --resume has nothing to continue: start "
                "again with --overwrite")
    return f"continue with --resume (last checkpoint: {last}, step {checkpoint_step(last)})"
