"""Encoding sharded over torchrun's ranks (evaluate.encode_sharded): the same embeddings, run and
metrics as one process, written once. Training's sharded (FSDP, lockstep) evaluations:
tests/test_train.py's two-rank worker."""

import json
import os

import pytest
import torch

from plumbing import distributed
import evaluate
from plumbing import evaluate_cli
from tests.helpers import spawn_two_ranks
from plumbing.loading import from_base
from tests.test_train import single_process  # noqa: F401 (a fixture)

# A fresh tiny model on the built-in data, 4 texts a batch: 100 queries and 400 documents make 25
# and 100 batches, so both ranks embed many and, with 25, one rank embeds a batch more than the
# other.
ARGS = ["--model", "tiny", "--data", "builtin", "--batch-size", "4", "--pooling", "latent",
        "--quiet"]


def worker(rank, out_dir):
    written = []
    write_trec = evaluate_cli.write_trec
    evaluate_cli.write_trec = lambda *args: (written.append(rank), write_trec(*args))
    distributed.init_distributed("cpu")
    # encode_sharded alone, odd sizes: 7 texts in batches of 2 -> batches 0, 2 on rank 0 and 1, 3 on
    # rank 1.
    torch.manual_seed(0)
    model = from_base("tiny", pooling="latent", pooling_kwargs=dict(num_latents=8, head_dim=8))
    texts = ["a", "bb b", "ccc cc c", "d", "eeeee", "ff", "g g g g g g"]
    shared = evaluate.encode_sharded(model, texts, "an instruction", batch_size=2)
    # Rows gathered 2 at a time (the block), rank 0 owning rows 0, 2, 4, 6, 8 and rank 1 rows 1, 3:
    # row i is i.
    rows_per_rank = [[0, 2, 4, 6, 8], [1, 3]]
    local = torch.tensor(rows_per_rank[rank], dtype=torch.float32)[:, None].repeat(1, 3)  # (n_r, 3)
    gathered = distributed.gather_rows_to_rank0(local, rows_per_rank, 9, block=2)
    # no texts: (0, D) on rank 0, nothing gathered
    none = evaluate.encode_sharded(model, [], batch_size=2)
    if rank == 0:
        torch.save(dict(encoded=shared, gathered=gathered, none=none),
                   os.path.join(out_dir, "encoded.pt"))
    else:
        assert shared is None and gathered is None and none is None
    # destroys the process group
    result = evaluate.main(ARGS + ["--out", os.path.join(out_dir, "two")])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(written=written, returned=result), f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded_eval")
    spawn_two_ranks(worker, str(out_dir))
    return out_dir


def test_two_ranks_write_the_run_of_one_process_once(two_ranks, tmp_path,
                                                     single_process):  # noqa: F811
    one = evaluate.main(ARGS + ["--out", str(tmp_path)])
    ranks = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == dict(written=[0], returned=one) and \
        ranks[1] == dict(written=[], returned=None)
    assert (two_ranks / "two" / "builtin-test.trec").read_bytes() == \
        (tmp_path / "builtin-test.trec").read_bytes()
    two_metrics = json.loads((two_ranks / "two" / "builtin-test.json").read_text())
    assert two_metrics["metrics"] == \
        json.loads((tmp_path / "builtin-test.json").read_text())["metrics"]
    assert two_metrics["config"]["ranks"] == 2


def test_sharded_embeddings_are_one_process_embeddings_bit_for_bit(two_ranks):
    torch.manual_seed(0)
    model = from_base("tiny", pooling="latent", pooling_kwargs=dict(num_latents=8, head_dim=8))
    texts = ["a", "bb b", "ccc cc c", "d", "eeeee", "ff", "g g g g g g"]
    one = model.encode(texts, instruction="an instruction", batch_size=2, convert_to_tensor=True)
    saved = torch.load(two_ranks / "encoded.pt")
    assert torch.equal(saved["encoded"], one)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.float32)
    assert torch.equal(saved["gathered"][[0, 1, 2, 3, 4, 6, 8]],
                       rows[[0, 1, 2, 3, 4, 6, 8], None].repeat(1, 3))
    assert saved["none"].shape == (0, model.decoder.config.hidden_size)


def test_one_process_encode_sharded_is_encode():
    torch.manual_seed(0)
    model = from_base("tiny", pooling="mean")
    texts = ["x y z", "w", "a longer text than the others"]
    assert torch.equal(evaluate.encode_sharded(model, texts, batch_size=2),
                       model.encode(texts, batch_size=2, convert_to_tensor=True))


def test_a_mistake_under_torchrun_is_said_once(tmp_path):
    """Every rank finds the same bad flag value; rank 0 alone prints the one line (torchrun then
    adds its own)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "evaluate.py", "--data", str(tmp_path / "missing"), "--instruction",
                             ""], capture_output=True,
                            text=True, cwd=evaluate.__file__.rsplit("/", 1)[0], timeout=300)
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("evaluate.py: error:")]
    assert len(said) == 1 and "missing" in said[0], result.stderr[-2000:]
