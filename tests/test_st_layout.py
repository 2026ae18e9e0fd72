"""NVEmbed's sentence-transformers API (prompts, prompt_name, encode_query, encode_document,
similarity), which needs no sentence-transformers."""

import numpy as np
import pytest
import torch

from model import NVEmbed
from plumbing.loading import from_base

INSTRUCTION = "Given a claim, find documents"
TEXTS = ["vitamin D lowers the risk", "a much longer text that needs padding in the batch", "x",
         "", " a leading space", "(in brackets) 1990s", "naïve café " * 12]  # the last is cut
MAX_LENGTH = 64


def tiny(pooling="latent", **kwargs):
    pooling_kwargs = dict(num_latents=8) if pooling == "latent" else None
    model = from_base("tiny", pooling=pooling, pooling_kwargs=pooling_kwargs, max_length=MAX_LENGTH,
                      **kwargs).eval()
    model.prompts["query"] = model.text_rule.template.format(instruction=INSTRUCTION)
    return model


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
    expected = [[float(x @ y) / float(x.norm() * y.norm()) for y in b] for x in a]  # one pair at a time
    for first, second in ((a, b), (a.numpy(), b.numpy()), (a.double(), b.numpy())):
        scores = NVEmbed.similarity(first, second)
        assert scores.shape == (3, 4) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-6, rtol=0)
    assert NVEmbed.similarity(a[0], b).shape == (1, 4)  # one vector is one row
    model = tiny("mean")
    queries, documents = model.encode_query(TEXTS[:2]), model.encode_document(TEXTS)
    torch.testing.assert_close(model.similarity(queries, documents),
                               torch.from_numpy(queries @ documents.T), atol=1e-6, rtol=0)
