"""NVEmbed.save(layout="sentence-transformers") (plumbing/st_layout.py): SentenceTransformer(folder)
gives NVEmbed.encode's vectors, for documents and for prompted queries, on tiny models (the byte
tokenizer, which starts rows with BOS, and a byte-level BPE whose prompt merges with the text's
first word as SmolLM2's does); the layout="hf" folder that sentence-transformers refuses; and
NVEmbed's sentence-transformers API (prompts, encode_query, encode_document, similarity), which
needs no sentence-transformers."""

import ast
import json

import numpy as np
import pytest
import torch

from model import NVEmbed
from plumbing.errors import CheckpointError, UsageError
from plumbing.loading import from_base
from plumbing.st_layout import byte_tokenizer, check_rows
from tests.test_export import adapted, needs_bidirectional_transformers

INSTRUCTION = "Given a claim, find documents"
TEXTS = ["vitamin D lowers the risk", "a much longer text that needs padding in the batch", "x",
         "", " a leading space", "(in brackets) 1990s", "naïve café " * 12]  # the last is cut
MAX_LENGTH = 64  # the prompt takes 48 of them with BOS: a long query loses text, never EOS


def sentence_transformers():
    return pytest.importorskip("sentence_transformers", reason="the sentence-transformers layout "
                               "is read by sentence-transformers, an extra (pip install "
                               "sentence-transformers)")


def tiny(pooling="latent", **kwargs):
    pooling_kwargs = dict(num_latents=8) if pooling == "latent" else None
    model = from_base("tiny", pooling=pooling, pooling_kwargs=pooling_kwargs, max_length=MAX_LENGTH,
                      **kwargs).eval()
    model.prompts["query"] = model.text_rule.template.format(instruction=INSTRUCTION)
    return model


def assert_same_embeddings(model, folder, remote_code):
    """NVEmbed's documents, queries (the folder's query prompt) and a prompt passed by hand, against
    sentence-transformers' on `folder`, to 1e-5."""
    st = sentence_transformers().SentenceTransformer(str(folder), device="cpu",
                                                     trust_remote_code=remote_code)
    prompt = model.text_rule.template.format(instruction="Retrieve the vitamin")
    pairs = [(model.encode_document(TEXTS), st.encode_document(TEXTS, batch_size=3)),
             (model.encode_query(TEXTS), st.encode_query(TEXTS, batch_size=3)),
             (model.encode(TEXTS, prompt=prompt), st.encode(TEXTS, prompt=prompt, batch_size=2))]
    for ours, theirs in pairs:
        np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert not np.allclose(pairs[0][0], pairs[1][0], atol=1e-3)  # the prompt was not lost
    return st


@pytest.mark.parametrize("pooling, lora, causal", [("mean", False, False), ("latent", False, False),
                                                   ("latent", True, False),
                                                   ("self-attention", False, False),
                                                   ("eos", False, False), ("eos", True, True)])
def test_sentence_transformers_gives_encode(tmp_path, pooling, lora, causal):
    needs_bidirectional_transformers()
    model = tiny(pooling, causal=causal)
    model = adapted(model) if lora else model
    model.save(tmp_path / "st", layout="sentence-transformers")
    native = pooling == "eos"  # sentence-transformers' own Pooling, no remote code
    st = assert_same_embeddings(model, tmp_path / "st", remote_code=not native)
    assert type(st[1]).__name__ == ("Pooling" if native else "NVEmbedPooling")
    assert type(st[0]).__module__.startswith("sentence_transformers") == native
    assert [type(m).__name__ for m in st][2:] == ["Normalize"]
    config = json.loads((tmp_path / "st" / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == model.prompts and config["default_prompt_name"] is None
    assert json.loads((tmp_path / "st" / "config.json").read_text())["is_causal"] is causal
    assert st.max_seq_length == MAX_LENGTH


def test_a_rule_that_pools_the_instruction(tmp_path):
    """TextRule.mask_instruction=False pools the prompt's tokens too (never BOS): include_prompt."""
    needs_bidirectional_transformers()
    model = tiny("mean")
    model.text_rule = type(model.text_rule)(mask_instruction=False)
    model.save(tmp_path / "st", layout="sentence-transformers")
    assert_same_embeddings(model, tmp_path / "st", remote_code=True)


def test_eos_pooling_loads_without_remote_code(tmp_path):
    model = tiny("eos")
    model.save(tmp_path / "st", layout="sentence-transformers")
    assert not (tmp_path / "st" / "nvembed_st.py").exists()
    mean = tiny("mean")
    mean.save(tmp_path / "mean", layout="sentence-transformers")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        sentence_transformers().SentenceTransformer(str(tmp_path / "mean"), device="cpu")


CHAT = "{% for m in messages %}{{ m.content }}{% endfor %}"


def bpe_tokenizer(bos: bool):
    """A byte-level BPE as SmolLM2's, with two merges: 'Ġ' 'v' and 'Ġv' 'i'. "Query: " alone ends
    in 'Ġ', but "Query: vitamin" is ':' 'Ġvi' 't' ...: the prompt's last token merges with the
    text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)} | {"Ġv": 256, "Ġvi": 257}
    tokens = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "v"), ("Ġv", "i")]))
    tokens.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokens.decoder = decoders.ByteLevel()
    tokens.add_special_tokens([AddedToken("<eos>", special=True), AddedToken("<s>", special=True)])
    # The folder's pads right and has no chat template (sentence-transformers would render one).
    return PreTrainedTokenizerFast(tokenizer_object=tokens, eos_token="<eos>", bos_token="<s>",
                                   add_bos_token=bos, padding_side="left", chat_template=CHAT)


@pytest.mark.parametrize("bos", [False, True])
def test_a_prompt_that_merges_with_the_text(tmp_path, bos):
    """The prompt's tokens are those data.tokenize splits off, row by row: not the prompt encoded
    alone (one more where it merges: before "vitamin", not before " a leading space")."""
    needs_bidirectional_transformers()
    from data import _split_prefix, bos_ids
    tokenizer = bpe_tokenizer(bos)
    prompt = "Instruct: " + INSTRUCTION + "\nQuery: "
    alone = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    split = [len(prefix) for prefix, _ in _split_prefix(tokenizer, prompt, TEXTS)]
    assert split[0] == alone - 1 and split[4] == alone and len(bos_ids(tokenizer)) == bos
    base = tiny("mean")
    model = NVEmbed(base.decoder, base.pooling, tokenizer, "mean", max_length=MAX_LENGTH,
                    prompts=dict(query=prompt)).eval()
    model.save(tmp_path / "st", layout="sentence-transformers")
    st = assert_same_embeddings(model, tmp_path / "st", remote_code=True)
    assert st.tokenizer.padding_side == "right" and st.tokenizer.chat_template is None


def test_module_file_imports_only_torch_and_sentence_transformers(tmp_path):
    tiny("self-attention").save(tmp_path / "st", layout="sentence-transformers")
    tree = ast.parse((tmp_path / "st" / "nvembed_st.py").read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert roots == {"__future__", "torch", "sentence_transformers"}
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"SelfAttentionPooling", "NVEmbedTransformer", "NVEmbedPooling"} <= classes


def test_refused_without_a_query_prompt_or_with_the_released_rule(tmp_path):
    model = from_base("tiny", pooling="mean")
    with pytest.raises(UsageError, match=r"model.prompts\['query'\]"):
        model.save(tmp_path / "none", layout="sentence-transformers")
    assert not (tmp_path / "none").exists()
    model.prompts["query"] = ""  # said: queries take no instruction
    model.save(tmp_path / "empty", layout="sentence-transformers")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "empty", layout="sentence-transformers")
    no_eos = byte_tokenizer()  # no post-processor: no BOS, no EOS
    with pytest.raises(CheckpointError, match="cannot write a tokenizer"):
        check_rows(no_eos, model.tokenizer, tmp_path / "x")
    model.text_rule = type(model.text_rule)(truncation="sequence")  # one of NVIDIA's variants
    with pytest.raises(UsageError, match="released"):
        model.save(tmp_path / "released", layout="sentence-transformers", overwrite=True)


def test_hf_layout_is_refused_by_sentence_transformers_naming_the_layout(tmp_path):
    """Without its guard files sentence-transformers would read the folder as mean pooling over
    every token (BOS, instruction and all): silently another embedder."""
    model = tiny("mean")
    model.save(tmp_path / "hf", layout="hf")
    for remote_code in (False, True):
        with pytest.raises(ImportError, match='layout="sentence-transformers"'):
            sentence_transformers().SentenceTransformer(str(tmp_path / "hf"), device="cpu",
                                                        trust_remote_code=remote_code)
    np.testing.assert_array_equal(NVEmbed.load(tmp_path / "hf").encode(TEXTS), model.encode(TEXTS))


# ----------------------------------------------------------------------------
# NVEmbed's sentence-transformers API: prompts, prompt_name, encode_query / _document, similarity


def test_encode_query_uses_the_query_prompt():
    model = tiny("latent")
    with_instruction = model.encode(TEXTS, instruction=INSTRUCTION)
    np.testing.assert_array_equal(model.encode_query(TEXTS), with_instruction)
    np.testing.assert_array_equal(model.encode(TEXTS, prompt_name="query"), with_instruction)
    other = model.encode(TEXTS, instruction="Find the vitamin")
    np.testing.assert_array_equal(model.encode_query(TEXTS, instruction="Find the vitamin"), other)
    np.testing.assert_array_equal(model.encode_query(TEXTS, prompt=""), model.encode(TEXTS))
    assert not np.allclose(with_instruction, model.encode(TEXTS), atol=1e-3)
    with pytest.raises(ValueError, match="not one of prompts"):
        model.encode(TEXTS, prompt_name="passage")
    del model.prompts["query"]
    with pytest.raises(ValueError, match=r"no prompts\['query'\]"):
        model.encode_query(TEXTS)


def test_encode_document_has_no_prompt_unless_the_model_has_one():
    model = tiny("mean")
    np.testing.assert_array_equal(model.encode_document(TEXTS), model.encode(TEXTS))
    model.prompts["passage"] = "passage: "
    np.testing.assert_array_equal(model.encode_document(TEXTS),
                                  model.encode(TEXTS, prompt="passage: "))
    np.testing.assert_array_equal(model.encode_document(TEXTS, prompt=""), model.encode(TEXTS))


def test_prompts_are_saved_with_the_model(tmp_path):
    model = tiny("mean")
    model.prompts["passage"] = "passage: "
    for layout in ("own", "hf"):
        model.save(tmp_path / layout, layout=layout)
        assert NVEmbed.load(tmp_path / layout).prompts == model.prompts


def test_similarity_is_the_cosine():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=generator), torch.randn(4, 5, generator=generator) * 7
    # one pair at a time
    expected = [[float(x @ y) / float(x.norm() * y.norm()) for y in b] for x in a]
    for first, second in ((a, b), (a.numpy(), b.numpy()), (a.double(), b.numpy())):
        scores = NVEmbed.similarity(first, second)
        assert scores.shape == (3, 4) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)
    assert NVEmbed.similarity(a[0], b).shape == (1, 4)  # one vector is one row
    model = tiny("mean")
    queries, documents = model.encode_query(TEXTS[:2]), model.encode_document(TEXTS)
    torch.testing.assert_close(model.similarity(queries, documents),
                               torch.from_numpy(queries @ documents.T), atol=1e-6, rtol=0)


def test_mine_still_reads_an_hf_layout_folder_as_a_saved_model(tmp_path):
    """Its guard modules.json does not make mine.py take it for a sentence-transformers teacher."""
    import mine
    from plumbing.datafiles import write_beir
    corpus = {f"d{i}": {"title": "", "text": text} for i, text in enumerate(TEXTS[:3])}
    write_beir(tmp_path / "beir", corpus, {"q0": "vitamin", "q1": "longer"},
               {"train": {"q0": {"d0": 1}, "q1": {"d1": 1}}})
    from_base("tiny", pooling="mean").save(tmp_path / "hf", layout="hf")
    _, stats = mine.main(["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "beir"),
                          "--split", "train", "--instruction", INSTRUCTION, "--top-k", "2",
                          "--out", str(tmp_path / "mined.jsonl")])
    assert stats["model"] == str(tmp_path / "hf") and stats["examples"] == 2
