"""Tests for train.py: 2 ranks against 1 (the loss's naive loop: tests/test_loss.py), exact
resume, and the default command end to end.

Run: python -m pytest -q tests/test_train.py
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing import builtin  # noqa: E402
from plumbing import passes as batch_passes  # noqa: E402
from plumbing import run_folder  # noqa: E402
from plumbing.base_checkpoints import ByteTokenizer  # noqa: E402
from plumbing import distributed  # noqa: E402
import train  # noqa: E402
from plumbing.sampler import rank_slice  # noqa: E402
from tests.helpers import free_port, spawn_two_ranks  # noqa: E402
from tests.test_loss import (BagOfBytes, known_positive_dataset,  # noqa: E402
                             known_positive_examples, naive_batch_loss)
from plumbing.loading import from_base  # noqa: E402

torch.set_num_threads(1)


def test_checkpoint_holds_only_tensors_and_loading_unpickles_nothing_else(tmp_path, single_process,
                                                                          monkeypatch):
    """dcp pickles every non-tensor entry (torch.save) and unpickles it at load with
    torch.load(weights_only=False). The step, the schedule and the optimizer's param groups live in
    trainer_state.json instead, so the dcp folder's metadata lists tensors only and loading calls
    torch.load in weights_only mode alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def training_objects():
        model = tiny_model("lora")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                      betas=(0.9, 0.98), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 4)
        return model, optimizer, scheduler

    model, optimizer, scheduler = training_objects()
    for _ in range(2):
        train.forward_backward(model, collate(model, global_batch(), True), TEMPERATURE, 1.0,
                               torch.device("cpu"))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    folder = run_folder.save_checkpoint(tmp_path, model, optimizer, scheduler, 2,
                                        config={"seed": 0})

    entries = FileSystemReader(folder).read_metadata().state_dict_metadata
    pickled = sorted(key for key, value in entries.items()
                     if not isinstance(value, TensorStorageMetadata))
    assert entries and not pickled, pickled

    fresh_model, fresh_optimizer, fresh_scheduler = training_objects()
    real_load, weights_only = torch.load, []

    def recording_load(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert run_folder.load_checkpoint(folder, fresh_model, fresh_optimizer, fresh_scheduler) == 2
    assert weights_only and set(weights_only) == {True}
    # Restored exactly, types included (JSON has no tuples; AdamW's betas is one).
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    expected, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert got["param_groups"] == expected["param_groups"]
    assert all(type(g["betas"]) is tuple for g in got["param_groups"])
    assert got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert all(torch.equal(got["state"][index][name], value) for name, value in state.items())
    for (name, value), (_, restored) in zip(model.state_dict().items(),
                                            fresh_model.state_dict().items()):
        assert torch.equal(value, restored), name


# (fine-tuning, in-batch negatives, activation checkpointing on the 2 ranks)
CASES = [("full", True, False), ("full", False, False), ("lora", True, False), ("full", True, True)]
GRAD_CACHE_CASES = [("lora", 3), ("full", 5)]
TEMPERATURE = 0.05


def tiny_model(kind):
    config = dict(init_from=None, model="tiny", pooling="latent", causal=False, max_length=96,
                  model_dtype="fp32", seed=0, pooling_kwargs=dict(num_latents=8, head_dim=8),
                  name=f"tiny-{kind}", lora_rank=4 if kind == "lora" else 0, lora_alpha=8.0,
                  lora_dropout=0.0)
    return train.build_model(config)


def global_batch():
    """8 built-in examples; example 0 appears twice, once on each rank (a duplicate positive across
    ranks)."""
    examples = builtin.builtin_dataset(seed=0).train_examples
    return [examples[i] for i in (0, 1, 2, 3, 0, 5, 6, 7)]


def collate(model, examples, in_batch_negatives):
    import data

    return data.collate(examples, model.tokenizer, max_length=96, num_hard_negatives=2,
                        in_batch_negatives=in_batch_negatives)


def gradients(model):
    """Full (unsharded) gradients by parameter name."""
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                   else p.grad).detach().clone()
            for name, p in model.named_parameters() if p.grad is not None}


def two_rank_worker(rank, out_dir):
    """Rank `rank` of 2 (gloo): one step's gradients for each case, then a 2-rank resume."""

    device = distributed.init_distributed("cpu")
    results = {}
    for kind, in_batch, checkpointing in CASES:
        model = train.parallelize(tiny_model(kind), device, activation_checkpointing=checkpointing)
        examples = global_batch()
        mine = [examples[i] for i in rank_slice(range(len(examples)), rank, 2)]
        loss, _ = train.forward_backward(model, collate(model, mine, in_batch), TEMPERATURE, 1.0,
                                         device)
        torch.distributed.all_reduce(loss)
        results[(kind, in_batch, checkpointing)] = (loss.item() / 2, gradients(model))
    # GradCache under FSDP: chunks of 3 (divides 4 queries, not 12 docs)
    for kind, chunk_size in GRAD_CACHE_CASES:
        model = train.parallelize(tiny_model(kind), device)
        mine = [global_batch()[i] for i in rank_slice(range(8), rank, 2)]
        loss, _ = train.forward_backward_cached(model, collate(model, mine, True), TEMPERATURE,
                                                chunk_size, device)
        torch.distributed.all_reduce(loss)
        results[("grad-cache", kind, chunk_size)] = (loss.item() / 2, gradients(model))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "gradients.pt"))

    # The loss alone, through the data pipeline: cross-rank known positives and copies.
    losses = {}
    for in_batch in (False, True):
        batch = known_positive_dataset(in_batch).collate(rank_slice(range(8), rank, 2),
                                                         ByteTokenizer(), max_length=64)
        loss, _ = train.forward_backward(BagOfBytes(), batch, TEMPERATURE, 1.0, device)
        torch.distributed.all_reduce(loss)
        losses[in_batch] = loss.item() / 2
    if rank == 0:
        torch.save(losses, os.path.join(out_dir, "known_positive_losses.pt"))

    # Sharded checkpoints: uninterrupted vs stopped after step 3 and resumed (train() keeps
    # the process group that is already up).
    def run(*extra):
        train.train(train.configure(SMALL_JOB + ["--steps", "6", *extra]))

    def built_on_rank_1(config):
        raise AssertionError("rank 1 built the model: only rank 0 should "
                             "(train.build_model_on_rank0)")

    if rank == 1:
        train.build_model = built_on_rank_1
    run("--out", os.path.join(out_dir, "a"))
    run("--out", os.path.join(out_dir, "b"), "--stop-after", "3")
    run("--out", os.path.join(out_dir, "b"), "--resume")
    # vs one rank, below
    run("--out", os.path.join(out_dir, "c"), "--steps", "3", "--lora-dropout", "0")
    # sharded evaluations of the FSDP model, in lockstep
    run("--out", os.path.join(out_dir, "f"), *EVAL_EVERY)
    train.train(train.configure(STAGE2_FROM + [os.path.join(out_dir, "c"), "--out",
                                               os.path.join(out_dir, "e")]))

    def unreadable(config):
        raise ValueError("checkpoint unreadable")

    if rank == 0:  # rank 0 cannot build the model: every rank must stop with its error, none wait
        train.build_model = unreadable
    with pytest.raises((ValueError, RuntimeError)) as error:
        run("--out", os.path.join(out_dir, "d"))
    with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
        f.write(f"{error.type.__name__}: {error.value}")
    distributed.destroy_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run two_rank_worker on 2 spawned processes once; its output folder."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    spawn_two_ranks(two_rank_worker, str(out_dir))
    return out_dir


def test_two_ranks_give_the_gradients_of_one(two_ranks):
    two = torch.load(two_ranks / "gradients.pt")
    assert not distributed.is_distributed()
    for kind, in_batch, checkpointing in CASES:
        model = tiny_model(kind)
        examples = global_batch()
        batch = collate(model, examples, in_batch)
        loss, _ = train.forward_backward(model, batch, TEMPERATURE, 1.0, torch.device("cpu"))
        one = gradients(model)
        two_loss, two_grads = two[(kind, in_batch, checkpointing)]
        assert two_loss == pytest.approx(loss.item(), rel=1e-5)
        assert set(two_grads) == set(one) and one, (kind, sorted(set(one) ^ set(two_grads)))
        if kind == "lora":
            assert all("lora_" in name or name.startswith("pooling.") for name in one)
        for name, grad in one.items():
            torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{kind} {in_batch} {name}")


def test_grad_cache_on_two_ranks_gives_the_gradients_of_one_plain_step(two_ranks):
    """Each rank embeds its half of the batch in chunks; the softmax spans both ranks' documents."""
    two = torch.load(two_ranks / "gradients.pt")
    for kind, chunk_size in GRAD_CACHE_CASES:
        model = tiny_model(kind)
        loss, _ = train.forward_backward(model, collate(model, global_batch(), True), TEMPERATURE,
                                         1.0, torch.device("cpu"))
        one = gradients(model)
        two_loss, two_grads = two[("grad-cache", kind, chunk_size)]
        assert two_loss == pytest.approx(loss.item(), rel=1e-5)
        assert set(two_grads) == set(one) and one
        for name, grad in one.items():
            torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{kind} {name}")


def test_batch_loss_on_two_ranks_matches_the_naive_loop(two_ranks):
    """Each rank's loss over its 4 queries against the 8 of both ranks, averaged over the ranks."""
    two = torch.load(two_ranks / "known_positive_losses.pt")
    for in_batch_negatives in (False, True):
        dataset = known_positive_dataset(in_batch_negatives)
        want = naive_batch_loss(BagOfBytes(), known_positive_examples(), dataset.examples, 2,
                                TEMPERATURE, in_batch_negatives)
        assert two[in_batch_negatives] == pytest.approx(want, rel=1e-9)


def test_two_ranks_fed_by_rank_0_train_as_one_process(two_ranks, tmp_path):
    """Rank 1 starts from shapes only and receives rank 0's weights once sharded; without
    dropout, 3 steps on 2 ranks end where 3 steps in one process do."""
    train.main(SMALL_JOB + ["--steps", "3", "--lora-dropout", "0", "--out", str(tmp_path / "one")])
    one, two = saved_weights(tmp_path / "one"), saved_weights(two_ranks / "c")
    assert set(one) == set(two)
    assert any("lora_B" in name and weight.abs().max() > 0
               for name, weight in one.items())  # it trained
    # Adam's first steps turn ~1e-8 gradient round-off into ~1e-5; a wrong rank 1, ~1e-2
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5, msg=name)


def test_stage_2_from_a_saved_model_on_two_ranks_trains_as_one_process(two_ranks, tmp_path):
    """--init-from on 2 ranks: rank 1 gets the saved model's architecture and tokenizer from rank
    0."""
    train.main(STAGE2_FROM + [str(two_ranks / "c"), "--out", str(tmp_path / "one")])
    one, two = saved_weights(tmp_path / "one"), saved_weights(two_ranks / "e")
    start = saved_weights(two_ranks / "c")
    assert set(one) == set(two) == set(start)
    assert any(not torch.allclose(one[name], start[name]) for name in one)  # stage 2 trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5, msg=name)


def logged_evals(folder):
    import json

    return [(r["when"], r["step"], r["NDCG@10"], r["Recall@100"])
            for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
            if r.get("event") == "eval"]


def test_evaluations_during_training_on_two_ranks_are_one_process_evaluations(two_ranks, tmp_path):
    """--eval-every on 2 ranks: each rank encodes a share with the FSDP-sharded model, rank 0 logs
    nDCG@10."""
    train.main(SMALL_JOB + EVAL_EVERY + ["--out", str(tmp_path / "one")])
    one, two = logged_evals(tmp_path / "one"), logged_evals(two_ranks / "f")
    assert [(when, step) for when, step, *_ in one] == [("before", 0), ("during", 2), ("after", 4)]
    assert len(two) == len(one)
    for (when, step, *metrics), (_, _, *want) in zip(two, one):
        assert metrics == pytest.approx(want, abs=1e-6), (when, step)
    assert logged_losses(two_ranks / "f") == \
        pytest.approx(logged_losses(tmp_path / "one"), rel=1e-5)


def test_evaluating_during_training_leaves_the_training_unchanged(tmp_path, single_process):
    train.main(SMALL_JOB + ["--steps", "4", "--out", str(tmp_path / "plain")])
    train.main(SMALL_JOB + ["--steps", "4", "--eval", "--eval-every", "1", "--out",
                            str(tmp_path / "evaluated")])
    # dropout's stream untouched
    assert logged_losses(tmp_path / "evaluated") == logged_losses(tmp_path / "plain")
    assert len(logged_evals(tmp_path / "evaluated")) == 1 + 3 + 1  # before, steps 1-3, after
    from bench import plot_ablation  # what draws the curves, bench/plot_ablation.py --runs

    curves = plot_ablation.run_curves(tmp_path / "evaluated")
    assert [step for step, _ in curves["ndcg"]] == [0, 1, 2, 3, 4] and len(curves["loss"]) == 4
    with open(tmp_path / "evaluated" / "log.jsonl", "a") as log:
        log.write("{not json\n")
    with pytest.raises(ValueError, match=r"log.jsonl:10: not JSON"):
        plot_ablation.run_curves(tmp_path / "evaluated")


def test_rank_0_failing_to_build_stops_every_rank_with_its_error(two_ranks):
    assert (two_ranks / "error0.txt").read_text() == "ValueError: checkpoint unreadable"
    assert (two_ranks / "error1.txt").read_text() == \
        "RuntimeError: rank 0 could not build the model: ValueError: checkpoint unreadable"


def test_two_rank_resume_gives_the_uninterrupted_result(two_ranks):
    a, b = saved_weights(two_ranks / "a"), saved_weights(two_ranks / "b")
    assert set(a) == set(b) and any("lora_A" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert logged_losses(two_ranks / "a") == logged_losses(two_ranks / "b")


# ---------------------------------------------------------------- resume, non-finite loss, config

# Stage 2 from a saved model (no dropout: its LoRA comes from run "c"), followed by that folder.
STAGE2_FROM = ["--stage", "2", "--steps", "2", "--batch-size", "8", "--max-length", "96",
               "--no-eval", "--no-progress", "--log-every", "1", "--save-every", "100",
               "--init-from"]

# Evaluations before, during (step 2) and after 4 steps, without dropout (so 2 ranks train as one
# process). 48 texts a batch: 100 queries and 500 documents make 3 and 11 batches, so one rank runs
# encode's lockstep forward.
EVAL_EVERY = ["--steps", "4", "--eval", "--eval-every", "2", "--lora-dropout", "0",
              "--eval-batch-size", "48"]

# A small job: LoRA with dropout, so resuming must restore the RNG states too.
SMALL_JOB = ["--batch-size", "8", "--hard-negatives", "2", "--max-length", "96", "--lora-rank", "4",
             "--lora-dropout", "0.1", "--num-latents", "8", "--warmup-steps", "2", "--lr", "1e-2",
             "--no-eval", "--no-progress", "--log-every", "1", "--save-every", "100"]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def saved_weights(folder):
    from safetensors.torch import load_file

    return {f"{name}/{k}": v for name in ("decoder", "pooling")
            for k, v in load_file(folder / "model" / f"{name}.safetensors").items()}


def logged_losses(folder):
    import json

    return [r["loss"] for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def test_resume_gives_the_uninterrupted_result(tmp_path, single_process):
    uninterrupted = train.main(SMALL_JOB + ["--steps", "6", "--out", str(tmp_path / "a")])
    stopped = train.main(SMALL_JOB + ["--steps", "6", "--stop-after", "3", "--out",
                                      str(tmp_path / "b")])
    assert stopped["step"] == 3 and stopped["model"] is None
    assert run_folder.latest_checkpoint(tmp_path / "b").name == "step_00000003"
    # A save that crashed midway leaves a .tmp folder; it must not be taken for a checkpoint.
    (tmp_path / "b" / "checkpoints" / "step_00000005.tmp").mkdir()
    resumed = train.main(SMALL_JOB + ["--steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    assert resumed["step"] == 6
    a, b = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    assert set(a) == set(b) and any("lora_A" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The logged losses of steps 4..6 are those of the uninterrupted run.
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")


def test_resume_past_a_corrupt_newest_checkpoint_gives_the_uninterrupted_result(
        tmp_path, single_process, capsys):
    """Issue 25's acceptance: of two checkpoints the newest is cut in half; --resume names it,
    continues from the one before, and ends bit-identical to a run never interrupted (weights,
    embeddings and logged losses)."""
    uninterrupted = train.main(SMALL_JOB + ["--steps", "6", "--out", str(tmp_path / "a")])
    job = SMALL_JOB + ["--steps", "6", "--save-every", "2", "--out", str(tmp_path / "b")]
    stopped = train.main(job + ["--stop-after", "4"])
    assert stopped["step"] == 4
    steps = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000004"]
    shard = next((tmp_path / "b" / "checkpoints" / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    capsys.readouterr()
    resumed = train.main(job + ["--resume"])
    said = capsys.readouterr().out
    assert f"notice: --resume skips step_00000004: {shard}" in said
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / 'step_00000002'} at step 2" in said
    assert resumed["step"] == uninterrupted["step"] == 6
    a, b = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    assert set(a) == set(b) and any("lora_A" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    from plumbing.loading import load

    texts = ["a red fox in the northern hills", "which bird sings at night", "a quiet harbour town"]
    embeddings = [load(tmp_path / run / "model").encode(texts, batch_size=2, convert_to_tensor=True)
                  for run in ("a", "b")]
    assert torch.equal(embeddings[0], embeddings[1])


def test_resume_refuses_another_configuration(tmp_path, single_process, capsys):
    train.main(SMALL_JOB + ["--steps", "4", "--stop-after", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as refused:
        train.main(SMALL_JOB + ["--steps", "4", "--lr", "1e-3", "--out", str(tmp_path), "--resume"])
    assert refused.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert ": error: --resume: " in last_line and "lr: checkpoint 0.01, now 0.001" in last_line


def test_non_finite_loss_stops_without_a_checkpoint(tmp_path, single_process, monkeypatch, capsys):
    real_loss, calls = train.contrastive_loss, []

    def loss_that_breaks(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "contrastive_loss", loss_that_breaks)
    with pytest.raises(SystemExit) as stopped:
        train.main(SMALL_JOB + ["--steps", "5", "--save-every", "1", "--out", str(tmp_path)])
    assert stopped.value.code == 1
    assert "step 3: the loss is nan" in capsys.readouterr().err
    assert run_folder.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (tmp_path / "model").exists()


def test_paper_recipe_with_a_real_model(tmp_path):
    checkpoint = tmp_path / "Mistral-7B"
    checkpoint.mkdir()
    stage1 = train.configure(["--model", str(checkpoint), "--device", "cpu"])
    # PAPER.md section 4.
    assert (stage1["lr"], stage1["batch_size"], stage1["hard_negatives"]) == (2e-5, 128, 7)
    assert (stage1["warmup_steps"], stage1["max_length"], stage1["temperature"]) == (500, 512, 0.01)
    assert (stage1["lora_rank"], stage1["lora_alpha"], stage1["lora_dropout"]) == (16, 32, 0.1)
    assert stage1["pooling"] == "latent" and stage1["pooling_kwargs"] == {"num_latents": 512}
    assert stage1["in_batch_negatives"] and not stage1["causal"] and stage1["out"] == "runs/stage1"
    stage2 = train.configure(["--stage", "2", "--model", str(checkpoint), "--device", "cpu"])
    assert stage2["lr"] == 1.5e-5 and not stage2["in_batch_negatives"]
    with pytest.raises(FileNotFoundError, match="no-such"):
        train.configure(["--model", str(tmp_path / "no-such")])


def test_quick_recipe_with_any_model_is_the_ablations_quick_setting(tmp_path):
    """--recipe quick with any --model gives bench/ablate.py's quick setting; --recipe overrides the
    default recipe (tiny for the tiny preset, paper for any other model), and flags override
    both."""
    from bench import ablate

    checkpoint = tmp_path / "SmolLM2-135M"
    checkpoint.mkdir()
    setting = ablate.SETTINGS["quick"]
    keys = ("max_length", "steps", "batch_size", "hard_negatives", "lr", "warmup_steps")
    for stage in ("1", "2"):
        quick = train.configure(["--model", str(checkpoint), "--recipe", "quick", "--stage", stage,
                                 "--device", "cpu"])
        assert {key: quick[key] for key in keys} == {key: setting[key] for key in keys}
        # latent head dim: D
        assert quick["pooling_kwargs"] == {"num_latents": setting["num_latents"]}
        assert quick["lora_rank"] == 16 and quick["recipe"] == "quick"  # ablate.py's --lora-rank 16
    paper_on_tiny = train.configure(["--recipe", "paper", "--lr", "1e-3", "--device", "cpu"])
    assert (paper_on_tiny["model"], paper_on_tiny["lr"], paper_on_tiny["batch_size"]) == \
        ("tiny", 1e-3, 128)
    assert train.configure(["--model", str(checkpoint), "--device", "cpu"])["recipe"] == "paper"
    assert train.configure(["--device", "cpu"])["recipe"] == "tiny"


# ---------------------------------------------------------------- stage 2's model and data


def stage_1_like_save(folder, base="tiny"):
    """What stage 1 with LoRA and --model-dtype bf16 saves: a bf16 base, fp32 adapters and
    pooling holding trained values (not representable in bf16)."""
    from lora import apply_lora

    model = from_base(base, pooling="latent", pooling_kwargs=dict(num_latents=8, head_dim=8),
                      dtype=torch.bfloat16)
    apply_lora(model.decoder, rank=4, alpha=8.0, dropout=0.0)
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if "lora_" in name or name.startswith("pooling."):
            param.data = 0.1 * torch.randn(param.shape, generator=generator, dtype=torch.float32)
    model.save(folder)
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if "lora_" in name or name.startswith("pooling.")}


@pytest.mark.parametrize("base", ["preset", "checkpoint"])
def test_stage_2_starts_from_stage_1s_trainable_weights_bit_for_bit(tmp_path, base):
    """A preset base saves the whole decoder; a checkpoint base saves the adapters only."""
    if base == "checkpoint":
        transformers = pytest.importorskip("transformers")
        from model import MistralConfig

        config = MistralConfig.preset("tiny")
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in config.__dict__.items()
               if k != "sliding_window"})).save_pretrained(tmp_path / "base")
        ByteTokenizer().save_pretrained(str(tmp_path / "base"))
    saved = stage_1_like_save(tmp_path / "stage1",
                              "tiny" if base == "preset" else str(tmp_path / "base"))
    model = train.build_model(dict(init_from=str(tmp_path / "stage1"), model=None, max_length=96,
                                   model_dtype="bf16", seed=0, lora_rank=4, lora_alpha=8.0,
                                   lora_dropout=0.0, name="stage2"))
    loaded = dict(model.named_parameters())
    for name, weight in saved.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].requires_grad, name
        assert torch.equal(loaded[name].detach(), weight), name
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # the base in --model-dtype


def test_builtin_stage_2_gives_in_batch_negatives_to_retrieval_only():
    retrieval, classification = builtin.builtin_sources(stage=2, hard_negatives=2,
                                                        in_batch_negatives=True)
    assert retrieval.task_type == "retrieval" and retrieval.in_batch_negatives
    assert classification.task_type == "classification" and not classification.in_batch_negatives
    assert classification.collate([0, 1], ByteTokenizer(),
                                  max_length=None)["in_batch_negatives"] is False
    assert "in-batch negatives off (retrieval data only)" in classification.summary()


# ---------------------------------------------------------------- the default command, end to end


def test_default_command_trains_and_saves_a_loadable_model(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --stage 1` (shortened), then stage 2 from its output.

    The full default job (no --steps) is what the README and .ci/run run; here fewer steps
    keep the test fast, and after training nDCG@10 must still beat the untrained model's.
    """
    import json
    import subprocess

    from model import NVEmbed

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    stage1 = tmp_path / "stage1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "train.py", "--stage", "1", "--steps", STAGE1_TEST_STEPS,
         "--out", str(stage1), "--no-progress"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evals = {r["when"]: r["NDCG@10"]
             for r in map(json.loads, (stage1 / "log.jsonl").read_text().splitlines())
             if r.get("event") == "eval"}
    assert evals["after"] > evals["before"] + 0.02, evals
    assert f"nDCG@10 before {evals['before']:.4f} -> after {evals['after']:.4f}" in result.stdout
    model = NVEmbed.load(stage1 / "model")
    embeddings = model.encode(["a small river in the north"])
    assert embeddings.shape == (1, model.decoder.config.hidden_size)
    assert json.loads((stage1 / "config.json").read_text())["stage"] == 1
    # --out's folder
    assert json.loads((stage1 / "model" / "config.json").read_text())["name"] == "stage1"

    # Stage 2 continues from stage 1 (single process here), in-batch negatives off.
    summary = train.main(["--stage", "2", "--init-from", str(stage1), "--steps", "3",
                          "--batch-size", "8", "--out", str(tmp_path / "stage2"), "--no-eval",
                          "--no-progress"])
    config = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert not config["in_batch_negatives"] and config["init_from"] == str(stage1)
    assert NVEmbed.load(summary["model"]).pooling_name == model.pooling_name
    with pytest.raises(ValueError, match="pooling"):
        train.configure(["--stage", "2", "--init-from", str(stage1), "--pooling", "mean"])


STAGE1_TEST_STEPS = "60"


def test_the_saved_models_name_is_name_or_the_out_folders():
    assert train.configure(["--out", "runs/my-run"])["name"] == "my-run"
    named = train.configure(["--out", "runs/x", "--name", "ablation-3"])
    assert named["name"] == "ablation-3"


# ----------------------------------------------------------------------------
# The fast step (issue 29) against the plain one: LoRA and attention as they were at abc58cb


def plain_lora_forward(self, x):
    """LoRALinear.forward before issue 29: the dropout's scale on the full-width input, a round
    trip through the adapters' dtype, the update added in its own pass."""
    base = torch.nn.functional.linear(x, self.weight, self.bias)
    down = torch.nn.functional.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)
    update = torch.nn.functional.linear(down, self.lora_B)
    return base + (self.scaling * update).to(base.dtype)


def plain_attention_forward(self, x, cos, sin, attn_mask, is_causal):
    """model.Attention.forward before issue 29: with a mask, every key/value head repeated for its
    group of query heads."""
    import model as model_module

    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q, k = model_module.apply_rotary(q, cos, sin), model_module.apply_rotary(k, cos, sin)
    groups = self.num_heads // self.num_kv_heads
    if attn_mask is not None:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=attn_mask is None)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def plain_attention_mask(attention_mask, causal, sliding_window):
    """model.attention_mask_4d before issue 29: (B, 1, T, T) always, each position seeing itself."""
    B, T = attention_mask.shape
    mask = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool).tril()
    return mask | torch.eye(T, dtype=torch.bool)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fast_step_equals_the_plain_step(monkeypatch, dtype):
    """One forward and backward of the quick setting's kind (a GQA decoder, LoRA with dropout on
    every projection, latent pooling; bf16: a bf16 base under autocast with fp32 adapters) gives
    the loss and gradients of the step as it was computed before issue 29, the same dropout masks
    drawn: equal to float32 round-off in fp32, to bf16 rounding in bf16."""
    import lora
    import model as model_module
    from data import collate

    config = dict(init_from=None, model="tiny", pooling="latent", causal=False, max_length=96,
                  model_dtype=dtype, seed=0, pooling_kwargs=dict(num_latents=8, head_dim=8),
                  name="tiny", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    model = train.build_model(config)
    assert model.decoder.config.num_key_value_heads < model.decoder.config.num_attention_heads
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # adapters that change the output
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    examples = builtin.builtin_dataset(seed=0).train_examples[:6]
    batch = collate(examples, model.tokenizer, max_length=96, num_hard_negatives=2)
    assert not batch["documents"]["attention_mask"].all()  # padded rows
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else None

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, _ = train.forward_backward(model, batch, 0.05, 1.0, torch.device("cpu"), autocast)
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}

    fast_loss, fast = step()
    monkeypatch.setattr(lora.LoRALinear, "forward", plain_lora_forward)
    monkeypatch.setattr(model_module.Attention, "forward", plain_attention_forward)
    monkeypatch.setattr(model_module, "attention_mask_4d", plain_attention_mask)
    plain_loss, plain = step()
    assert set(fast) == set(plain) and any("lora_A" in n for n in plain)
    tolerance = 1e-5 if dtype == "fp32" else 2e-2
    assert fast_loss == pytest.approx(plain_loss, rel=tolerance)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=tolerance,
                                   atol=tolerance * plain[name].abs().max().item(), msg=name)


def test_length_chunks_finds_the_cheapest_cut_of_sorted_rows():
    """The dynamic programme against every way of cutting a few sorted rows into ranges."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        lengths = sorted((rng.randint(1, 512) for _ in range(rng.randint(1, 9))), reverse=True)
        pass_cost = rng.choice([0, 50, 512, 5000])

        def cost(cuts):
            return sum((end - start) * lengths[start] + pass_cost for start, end in cuts)
        every = []
        for mask in itertools.product([0, 1], repeat=len(lengths) - 1):
            ends = [i + 1 for i, cut in enumerate(mask) if cut] + [len(lengths)]
            every.append(list(zip([0] + ends[:-1], ends)))
        chunks = batch_passes.length_chunks(lengths, pass_cost)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert cost(chunks) == min(cost(cuts) for cuts in every)


@pytest.mark.parametrize("pass_cost", [0, 10 ** 9])
def test_length_sorted_passes_give_the_plain_step(monkeypatch, pass_cost):
    """Documents sorted by length and embedded in many passes (no cost per pass) or one (a
    prohibitive one): the loss and gradients of one padded pass, dropout off."""
    from data import collate
    from loss import contrastive_loss

    config = dict(init_from=None, model="tiny", pooling="latent", causal=False, max_length=96,
                  model_dtype="fp32", seed=0, pooling_kwargs=dict(num_latents=8, head_dim=8),
                  name="tiny", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    model = train.build_model(config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    batch = collate(builtin.builtin_dataset(seed=0).train_examples[:6], model.tokenizer,
                    max_length=96, num_hard_negatives=2)
    cpu = torch.device("cpu")

    def gradients():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    query_emb = model(train.to_device(batch["queries"], cpu))
    doc_emb = model(train.to_device(batch["documents"], cpu))
    plain_loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], 0.05,
                                  known_positive_keys=batch["known_positive_keys"])
    plain_loss.backward()
    plain = gradients()
    passes, length_chunks = [], batch_passes.length_chunks
    monkeypatch.setattr(batch_passes, "SORT_FROM_LENGTH", 0)  # the built-in texts are short
    monkeypatch.setattr(batch_passes, "PASS_COST_SLOTS", pass_cost)
    monkeypatch.setattr(batch_passes, "length_chunks", lambda *a: passes.append(length_chunks(*a))
                        or passes[-1])
    model.zero_grad(set_to_none=True)
    loss, _ = train.forward_backward(model, batch, 0.05, 1.0, cpu)
    assert len(passes) == 1 and (len(passes[0]) == 1 if pass_cost else len(passes[0]) > 2)
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in gradients().items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_slow_steps_are_logged_and_saved_by_the_clock(tmp_path, single_process, monkeypatch,
                                                      capsys):
    """Steps of 40 s (a clock advanced by hand): a step line after each one though --log-every is
    100, and a checkpoint once a minute has passed though --save-every is 100 (not after the last
    step: the final model is saved then)."""
    import time
    import types

    from plumbing import mfu

    now = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: now[0],
                                                             perf_counter=lambda: now[0]))
    monkeypatch.setattr(mfu, "time", types.SimpleNamespace(monotonic=lambda: now[0],
                                                           perf_counter=time.perf_counter))
    step = train.train_step

    def slow_step(*args):
        now[0] += 40.0
        return step(*args)
    monkeypatch.setattr(train, "train_step", slow_step)
    out = tmp_path / "run"
    train.main(["--steps", "4", "--batch-size", "8", "--no-eval", "--no-progress", "--out",
                str(out), "--log-every", "100", "--save-every", "100", "--save-every-minutes", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 2, 3, 4]
    assert "40000 ms/step" in lines[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]


def test_the_cpu_peak_is_timed_once_and_remeasured_to_the_highest(monkeypatch):
    """cpu_peak_flops times the matmul once per process; remeasure times it again and keeps the
    highest, since a timing beside another job is only ever too low."""
    from plumbing import mfu

    timings = iter([100e9, 50e9, 200e9, 150e9])
    monkeypatch.setattr(mfu, "matmul_flops", lambda dtype: next(timings))
    monkeypatch.setattr(mfu, "_cpu_peaks", {})
    assert mfu.cpu_peak_flops(torch.bfloat16) == 100e9
    assert mfu.cpu_peak_flops(torch.bfloat16) == 100e9  # remembered, not timed again
    assert mfu.cpu_peak_flops(torch.bfloat16, remeasure=True) == 100e9  # 50: too low, kept 100
    assert mfu.cpu_peak_flops(torch.bfloat16, remeasure=True) == 200e9
    assert mfu.cpu_peak_flops(torch.bfloat16, remeasure=True) == 200e9  # 150 < 200


def test_dtype_auto_takes_the_faster_matmul_and_says_why(monkeypatch, capsys):
    from plumbing import mfu

    for speeds, want in (((600e9, 100e9), "bf16"), ((50e9, 100e9), "fp32")):
        peaks = dict(zip((torch.bfloat16, torch.float32), speeds))
        monkeypatch.setattr(mfu, "cpu_peak_flops", lambda dtype: peaks[dtype])
        config = train.configure(["--dtype", "auto", "--device", "cpu"])
        assert config["dtype"] == want
        gflops = dict(bf16=speeds[0] / 1e9, fp32=speeds[1] / 1e9)
        assert config["dtype_choice"] == dict(chosen_by="matmul GFLOP/s", gflops=gflops)
        said = capsys.readouterr().out
        assert f"--dtype auto: {want} (a 1024 x 1024 matmul ran at {speeds[0] / 1e9:,.0f} GFLOP/s" \
            in said
    config = train.configure(["--dtype", "fp32"])
    assert config["dtype"] == "fp32" and config["dtype_choice"] == dict(chosen_by="--dtype")
