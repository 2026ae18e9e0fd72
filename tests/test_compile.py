"""NVEmbed.compile (compiled.py) against the same model run eagerly: outputs and gradients, and the
recompile bound.

Inductor compiles slowly on 2 CPU cores (minutes for the latent pooling's graphs), so one test uses
it, on the decoder (the numerics it changes); the other tests use the "aot_eager" backend, which
runs dynamo's tracing, guards (what decides a recompilation) and AOT autograd without code
generation.
"""

import copy
import json

import torch

import evaluate
from plumbing.run_folder import check_resume_config
import train
from plumbing import mfu
from plumbing.compiled import compile_counts
from model import NVEmbed
from plumbing.loading import from_base

TEXTS_A = ["a short one", "a rather longer text about rivers and hills", "mid length words"]
TEXTS_B = ["x", "another batch, with more rows and other lengths than the first", "two",
           "three four", "fifth"]


def tiny(pooling="latent"):
    model = from_base("tiny", pooling=pooling, seed=0,
                      pooling_kwargs=dict(num_latents=8, head_dim=8) if pooling == "latent"
                      else None)
    return model.train()


def embed_and_backward(model, texts):
    """(B, D) embeddings of `texts` and {name: gradient} of sum(embeddings * fixed weights)."""
    model.zero_grad(set_to_none=True)
    batch = model.tokenize(texts)
    batch.pop("truncated")
    assert not batch["attention_mask"].all()  # padded: the attention-mask path
    embeddings = model(batch)  # (B, D)
    weights = torch.linspace(-1, 1, embeddings.numel()).view_as(embeddings)
    (embeddings * weights).sum().backward()
    return embeddings.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_inductor_outputs_and_gradients_equal_eager_and_another_length_does_not_recompile():
    # the decoder's one graph; the latent pooling's three would triple the compile time
    eager = tiny("mean")
    compiled = copy.deepcopy(eager).compile()
    for texts in (TEXTS_A, TEXTS_B):  # 3 rows, then 5 rows of other lengths
        want, want_grads = embed_and_backward(eager, texts)
        got, got_grads = embed_and_backward(compiled, texts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=name)
        if texts is TEXTS_A:
            graphs_after_first = compile_counts()["graphs"]
    assert compile_counts()["graphs"] == graphs_after_first  # the second batch compiled nothing


def test_graphs_are_shared_by_the_layers_and_reused_for_other_sizes():
    """The bound compiled.py documents: one graph per (gradients on/off, padding mask or none, size
    1 or not); other lengths and batch sizes reuse it, and the two decoder layers share it (mean
    pooling: not compiled)."""
    # Dynamo keeps its graphs per code object (DecoderLayer.forward) for the whole process, and
    # stops compiling a frame after config.recompile_limit (8) of them: the other tests' graphs
    # would leave this one none to count.
    torch._dynamo.reset()
    model = tiny("mean").compile(backend="aot_eager")
    start = compile_counts()["graphs"]
    embed_and_backward(model, TEXTS_A)
    assert compile_counts()["graphs"] - start == 1  # one layer graph for both layers
    for texts in (TEXTS_B, TEXTS_A[:2], ["more text " * 9, "and two more short", "ok", "fine"]):
        embed_and_backward(model, texts)
    assert compile_counts()["graphs"] - start == 1
    # gradients off: one more graph, for every padded batch of encode
    model.encode(TEXTS_A + TEXTS_B, batch_size=4)
    model.encode(TEXTS_B + TEXTS_A[:1], batch_size=3)
    assert compile_counts()["graphs"] - start == 2
    model.encode(["same text"] * 4, batch_size=4)  # no padding: the layers take attn_mask None
    assert compile_counts()["graphs"] - start == 3
    # a one-row batch: size 1 is specialised
    model.encode(["one text", "and another"], batch_size=1)
    assert compile_counts()["graphs"] - start == 4


def test_compile_keeps_parameter_names_and_activation_checkpointing_gradients():
    eager = tiny()
    compiled = copy.deepcopy(eager).compile(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way
    # the recomputation runs the compiled layer again
    compiled.decoder.activation_checkpointing = True
    want, want_grads = embed_and_backward(eager, TEXTS_B)
    got, got_grads = embed_and_backward(compiled, TEXTS_B)
    torch.testing.assert_close(got, want)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


def test_train_compile_flag_compiles_each_layer_before_sharding():
    config = train.configure(["--compile", "--device", "cpu"])
    assert config["compile"]
    model = train.parallelize(tiny(), torch.device("cpu"), compile=config["compile"])
    for module in (*model.decoder.layers, model.pooling):
        assert hasattr(module.forward, "_torchdynamo_orig_callable")  # what torch.compile returns
    plain = train.parallelize(tiny(), torch.device("cpu"))
    assert not hasattr(plain.decoder.layers[0].forward, "_torchdynamo_orig_callable")


def test_evaluate_compile_flag_scores_as_eager(tmp_path, monkeypatch, capsys):
    compile_for_tests = NVEmbed.compile
    monkeypatch.setattr(NVEmbed, "compile",
                        lambda self: compile_for_tests(self, backend="aot_eager"))
    flags = ["--model", "tiny", "--top-k", "10", "--k-values", "1,10", "--batch-size", "64"]
    eager = evaluate.main(flags + ["--out", str(tmp_path / "eager")])
    assert "torch.compile" not in capsys.readouterr().out
    compiled = evaluate.main(flags + ["--compile", "--out", str(tmp_path / "compiled")])
    assert "torch.compile: graphs " in capsys.readouterr().out
    assert compiled == eager
    assert json.loads((tmp_path / "compiled" / "builtin-test.json")
                      .read_text())["config"]["compile"]


def test_step_log_records_the_graphs_compiled(tmp_path):
    flags = ["--device", "cpu", "--out", str(tmp_path), "--log-every", "1", "--no-progress"]
    stats = dict(loss=1.0, lr=1e-3, grad_norm=1.0, tokens=10, flops=100.0)
    for extra in ([], ["--compile"]):
        config = train.configure(flags + extra)
        mfu.StepLog(config, torch.device("cpu"), initial_step=0).add(1, stats, 0.5, "data",
                                                                     last_step=1)
    eager, compiled = [json.loads(line)
                       for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "compiled" not in eager
    assert compiled["compiled"] == compile_counts()


def test_a_run_resumes_with_or_without_compile_and_from_before_the_flag(tmp_path):
    config = train.configure(["--device", "cpu", "--out", str(tmp_path)])
    before_the_flag = {k: v for k, v in config.items() if k != "compile"}
    (tmp_path / "trainer_state.json").write_text(json.dumps(dict(config=before_the_flag)))
    for compile_ in (False, True):
        # no error: the same step, compiled or not
        check_resume_config(tmp_path, {**config, "compile": compile_})


def test_compiling_raises_dynamos_recompile_limit_and_counts_its_hits(monkeypatch):
    """Past the limit dynamo runs a frame eagerly with only a warning: compile_forward raises the
    limit (several models in one process share DecoderLayer.forward's graphs), and compile_counts
    says when it was hit anyway."""
    from plumbing.compiled import RECOMPILE_LIMIT, compile_forward

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    compile_forward(torch.nn.Linear(2, 2), backend="eager")
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT >= 32
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)

    def double(x):
        return 2 * x

    before = compile_counts()["recompile_limit_hits"]
    compiled = torch.compile(double, backend="eager", dynamic=False)
    # a new static shape each call: the second needs a second graph, past the limit of 1
    for n in (1, 2, 3):
        assert torch.equal(compiled(torch.ones(n)), 2 * torch.ones(n))
    assert compile_counts()["recompile_limit_hits"] - before == 1
