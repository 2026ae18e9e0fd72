"""NV-Embed's data side, in the order a batch flows: tokenization with the pool mask, stage-2 pairs, hard negatives
and document keys, one-dataset batches. Files on disk live in datafiles.py, the built-in dataset in builtin.py.

PAPER.md section 3 (instruction template, instruction masked out of pooling, EOS appended) and 4
(two-stage contrastive instruction tuning: hard negatives, in-batch negatives on in stage 1 and off in stage 2,
example-based classification/clustering pairs, STS pairs with score >= 4 in both directions).
Differs from the released NV-Embed code: BOS is never pooled and a text cut at max_length keeps its EOS; `TextRule`
records a model's rule, and `NVEmbed.from_released` picks the released one. Tokenizers are read by checkpoints.py.
Run: `python data.py check-beir FOLDER SPLIT [--skip-bad]` or `python data.py check-train FILE [--skip-bad]` validates
files and prints their counts. Tests: `python -m pytest -x -q tests/test_data.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from datafiles import Example, SkipReport, _Problems, check_beir, check_training_file
from errors import CheckpointError, DataError, add_verbosity_flags, configure_logging, exits_on_user_error

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "


# ----------------------------------------------------------------------------------------------------------------
# Tokenization (PAPER.md section 3): [BOS] + prefix + text + [EOS], pooled over text + EOS (the model's TextRule).


def bos_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself starts inputs with it (Mistral's and Llama's <s>), else []. Not just
    `bos_token_id`: SmolLM2's is <|im_start|>, a chat marker its encoding never prepends to plain text."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] else []


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """encode(text, add_special_tokens=False) for each text: ids without BOS or EOS."""
    if not texts:
        return []
    if not callable(tokenizer):  # checkpoints.ByteTokenizer
        return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # HF tokenizers: one batched call (Rust, parallel) gives the same ids as encode() per text.
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class TextRule:
    """How a model turns (instruction, text) into ids and a pool mask; saved with the model, read by training and
    evaluation alike."""

    template: str = QUERY_TEMPLATE  # a text with an instruction is read as template.format(instruction=...) + text
    mask_instruction: bool = True  # instruction tokens out of the pool (PAPER.md section 3; is_mask_instruction)
    # "never": BOS is never pooled (this project). "without_instruction": pooled unless an instruction is masked out
    # (released: it zeroes nothing of a bare text, so every retrieval document averages its BOS in).
    pool_bos: str = "never"
    # "text": cut the text, the row still ends in EOS (this project). "sequence": cut the row (released: EOS lost).
    truncation: str = "text"
    # "split": an instruction's mask covers BOS and its tokens in the joined encoding. "tokenize": the first
    # len(tokenize(prefix)) positions (released): one fewer when the text keeps the prefix's final '▁' alone.
    instruction_positions: str = "split"

    def __post_init__(self):
        for name, allowed in (("pool_bos", ("never", "without_instruction")), ("truncation", ("text", "sequence")),
                              ("instruction_positions", ("split", "tokenize"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TextRule.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.template, str) or "{instruction}" not in self.template:
            raise ValueError(f"TextRule.template must contain '{{instruction}}', got {self.template!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str) -> "TextRule":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{source}: unknown text_rule fields {unknown}")
        try:
            return cls(**values)
        except ValueError as error:
            raise CheckpointError(f"{source}: {error}") from None


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _split_prefix(tokenizer, prefix: str, prefix_ids: list[int], texts: Sequence[str]) -> list[tuple[list, list]]:
    """(prefix ids, text ids) of each prefix + text, cut from the tokenizer's own encoding of the joined string.

    Encoding the two apart would give ids the model never read: BPE and SentencePiece attach the boundary space to
    the text's first word ("Query: vitamin" is ':' 'Ġvitamin' in SmolLM2, ':' '▁vitamin' in Mistral, while "Query: "
    alone ends in a lone 'Ġ' / '▁'). So the joined encoding's leading tokens equal to the prefix's encoding are the
    prefix, and the first token that differs and all after it are the text: exact wherever appending text does not
    change the encoding before the boundary (true at a space; tests/test_data.py checks BPE, SentencePiece, bytes)."""
    split = []
    for joined in encode_texts(tokenizer, [prefix + text for text in texts]):
        n = _common_prefix_length(joined, prefix_ids)
        split.append((joined[:n], joined[n:]))
    return split


def tokenize(tokenizer, texts: Sequence[str], instruction: str | Sequence[str] = "", max_length: int | None = 512,
             rule: TextRule = TextRule(), padding_side: str = "right",
             prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Row i = [BOS if the tokenizer adds one] + the encoding of prefix_i + text_i (`_split_prefix`) + [EOS], padded
    to the longest row; prefix_i = rule.template.format(instruction=instruction_i), nothing for no instruction, or
    `prompt` as given (the whole prefix, sentence-transformers' `prompt=`). An empty text is a row of BOS, prefix and
    EOS: a legitimate input at inference (training files refuse empty fields, with file and line, in datafiles.py).
    pool_mask (PAPER.md section 3): the text's tokens and EOS; the prefix's too if the rule does not mask instructions;
    BOS only under the released rule; never padding. Truncation follows `rule.truncation`. Returns input_ids (B, T)
    long, attention_mask (B, T) long, pool_mask (B, T) bool, truncated (B,) bool (the rows that were cut)."""
    texts = list(texts)
    instructions = [instruction] * len(texts) if isinstance(instruction, str) else list(instruction)
    if len(instructions) != len(texts):
        raise ValueError(f"got {len(instructions)} instructions for {len(texts)} texts")
    if prompt is not None and any(instructions):
        raise ValueError("pass a prompt (the whole prefix) or an instruction (formatted by the template), not both")
    prefixes = [prompt] * len(texts) if prompt is not None else \
        [rule.template.format(instruction=s) if s else "" for s in instructions]
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is not a string: {text!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; every input must end with EOS (PAPER.md section 1)")
    pad, bos = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, bos_ids(tokenizer)
    # (prefix ids, text ids) per row: bare texts are encoded in one batch, each instruction's rows in another.
    pieces: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    prefix_lengths = {"": 0}  # len(tokenize(prefix)) per prefix, for the "tokenize" rule
    for prefix in dict.fromkeys(prefixes):
        rows = [i for i, s in enumerate(prefixes) if s == prefix]
        if prefix:
            prefix_ids = encode_texts(tokenizer, [prefix])[0]  # the prefix alone (len: the "tokenize" rule)
            split = _split_prefix(tokenizer, prefix, prefix_ids, [texts[i] for i in rows])
            prefix_lengths[prefix] = len(prefix_ids)
        else:
            split = [([], ids) for ids in encode_texts(tokenizer, [texts[i] for i in rows])]
        for i, piece in zip(rows, split):
            pieces[i] = piece
    rows, masks, truncated = [], [], []
    for i, ((prefix_ids, text_ids), prefix) in enumerate(zip(pieces, prefixes)):
        head = bos + prefix_ids
        if prefix and rule.mask_instruction:  # BOS and the instruction
            unpooled = len(head) if rule.instruction_positions == "split" else prefix_lengths[prefix]
        else:
            unpooled = len(bos) if rule.pool_bos == "never" else 0
        if rule.truncation == "text":
            room = len(text_ids) if max_length is None else max_length - len(head) - 1
            if room < min(1, len(text_ids)):  # an empty text needs no room
                raise ValueError(f"max_length={max_length} leaves no room for text after "
                                 f"{len(head)} BOS/instruction tokens and EOS")
            row = head + text_ids[:room] + [eos]
            truncated.append(len(text_ids) > room)
        else:
            row = head + text_ids + [eos]
            truncated.append(max_length is not None and len(row) > max_length)
            row = row[:max_length]
            if len(row) <= unpooled:
                raise ValueError(f"max_length={max_length} cuts the row before any pooled token "
                                 f"({unpooled} BOS/instruction tokens)")
        rows.append(row)
        masks.append([False] * unpooled + [True] * (len(row) - unpooled))
    T = max(len(r) for r in rows)

    def padded(values: list, fill) -> list:
        return values + [fill] * (T - len(values)) if padding_side == "right" else [fill] * (T - len(values)) + values

    input_ids = torch.tensor([padded(row, pad) for row in rows], dtype=torch.long)  # (B, T)
    attention_mask = torch.tensor([padded([1] * len(row), 0) for row in rows], dtype=torch.long)  # (B, T)
    pool_mask = torch.tensor([padded(mask, False) for mask in masks], dtype=torch.bool)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask,
            "truncated": torch.tensor(truncated, dtype=torch.bool)}


# ----------------------------------------------------------------------------------------------------------------
# Stage-2 sources (PAPER.md section 4): non-retrieval data as example-based pairs.


def _row_fields(row: Any, names: Sequence[Sequence[str]], where: str, problems: _Problems) -> tuple | None:
    """(a, b, ...) from a tuple/list row or a mapping row with one of the accepted key names per field."""
    if isinstance(row, Mapping):
        keys = [next((k for k in alternatives if row.get(k) is not None), None) for alternatives in names]
        if None in keys:
            missing = names[keys.index(None)]
            return problems("missing field", f"{where}: field {' / '.join(missing)} is missing (got {row!r})")
        return tuple(row[k] for k in keys)
    if isinstance(row, (tuple, list)) and len(row) == len(names) and None not in row:
        return tuple(row)
    return problems("missing field", f"{where}: expected {len(names)} fields "
                                     f"({', '.join(n[0] for n in names)}), got {row!r}")


def _sample_others(rng: random.Random, pool: Sequence[int], count: int, reject) -> list[int]:
    """Up to `count` distinct members of pool not rejected, uniformly: rejection sampling, then an exact fallback."""
    chosen: list[int] = []
    for _ in range(20 * count):
        if len(chosen) == count:
            return chosen
        j = pool[rng.randrange(len(pool))]
        if not reject(j) and j not in chosen:
            chosen.append(j)
    rest = [j for j in pool if not reject(j) and j not in chosen]
    return chosen + rng.sample(rest, min(len(rest), count - len(chosen)))


def _example_based_pairs(rows, instruction, num_negatives, seed, task_type, skip_bad, report) -> list[Example]:
    source = f"{task_type} rows"
    problems = _Problems(source, skip_bad, report)
    texts, labels = [], []
    for i, row in enumerate(rows):
        fields = _row_fields(row, (("text",), ("label",)), f"{source} row {i}", problems)
        if fields is None:
            continue
        text, label = fields
        if not isinstance(text, str) or not text.strip():
            problems("empty text", f"{source} row {i}: text is empty or not a string ({text!r})")
            continue
        texts.append(text)
        labels.append(label)
    by_label: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for label, members in list(by_label.items()):
        # A positive must be another example of the label with a different text (an identical one teaches nothing).
        if len({texts[i] for i in members}) < 2:
            problems("single-example label", f"{source}: label {label!r} has a single example "
                                             f"({texts[members[0]]!r}); a positive needs a second one")
            del by_label[label]
    if len(by_label) < 2:
        raise DataError(f"{source}: need at least two labels with two examples each, got {len(by_label)}")
    active = sorted(i for members in by_label.values() for i in members)
    rng = random.Random(seed)
    examples = []
    for i in active:
        same = by_label[labels[i]]
        positive = _sample_others(rng, same, 1, lambda j: texts[j] == texts[i])[0]
        negatives = _sample_others(rng, active, num_negatives,
                                   lambda j: labels[j] == labels[i] or texts[j] in (texts[i], texts[positive]))
        examples.append(Example(texts[i], instruction, texts[positive], [texts[j] for j in negatives], task_type))
    problems.finish()
    return examples


def classification_pairs(rows: Iterable, instruction: str, num_negatives: int = 7, seed: int = 0,
                         skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """Example-based classification pairs (NV-Embed-v2, PAPER.md section 4) from rows (text, label), tuples or mappings:
    query = the text (with `instruction`), positive = another example of its label, negatives = `num_negatives`
    random examples of other labels. A single-example label is an error (skip_bad: its row is skipped, counted)."""
    return _example_based_pairs(rows, instruction, num_negatives, seed, "classification", skip_bad, report)


def clustering_pairs(rows: Iterable, instruction: str, num_negatives: int = 7, seed: int = 0,
                     skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """Clustering as example-based pairs, exactly like classification_pairs (labels are the cluster names)."""
    return _example_based_pairs(rows, instruction, num_negatives, seed, "clustering", skip_bad, report)


def sts_pairs(rows: Iterable, instruction: str, threshold: float = 4.0, num_negatives: int = 7, seed: int = 0,
              skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """STS pairs (PAPER.md section 4) from rows (text1|sentence1, text2|sentence2, score), tuples, mappings. A pair with
    score >= threshold gives text1 -> text2 and text2 -> text1, task_type "sts" (documents get the instruction too).
    Negatives: random other sentences, never the query, its positive or a sentence paired with it at score >=
    threshold (in-batch negatives are off in stage 2)."""
    source = "sts rows"
    problems = _Problems(source, skip_bad, report)
    pairs = []
    for i, row in enumerate(rows):
        fields = _row_fields(row, (("text1", "sentence1"), ("text2", "sentence2"), ("score",)), f"{source} row {i}",
                             problems)
        if fields is None:
            continue
        a, b, score = fields
        if not all(isinstance(t, str) and t.strip() for t in (a, b)):
            problems("empty text", f"{source} row {i}: a text is empty or not a string ({a!r}, {b!r})")
            continue
        try:
            score = float(score)
        except (TypeError, ValueError):
            problems("bad score", f"{source} row {i}: score {score!r} is not a number")
            continue
        pairs.append((a, b, score))
    sentences = sorted({t for a, b, _ in pairs for t in (a, b)})
    similar: dict[str, set[str]] = defaultdict(set)
    for a, b, score in pairs:
        if score >= threshold:
            similar[a].add(b)
            similar[b].add(a)
    pool = list(range(len(sentences)))
    rng = random.Random(seed)
    examples = []
    for a, b, score in pairs:
        if score < threshold:
            continue
        if a == b:
            problems.note("identical pair", f"{source}: pair ({a!r}, {a!r}) has the same text twice")
            continue
        for query, positive in ((a, b), (b, a)):
            negatives = _sample_others(rng, pool, num_negatives, lambda j: sentences[j] == query
                                       or sentences[j] == positive or sentences[j] in similar[query])
            examples.append(Example(query, instruction, positive, [sentences[j] for j in negatives], "sts"))
    problems.finish()
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Batching (PAPER.md section 4): one dataset per batch, exactly n hard negatives per query, document keys.


def text_key(text: str) -> int:
    """A document's key for the loss's masking: identical texts (identical embeddings, whatever their ids) get equal
    keys on every rank. An int64 (8 bytes of blake2b) so the loss all-gathers keys as tensors; hash() of a str is
    salted per process. A collision among n keys has probability ~n^2 / 2^65 (it would mask one negative)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def query_positive_keys(examples: Iterable[Example]) -> dict[tuple[str, str], list[int]]:
    """(instruction, query) -> the keys of every positive `examples` give that query, in order, once each: a query
    with several relevant documents has one example per positive (`beir_training_examples`), all relevant to it."""
    positives: dict[tuple[str, str], dict[int, None]] = defaultdict(dict)
    for example in examples:
        positives[(example.instruction, example.query)][text_key(example.positive)] = None
    return {query: list(keys) for query, keys in positives.items()}


def hard_negatives(example: Example, num_hard_negatives: int) -> tuple[list[str], int]:
    """Exactly num_hard_negatives negatives (paper: 7): the first n (mined lists are ranked, hardest first), or the
    list repeated cyclically when shorter. Returns (negatives, repeated slots). An example with none is refused."""
    have = example.negatives
    if not have and num_hard_negatives > 0:
        where = f"{example.location}: " if example.location else ""
        raise DataError(f"{where}example (query_id={example.query_id!r}, query={example.query[:60]!r}) has no hard "
                        f"negative; {num_hard_negatives} are required")
    chosen = [have[k % len(have)] for k in range(num_hard_negatives)]
    return chosen, max(0, num_hard_negatives - len(have))


@dataclass
class TrainDataset:
    """One training source: every batch is drawn from a single TrainDataset. in_batch_negatives: whether the loss may
    use other queries' documents as negatives (stage 1 yes, stage 2 no; retrieval data only). Documents get the
    instruction iff task_type is "sts". known_positives: `query_positive_keys` of the dataset, masked by the loss."""

    name: str
    examples: list[Example]
    in_batch_negatives: bool = True
    num_hard_negatives: int = 7

    def __post_init__(self):
        if not self.examples:
            raise DataError(f"dataset {self.name!r} has no examples")
        kinds = Counter(e.task_type for e in self.examples)
        if len(kinds) != 1:
            raise DataError(f"dataset {self.name!r} mixes task types {dict(kinds)}; make one dataset per task")
        # The one place this rule lives (PAPER.md section 4): in classification, clustering or STS data another item of
        # the batch may share the query's class or meaning, and would be pushed away as its negative.
        self.in_batch_negatives = self.in_batch_negatives and self.task_type == "retrieval"
        self.known_positives = query_positive_keys(self.examples)
        self.short_examples = self.repeated_slots = 0
        for example in self.examples:
            repeated = hard_negatives(example, self.num_hard_negatives)[1]  # refuses an example with none
            self.short_examples += repeated > 0
            self.repeated_slots += repeated

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def task_type(self) -> str:
        return self.examples[0].task_type

    @property
    def instruction_on_documents(self) -> bool:
        return self.task_type == "sts"

    def summary(self) -> str:
        return (f"{self.name}: {len(self)} {self.task_type} examples, in-batch negatives "
                f"{'on' if self.in_batch_negatives else 'off'}"
                f"{'' if self.task_type == 'retrieval' else ' (retrieval data only)'}, instruction on documents "
                f"{'yes' if self.instruction_on_documents else 'no'}, {self.num_hard_negatives} hard negatives each; "
                f"{self.short_examples} examples had too few (repeated cyclically: {self.repeated_slots} slots)")

    def collate(self, indices: Sequence[int], tokenizer, max_length: int | None = 512,
                rule: TextRule = TextRule(), padding_side: str = "right") -> dict[str, Any]:
        return collate([self.examples[i] for i in indices], tokenizer, max_length, self.num_hard_negatives,
                       rule, in_batch_negatives=self.in_batch_negatives, dataset=self.name,
                       padding_side=padding_side, known_positives=self.known_positives)


def collate(examples: Sequence[Example], tokenizer, max_length: int | None = 512, num_hard_negatives: int = 7,
            rule: TextRule = TextRule(), in_batch_negatives: bool = True, dataset: str = "",
            padding_side: str = "right",
            known_positives: Mapping[tuple[str, str], Sequence[int]] | None = None) -> dict[str, Any]:
    """B examples -> the loss's batch. documents: B * (1 + n) rows, [pos, neg_1..neg_n] per query (query i's positive
    is row i * (1 + n)); doc_keys (B * (1 + n),) int64: their `text_key`s. known_positive_keys (B, P) int64, row i:
    the keys of query i's positives from `known_positives` (default: of these examples only), padded with its first;
    the loss masks them out of query i's negatives. repeated_negatives: the slots filled by `hard_negatives`."""
    known_positives = known_positives if known_positives is not None else query_positive_keys(examples)
    positive_keys = [list(known_positives[(e.instruction, e.query)]) for e in examples]
    width = max(len(keys) for keys in positive_keys)  # P
    documents, document_instructions, repeated = [], [], 0
    for example in examples:
        negatives, n_repeated = hard_negatives(example, num_hard_negatives)
        repeated += n_repeated
        documents += [example.positive] + negatives
        document_instructions += [example.document_instruction] * (1 + num_hard_negatives)
    return {
        "queries": tokenize(tokenizer, [e.query for e in examples], [e.instruction for e in examples],
                            max_length, rule, padding_side),
        "documents": tokenize(tokenizer, documents, document_instructions, max_length, rule, padding_side),
        "doc_keys": torch.tensor([text_key(d) for d in documents], dtype=torch.long),  # (B * (1 + n),)
        "known_positive_keys": torch.tensor([keys + keys[:1] * (width - len(keys)) for keys in positive_keys],
                                            dtype=torch.long),  # (B, P)
        "in_batch_negatives": in_batch_negatives, "dataset": dataset,
        "num_hard_negatives": num_hard_negatives, "repeated_negatives": repeated,
    }


class BatchSampler:
    """Which dataset and examples make the global batch of step k: a pure function of (seed, k), not of the world
    size, so a run resumed at step k on any number of ranks sees the same batches. Step k picks dataset d with
    probability weights[d] (default: proportional to size). d's j-th batch (j = earlier steps that picked d) is
    positions j*B .. (j+1)*B - 1 of its epoch orders laid end to end, each a permutation of d: every epoch holds
    every example once, nothing is dropped. A batch straddling two epochs takes the next one's first examples among
    those not in the previous one's tail (`_shuffle`), so no batch holds an example twice."""

    block = 1024  # dataset choices are drawn in blocks of steps, so reaching step k costs O(k / block)

    def __init__(self, datasets: Sequence[Any], global_batch_size: int, seed: int = 0,
                 weights: Sequence[float] | None = None):
        self.sizes = [len(d) if hasattr(d, "__len__") else int(d) for d in datasets]
        self.batch_size, self.seed = global_batch_size, seed
        if not self.sizes or global_batch_size < 1:
            raise ValueError(f"need at least one dataset and a positive batch size, got {self.sizes}, "
                             f"{global_batch_size}")
        for d, size in enumerate(self.sizes):
            if size < global_batch_size:
                raise ValueError(f"dataset {d} has {size} examples, fewer than the global batch size "
                                 f"{global_batch_size}")
        weights = np.asarray(self.sizes if weights is None else weights, dtype=np.float64)
        if weights.shape != (len(self.sizes),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(self.sizes)} non-negative numbers, not all zero: {weights}")
        self.weights = weights / weights.sum()
        self._choices: list[np.ndarray] = []  # per block of steps: the dataset each step picks
        self._counts: list[np.ndarray] = []  # per block of steps: how many earlier steps picked the same dataset
        self._picked = np.zeros(len(self.sizes), dtype=np.int64)  # picks per dataset in the blocks drawn so far
        self._orders: dict[int, dict[int, np.ndarray]] = {}  # dataset -> {epoch: its order}, the last two built

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self._choices) <= b:
            rng = np.random.default_rng([self.seed, 1, len(self._choices)])
            choices = rng.choice(len(self.sizes), size=self.block, p=self.weights)  # (block,)
            counts = np.empty(self.block, dtype=np.int64)  # (block,)
            for d in range(len(self.sizes)):
                picks = choices == d
                counts[picks] = self._picked[d] + np.arange(picks.sum())
                self._picked[d] += picks.sum()
            self._choices.append(choices)
            self._counts.append(counts)
        return self._choices[b], self._counts[b]

    def _shuffle(self, d: int, epoch: int, previous: np.ndarray | None) -> np.ndarray:
        """Epoch `epoch` of dataset d, (size,), given the previous epoch's order (None where this epoch starts a
        batch). Its first batch holds `offset` examples of the previous epoch's end and the first B - offset of a
        fresh permutation that are not among them; every other example keeps the permutation's order."""
        size = self.sizes[d]
        order = np.random.default_rng([self.seed, 2, d, epoch]).permutation(size)  # (size,)
        offset = epoch * size % self.batch_size
        if offset == 0:
            return order
        in_tail = np.zeros(size, dtype=bool)
        in_tail[previous[size - offset:]] = True
        head = order[~in_tail[order]][:self.batch_size - offset]  # size - offset >= B - offset candidates
        in_head = np.zeros(size, dtype=bool)
        in_head[head] = True
        return np.concatenate([head, order[~in_head[order]]])

    def _epoch_order(self, d: int, epoch: int) -> np.ndarray:
        """Dataset d's order in this epoch. It depends on the previous epoch's tail, and so on back to the last
        epoch that began on a batch boundary: epoch * size is a multiple of B every B / gcd(size, B) epochs. So
        reaching an epoch costs at most that many shuffles; running through, one per epoch (the last two are kept)."""
        built = self._orders.setdefault(d, {})
        if epoch not in built:
            cycle = self.batch_size // int(np.gcd(self.sizes[d], self.batch_size))
            first = epoch - epoch % cycle  # starts on a batch boundary: needs no previous epoch
            if epoch > first and epoch - 1 in built:
                e, order = epoch - 1, built[epoch - 1]  # running through: continue from the previous epoch
            else:
                e, order = first - 1, None  # random access (a resumed run): rebuild from the cycle's start
            while e < epoch:
                e, previous = e + 1, order
                order = self._shuffle(d, e, previous)
            self._orders[d] = {epoch: order} if previous is None else {epoch - 1: previous, epoch: order}
        return self._orders[d][epoch]

    def batch_for_step(self, step: int) -> tuple[int, list[int]]:
        """(dataset index, the global batch's example indices) for this step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b, offset = divmod(step, self.block)
        choices, counts = self._block(b)
        d, j = int(choices[offset]), int(counts[offset])  # step is dataset d's j-th batch
        epoch, within = divmod(j * self.batch_size, self.sizes[d])  # where the batch starts in d's epochs
        batch = self._epoch_order(d, epoch)[within:within + self.batch_size]
        if len(batch) < self.batch_size:  # it straddles two epochs (B <= size: never more)
            batch = np.concatenate([batch, self._epoch_order(d, epoch + 1)[:self.batch_size - len(batch)]])
        return d, batch.tolist()


def rank_slice(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank r's contiguous share of a global batch: the shares are disjoint and their union is the batch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(batch) % world_size:
        raise ValueError(f"global batch size {len(batch)} is not divisible by world size {world_size}")
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank:(rank + 1) * per_rank])


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NV-Embed data: check data files (`python builtin.py OUT` writes "
                                                 "the built-in dataset).")
    commands = parser.add_subparsers(dest="command", required=True)
    check_beir_command = commands.add_parser("check-beir", help="read a BEIR folder's split and print its counts")
    check_beir_command.add_argument("folder")
    check_beir_command.add_argument("split")
    check_beir_command.add_argument("--skip-bad", action="store_true",
                                    help="skip bad records (counted) instead of failing")
    check_train = commands.add_parser("check-train", help="read a training file and print its counts")
    check_train.add_argument("path")
    check_train.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted) instead of failing")
    for command in (check_beir_command, check_train):
        add_verbosity_flags(command)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "check-beir":
        check_beir(args.folder, args.split, skip_bad=args.skip_bad)
    else:
        check_training_file(args.path, skip_bad=args.skip_bad)


if __name__ == "__main__":
    main()
