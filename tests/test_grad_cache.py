"""GradCache (train.forward_backward_cached) against the plain full-batch step
(train.forward_backward).

The reference for chunks with dropout is a naive step that keeps every chunk's graph: it embeds the
chunks in the same order from the same random state, so it draws the masks GradCache's first pass
draws. Two ranks against one process: tests/test_train.py (its spawned workers)."""

import pytest
import torch

from plumbing import builtin, passes
import data
import loss as loss_module
import train
from tests.test_train import (SMALL_JOB, logged_losses, saved_weights,  # noqa: F401 (fixture)
                              single_process)

CPU = torch.device("cpu")
TEMPERATURE = 0.05


def tiny_model(kind, dropout=0.0, seed=0):
    config = dict(init_from=None, model="tiny", pooling="latent", causal=False, max_length=96,
                  model_dtype="fp32", seed=seed, pooling_kwargs=dict(num_latents=8, head_dim=8),
                  name="tiny", lora_rank=4 if kind == "lora" else 0, lora_alpha=8.0,
                  lora_dropout=dropout)
    return train.build_model(config)


def batch_for(model, in_batch_negatives=True, num_hard_negatives=2):
    """8 queries x (1 + 2) documents of the built-in data, of different lengths (so chunks are cut
    differently)."""
    examples = builtin.builtin_dataset(seed=0).train_examples[:8]
    return data.collate(examples, model.tokenizer, max_length=96,
                        num_hard_negatives=num_hard_negatives,
                        in_batch_negatives=in_batch_negatives)


def gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def step(model, batch, chunk_size=None, seed=1):
    """One backward pass from random state `seed`: plain (chunk_size None) or GradCache; (loss,
    gradients)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if chunk_size is None:
        loss, _ = train.forward_backward(model, batch, TEMPERATURE, 1.0, CPU)
    else:
        loss, _ = train.forward_backward_cached(model, batch, TEMPERATURE, chunk_size, CPU)
    return loss.item(), gradients(model)


def chunked_with_graphs(model, batch, chunk_size, seed=1):
    """The naive reference: each chunk embedded once, with its graph kept, in GradCache's order; one
    backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    embed = [[model(chunk)
              for chunk in passes.text_chunks(train.to_device(batch[part], CPU), chunk_size)]
             for part in ("queries", "documents")]
    loss = loss_module.contrastive_loss(torch.cat(embed[0]), torch.cat(embed[1]), batch["doc_keys"],
                                        TEMPERATURE, in_batch_negatives=batch["in_batch_negatives"],
                                  known_positive_keys=batch["known_positive_keys"])
    loss.backward()
    return loss.item(), gradients(model)


def assert_same_gradients(got, want, what):
    assert set(got) == set(want) and want, what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6,
                                   msg=f"{what}: {name}")


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("in_batch_negatives", [True, False])
# 4 divides 8 queries and 24 documents, 5 neither
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 100])
def test_grad_cache_gives_the_plain_steps_gradients(kind, in_batch_negatives, chunk_size):
    model = tiny_model(kind)
    batch = batch_for(model, in_batch_negatives)
    want_loss, want = step(model, batch)
    got_loss, got = step(model, batch, chunk_size)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_gradients(got, want, f"{kind}, chunk {chunk_size}")


def test_grad_cache_with_activation_checkpointing():
    model = tiny_model("lora", dropout=0.1)
    batch = batch_for(model)
    want_loss, want = chunked_with_graphs(model, batch, 3)
    model.decoder.activation_checkpointing = True
    got_loss, got = step(model, batch, 3)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_gradients(got, want, "activation checkpointing")


@pytest.mark.parametrize("chunk_size", [3, 7])
def test_grad_cache_replays_lora_dropout(chunk_size):
    """With dropout each chunk draws its own masks: GradCache's gradients are those of the loss its
    first pass computed, which the naive reference computes with every graph kept."""
    model = tiny_model("lora", dropout=0.1)
    batch = batch_for(model)
    want_loss, want = chunked_with_graphs(model, batch, chunk_size)
    got_loss, got = step(model, batch, chunk_size)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_gradients(got, want, f"dropout, chunk {chunk_size}")
    # Dropout is on: another random state gives other gradients (so the equality above means
    # something).
    _, other = chunked_with_graphs(model, batch, chunk_size, seed=2)
    assert any(not torch.allclose(other[name], want[name], rtol=1e-3, atol=1e-5) for name in want)


def test_a_chunk_as_large_as_the_batch_draws_the_plain_steps_dropout():
    model = tiny_model("lora", dropout=0.1)
    batch = batch_for(model)
    want_loss, want = step(model, batch)
    got_loss, got = step(model, batch, 100)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_gradients(got, want, "one chunk per part")


def test_a_second_pass_without_the_replayed_masks_is_detected(monkeypatch):
    """Dropout masks drawn afresh in the second pass: GradCache refuses to backpropagate
    (check_replay), and the gradients, were they taken anyway, would differ from the reference's."""
    model = tiny_model("lora", dropout=0.1)
    # as after some training: at init (B = 0) LoRA's dropout cannot move an embedding
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    batch = batch_for(model)
    _, want = chunked_with_graphs(model, batch, 3)
    monkeypatch.setattr(passes.RandomState, "replay", lambda self: torch.enable_grad())  # no replay
    with pytest.raises(RuntimeError, match="chunk 0 embedded differently the second time"):
        step(model, batch, 3)
    monkeypatch.setattr(train, "check_replay", lambda *args: None)
    _, got = step(model, batch, 3)
    assert any(not torch.allclose(got[name], want[name], rtol=1e-3, atol=1e-5) for name in want)


def test_chunks_are_cut_to_their_own_longest_row():
    model = tiny_model("full")
    batch = batch_for(model)
    documents = batch["documents"]
    chunks = passes.text_chunks(train.to_device(documents, CPU), 5)
    assert [c["input_ids"].shape[0] for c in chunks] == [5, 5, 5, 5, 4]
    lengths = documents["attention_mask"].sum(1)
    for i, chunk in enumerate(chunks):
        assert chunk["input_ids"].shape[1] == int(lengths[5 * i:5 * i + 5].max())
        for key in ("input_ids", "attention_mask", "pool_mask"):
            width = chunk[key].shape[1]
            assert torch.equal(chunk[key], documents[key][5 * i:5 * i + 5, :width])
    # some were cut
    assert any(c["input_ids"].shape[1] < documents["input_ids"].shape[1] for c in chunks)


def test_training_with_grad_cache_ends_where_the_plain_run_does(tmp_path,
                                                                single_process):  # noqa: F811
    """3 optimizer steps: chunks of 3 without dropout, and one chunk per part with dropout, equal
    the plain runs."""
    for dropout, chunk in (("0", "3"), ("0.1", "100")):
        job = SMALL_JOB + ["--steps", "3", "--lora-dropout", dropout]
        train.main(job + ["--out", str(tmp_path / f"plain{dropout}")])
        train.main(job + ["--grad-cache", chunk, "--out", str(tmp_path / f"cached{dropout}")])
        plain, cached = saved_weights(tmp_path / f"plain{dropout}"), \
            saved_weights(tmp_path / f"cached{dropout}")
        assert set(plain) == set(cached)
        for name in plain:
            torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=5e-5, msg=name)
        want, got = logged_losses(tmp_path / f"plain{dropout}"), \
            logged_losses(tmp_path / f"cached{dropout}")
        assert got == pytest.approx(want, rel=1e-5)


def test_grad_cache_flags_are_checked():
    with pytest.raises(Exception, match="choose one"):
        train.configure(["--grad-cache", "4", "--grad-accum", "2"])
    with pytest.raises(Exception, match="--grad-cache must be"):
        train.configure(["--grad-cache", "-1"])


def test_grad_cache_under_bf16_autocast():
    """bf16 compute (the GPU recipe) over fp32 trainable weights: the plain step's gradients to bf16
    round-off."""
    model = tiny_model("lora")
    batch = batch_for(model)
    grads = []
    for chunk_size in (None, 5):
        model.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        if chunk_size is None:
            train.forward_backward(model, batch, TEMPERATURE, 1.0, CPU, autocast)
        else:
            train.forward_backward_cached(model, batch, TEMPERATURE, chunk_size, CPU, autocast)
        grads.append(gradients(model))
    want, got = grads
    assert set(got) == set(want) and want
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=5e-2,
                                   atol=5e-2 * want[name].abs().max().item(), msg=name)
