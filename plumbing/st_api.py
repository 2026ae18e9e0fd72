"""sentence-transformers' encoding API on NVEmbed, beside its `encode` (model.py): named prompts,
`encode_query`, `encode_document` and `similarity`, as sentence-transformers names them. A mixin:
NVEmbed holds `prompts` ({name: whole prefix}, saved with the model) and `encode`; these methods
only choose the prefix. Tests: tests/test_st_layout.py."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def names_a_prompt(encode_kwargs: dict) -> bool:
    """Whether encode's kwargs give a prefix: a prompt (even ""), a prompt_name, an instruction."""
    return any(encode_kwargs.get(k) is not None for k in ("prompt", "prompt_name")) or \
        bool(encode_kwargs.get("instruction"))


class SentenceTransformersAPI:
    prompts: dict[str, str]  # sentence-transformers' named prompts: "query" is encode_query's

    @staticmethod
    def checked_texts(sentences, batch_size) -> list[str]:
        """encode's `sentences` as a list; a TypeError or ValueError for what encode cannot take."""
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a string or a list of strings")
        if not isinstance(batch_size, int) or batch_size < 1:  # range() would say it obscurely
            raise ValueError(f"encode: batch_size must be an integer >= 1, got {batch_size!r}")
        return texts

    def checked_arguments(self, sentences, batch_size, prompt, prompt_name) -> tuple:
        """(texts, prompt): encode's arguments checked, prompt_name turned into its prompt."""
        if prompt_name is not None and prompt is None:
            prompt = self.prompt_named(prompt_name)
        return self.checked_texts(sentences, batch_size), prompt

    def prompt_named(self, prompt_name: str) -> str:
        """The prefix `prompts[prompt_name]`; a ValueError naming the prompts there are."""
        if prompt_name not in self.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not one of prompts "
                             f"{sorted(self.prompts)}")
        return self.prompts[prompt_name]

    def encode_query(self, sentences: str | Sequence[str], **kwargs):
        """encode with the query prompt `prompts["query"]` unless given a prompt, prompt_name or
        instruction; refused with none of them: a query without its instruction is another task."""
        if not names_a_prompt(kwargs):
            if "query" not in self.prompts:
                raise ValueError("encode_query: no prompts['query'] (set it to text_rule.template"
                                 ".format(instruction=...), '' for none), instruction= or prompt=")
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs):
        """encode with the first of prompts "document", "passage", "corpus" there is, as
        sentence-transformers does, unless given a prompt; NV-Embed's documents have none."""
        if not names_a_prompt(kwargs):
            names = [n for n in ("document", "passage", "corpus") if n in self.prompts]
            kwargs["prompt_name"] = names[0] if names else None
        return self.encode(sentences, **kwargs)

    @staticmethod
    def similarity(embeddings1, embeddings2) -> torch.Tensor:
        """sentence-transformers' `similarity` (similarity_fn_name "cosine"): (N, D) and (M, D)
        embeddings, arrays or tensors (a (D,) one is one row) -> (N, M) float32 cosines."""
        a, b = (F.normalize(torch.atleast_2d(torch.as_tensor(e)).float(), dim=-1)
                for e in (embeddings1, embeddings2))
        return a @ b.T  # (N, M)
