"""train.py --report-to tensorboard: every record train.py appends to log.jsonl
(checkpoints.append_log) also as TensorBoard scalars, in the run folder's tensorboard/. Training
records are tagged train/<key> (loss, lr, grad_norm, ms_per_step, ...), evaluations eval/<metric>,
each at its step; nested values (compiled counts) get one tag per entry, text values none. Rank 0
only. tensorboard is an optional dependency (pip install -e '.[tensorboard]'). Tests:
tests/test_tracking.py."""

from __future__ import annotations

from pathlib import Path

from plumbing.errors import UsageError

REPORT_TO = ("none", "tensorboard")
_writers: dict[Path, object] = {}  # resolved run folder -> its SummaryWriter


def summary_writer_class():
    """torch's SummaryWriter, or a UsageError saying how to get the package it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises it when the tensorboard package is missing
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install "
                         f"tensorboard (or pip install -e '.[tensorboard]'); {error}") from None
    return SummaryWriter


def start(report_to: str | None, out: str | Path) -> None:
    """Begin reporting the records of the run in `out` (a no-op for "none" and on ranks other than
    0)."""
    from plumbing.distributed import rank
    if report_to in (None, "none") or rank() != 0:
        return
    if report_to not in REPORT_TO:
        raise UsageError(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    _writers[Path(out).resolve()] = summary_writer_class()(log_dir=str(Path(out) / "tensorboard"))


def record(out: str | Path, entry: dict) -> None:
    """One log.jsonl record as scalars, if the run in `out` reports to TensorBoard."""
    writer = _writers.get(Path(out).resolve())
    if writer is None or "step" not in entry:
        return
    group = entry.get("event", "train")
    for key, value in entry.items():
        for tag, number in ([(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict)
                            else [(key, value)]):
            if (key not in ("event", "step") and isinstance(number, (int, float))
                    and not isinstance(number, bool)):
                writer.add_scalar(f"{group}/{tag}", number, global_step=entry["step"])
    writer.flush()


def stop(out: str | Path) -> None:
    writer = _writers.pop(Path(out).resolve(), None)
    if writer is not None:
        writer.close()
