"""The two sentence-transformers modules of a layout="sentence-transformers" folder whose pooling
sentence-transformers has no exact equivalent of (plumbing/st_layout.py says which, and why).

The folder ships them as one file, nvembed_st.py, with pooling.py's classes (st_layout.module_source
puts them together): it imports torch and sentence-transformers (>= 6), never this project, and
`SentenceTransformer(folder, trust_remote_code=True)` loads it.

- NVEmbedTransformer: sentence-transformers' Transformer (the decoder, from config.json and
  model.safetensors), which also marks in each row the tokens this project pools, as data.tokenize
  does: `text_mask` (B, T), the text and EOS; `prompt_mask` (B, T), the prompt's tokens. BOS and
  padding are in neither. The prompt's tokens are the leading tokens of the joined encoding equal to
  the prompt's own encoding (data._split_prefix): where the prompt's last token merges with the
  text's first ("Query: " + "vitamin" gives ':' 'Ġvitamin', while "Query: " alone ends in 'Ġ'),
  the merged token is text. sentence-transformers' own `prompt_length` counts the prompt encoded
  alone, one token more there, and is one number for the batch.
- NVEmbedPooling: this project's pooling over those tokens (the weights in its folder).
"""

from __future__ import annotations

import torch
from sentence_transformers.sentence_transformer.modules import Module, Transformer

from pooling import POOLINGS  # nvembed_st.py holds pooling.py's classes above this file's


class NVEmbedTransformer(Transformer):
    """sentence-transformers' Transformer, adding `text_mask` and `prompt_mask` to its features."""

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        features = super().preprocess(inputs, prompt=prompt, **kwargs)
        if "input_ids" not in features:
            return features
        tokenizer = self.tokenizer
        if tokenizer.padding_side != "right":  # the decoder's positions count from the left edge
            raise ValueError("NVEmbedTransformer needs right padding (tokenizer.padding_side)")
        # BOS where the tokenizer starts every row with it (its post-processor), as data.bos_ids.
        bos = tokenizer.bos_token_id
        bos_length = int(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        text_start = []  # per row: BOS, then the prompt's tokens as the joined encoding has them
        for row in features["input_ids"].tolist():
            joined = row[bos_length:bos_length + len(prompt_ids)]
            shared = next((n for n, (a, b) in enumerate(zip(joined, prompt_ids)) if a != b),
                          min(len(joined), len(prompt_ids)))
            text_start.append(bos_length + shared)
        T = features["input_ids"].shape[1]
        positions = torch.arange(T)[None, :]  # (1, T)
        real = features["attention_mask"].bool()  # (B, T)
        start = torch.tensor(text_start)[:, None]  # (B, 1)
        features["text_mask"] = real & (positions >= start)  # (B, T)
        features["prompt_mask"] = real & (positions >= bos_length) & (positions < start)  # (B, T)
        return features

    def forward(self, features: dict, **kwargs) -> dict:
        # The decoder takes **kwargs, and sentence-transformers passes it every feature it does not
        # know: keep the masks away from it.
        masks = {k: features.pop(k) for k in ("text_mask", "prompt_mask") if k in features}
        return {**super().forward(features, **kwargs), **masks}


class NVEmbedPooling(Module):
    """POOLINGS[pooling] (pooling.py) over `text_mask` (and `prompt_mask` with include_prompt):
    features["token_embeddings"] (B, T, D) -> features["sentence_embedding"] (B, D) fp32, not
    normalised (a Normalize module follows when the model normalises)."""

    config_keys = ["pooling", "embedding_dimension", "pooling_kwargs", "include_prompt"]

    def __init__(self, pooling: str, embedding_dimension: int, pooling_kwargs: dict | None = None,
                 include_prompt: bool = False):
        super().__init__()
        self.pooling, self.embedding_dimension = pooling, embedding_dimension
        self.pooling_kwargs, self.include_prompt = dict(pooling_kwargs or {}), include_prompt
        self.pool = POOLINGS[pooling](embedding_dimension, **self.pooling_kwargs)

    def forward(self, features: dict, **kwargs) -> dict:
        pool_mask = features["text_mask"]  # (B, T)
        if self.include_prompt:
            pool_mask = pool_mask | features["prompt_mask"]
        hidden = features["token_embeddings"]  # (B, T, D)
        # As NVEmbed.forward: a trained pooling may be fp32 over a bf16 decoder.
        dtype = next((p.dtype for p in self.pool.parameters()), hidden.dtype)
        features["sentence_embedding"] = self.pool(hidden.to(dtype), pool_mask).float()  # (B, D)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        if any(True for _ in self.pool.parameters()):
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None,
             revision=None, local_files_only: bool = False, **kwargs) -> "NVEmbedPooling":
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        module = cls(**cls.load_config(model_name_or_path, **hub))
        if any(True for _ in module.pool.parameters()):
            cls.load_torch_weights(model_name_or_path, model=module, **hub)
        return module
