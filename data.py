"""NV-Embed's data side, in the order a batch flows: tokenization with the pool mask, stage-2 pairs,
hard negatives and document keys, one-dataset batches. Files: plumbing/training_files.py.

PAPER.md section 3 (instruction template, instruction masked out of pooling, EOS
appended) and 4 (two-stage contrastive instruction tuning: hard negatives, in-batch negatives in
stage 1 only, example-based classification/clustering pairs, STS pairs with score >= 4 in both
directions). Differs from the released NV-Embed code: BOS is never pooled and a text cut at
max_length keeps its EOS; `TextRule` records a model's rule (`released_row`: NVIDIA's).
Run: `python data.py check-beir FOLDER SPLIT` or `python data.py check-train FILE` [--skip-bad]
validates files and prints their counts. Tests: `python -m pytest -x -q tests/test_data.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from plumbing.datafiles import Problems, SkipReport
from plumbing.errors import CheckpointError, DataError
from plumbing.training_files import Example, labelled_rows, scored_rows

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "


# ----------------------------------------------------------------------------
# Tokenization (PAPER.md section 3): [BOS] + prefix + text + [EOS], pooled over text + EOS.


def bos_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself starts inputs with it (Mistral's and Llama's <s>), else [].
    Not just `bos_token_id`: SmolLM2's is <|im_start|>, a chat marker its encoding never prepends to
    plain text."""
    bos = tokenizer.bos_token_id
    starts_with_bos = tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
    return [bos] if bos is not None and starts_with_bos else []


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
    """How a model turns (instruction, text) into ids and a pool mask; saved with the model, read by
    training and evaluation alike."""

    # a text with an instruction is read as template.format(instruction=...) + text
    template: str = QUERY_TEMPLATE
    # instruction tokens out of the pool (PAPER.md section 3; released is_mask_instruction)
    mask_instruction: bool = True
    # "never": BOS is never pooled (this project). "without_instruction": pooled unless an
    # instruction is masked out (released: it zeroes nothing of a bare text, so every retrieval
    # document averages its BOS in).
    pool_bos: str = "never"
    # "text": cut the text, the row still ends in EOS (this project). "sequence": cut the row
    # (released: EOS lost).
    truncation: str = "text"
    # "split": an instruction's mask covers BOS and its tokens in the joined encoding. "tokenize":
    # the first len(tokenize(prefix)) positions (released): one fewer when the text keeps the
    # prefix's final '▁' alone.
    instruction_positions: str = "split"

    def __post_init__(self):
        for name, allowed in (("pool_bos", ("never", "without_instruction")),
                              ("truncation", ("text", "sequence")),
                              ("instruction_positions", ("split", "tokenize"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TextRule.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.template, str) or "{instruction}" not in self.template:
            raise ValueError(f"TextRule.template must contain '{{instruction}}', "
                             f"got {self.template!r}")

    @property
    def released(self) -> bool:
        """Whether a released variant is in the rule (tokenized by `released_row`)."""
        variants = (self.pool_bos, self.truncation, self.instruction_positions)
        return variants != ("never", "text", "split")

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


def _split_prefix(tokenizer, prefix: str, texts: Sequence[str]) -> list[tuple[list, list]]:
    """(prefix ids, text ids) of each prefix + text, cut from the tokenizer's encoding of the joined
    string."""
    # Encoding the two apart would give ids the model never read: BPE and SentencePiece attach the
    # boundary space to the text's first word ("Query: vitamin" is ':' 'Ġvitamin' in SmolLM2, ':'
    # '▁vitamin' in Mistral, while "Query: " alone ends in a lone 'Ġ' / '▁'). So the joined
    # encoding's leading tokens equal to the prefix's encoding are the prefix; the first token that
    # differs, and all after it, are the text. Exact wherever appending text does not change the
    # encoding before the boundary (true at a space; tests/test_data.py checks BPE, SentencePiece
    # and bytes).
    prefix_ids = encode_texts(tokenizer, [prefix])[0]
    split = []
    for joined in encode_texts(tokenizer, [prefix + text for text in texts]):
        n = _common_prefix_length(joined, prefix_ids)
        split.append((joined[:n], joined[n:]))
    return split


def tokenize(tokenizer, texts: Sequence[str], instruction: str | Sequence[str] = "",
             max_length: int | None = 512, rule: TextRule = TextRule(), padding_side: str = "right",
             prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Row i = [BOS] + prefix_i + text_i + [EOS]. Returns input_ids (B, T) long, attention_mask (B,
    T) long, pool_mask (B, T) bool and truncated (B,) bool (the rows that were cut), right- or
    left-padded."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    rows = token_rows(tokenizer, texts, instruction, max_length, rule, prompt)
    return padded_rows(tokenizer, rows, padding_side)


def token_rows(tokenizer, texts: Sequence[str], instruction: str | Sequence[str] = "",
               max_length: int | None = 512, rule: TextRule = TextRule(),
               prompt: str | None = None) -> list[tuple[list[int], list[bool], bool]]:
    """`tokenize`'s rows before padding: (ids, pool mask, truncated) per text. Encoding sorts them
    by length and pads each batch (`padded_rows`): every text is tokenized once."""
    texts, prefixes = _prefixes(texts, instruction, rule, prompt)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; every input must end with EOS "
                         "(PAPER.md section 1)")
    bos = bos_ids(tokenizer)  # [BOS] where the tokenizer starts inputs with it (Mistral, Llama)
    rows = []
    for prefix, prefix_ids, text_ids in _encode(tokenizer, prefixes, texts):
        head = bos + prefix_ids
        if rule.released:
            row, unpooled, cut = released_row(tokenizer, rule, bos, prefix, prefix_ids, text_ids,
                                              max_length)
        else:
            # PAPER.md section 3: the instruction is masked out of the pool; BOS is never pooled.
            unpooled = len(head) if prefix and rule.mask_instruction else len(bos)
            row, cut = _cut_text(head, text_ids, eos, max_length)
        rows.append((row, [False] * unpooled + [True] * (len(row) - unpooled), cut))  # text + EOS
    return rows


def padded_rows(tokenizer, rows: Sequence[tuple[list[int], list[bool], bool]],
                padding_side: str = "right") -> dict[str, torch.Tensor]:
    """`token_rows`' rows as `tokenize`'s padded tensors."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, masks, truncated = zip(*rows)
    return _padded(ids, masks, truncated, pad, padding_side)


def length_batches(rows: Sequence[tuple[list[int], list[bool], bool]],
                   batch_size: int) -> list[list[int]]:
    """Encoding's batches of `token_rows`' rows (their indices): the longest rows first, so memory
    peaks at once and each batch pads little. All full but the last and sorted stably:
    evaluate.encode_sharded splits them among ranks and counts on both."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    return [order[start:start + batch_size] for start in range(0, len(rows), batch_size)]


def _prefixes(texts, instruction, rule: TextRule, prompt: str | None):
    """(texts, prefix per text): the rule's template filled with the instruction, "" for none, or
    `prompt` as given (sentence-transformers' `prompt=`, the whole prefix). Refuses arguments that
    cannot work."""
    texts = list(texts)
    instructions = [instruction] * len(texts) if isinstance(instruction, str) else list(instruction)
    if len(instructions) != len(texts):
        raise ValueError(f"got {len(instructions)} instructions for {len(texts)} texts")
    if prompt is not None and any(instructions):
        raise ValueError("pass a prompt (the whole prefix) or an instruction (formatted by the "
                         "template), not both")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is not a string: {text!r}")
    if prompt is not None:
        return texts, [prompt] * len(texts)
    return texts, [rule.template.format(instruction=s) if s else "" for s in instructions]


def _encode(tokenizer, prefixes: list[str], texts: list[str]) -> list[tuple[str, list, list]]:
    """(prefix, prefix ids, text ids) per row: bare texts in one batch, each prefix's rows in
    another."""
    pieces: list = [None] * len(texts)
    for prefix in dict.fromkeys(prefixes):
        rows = [i for i, s in enumerate(prefixes) if s == prefix]
        row_texts = [texts[i] for i in rows]
        split = _split_prefix(tokenizer, prefix, row_texts) if prefix else \
            [([], ids) for ids in encode_texts(tokenizer, row_texts)]
        for i, (prefix_ids, text_ids) in zip(rows, split):
            pieces[i] = (prefix, prefix_ids, text_ids)
    return pieces


def _cut_text(head: list[int], text_ids: list[int], eos: int, max_length: int | None):
    """(head + text + [EOS] in max_length tokens, whether the text was cut). A long text is cut,
    never EOS: it is the last pooled token (and the one EOS pooling reads)."""
    room = len(text_ids) if max_length is None else max_length - len(head) - 1
    if room < min(1, len(text_ids)):  # an empty text needs no room
        raise ValueError(f"max_length={max_length} leaves no room for text after "
                         f"{len(head)} BOS/instruction tokens and EOS")
    return head + text_ids[:room] + [eos], len(text_ids) > room


def released_row(tokenizer, rule: TextRule, bos: list[int], prefix: str, prefix_ids: list[int],
                 text_ids: list[int], max_length: int | None) -> tuple[list[int], int, bool]:
    """(row, unpooled leading positions, truncated) under a rule with NVIDIA's released variants:
    used only by plumbing.loading.from_released (tests/test_released.py checks it by theirs)."""
    head = bos + prefix_ids
    if prefix and rule.mask_instruction:
        # "tokenize": they mask as many positions as the prefix encoded alone has tokens (TextRule).
        alone = len(encode_texts(tokenizer, [prefix])[0])
        unpooled = len(head) if rule.instruction_positions == "split" else alone
    else:
        # "without_instruction": nothing of a bare text is masked, so every document averages its
        # BOS in.
        unpooled = len(bos) if rule.pool_bos == "never" else 0
    if rule.truncation == "text":
        row, cut = _cut_text(head, text_ids, tokenizer.eos_token_id, max_length)
        return row, unpooled, cut
    # "sequence": the whole row is cut at max_length, so a long text loses its EOS.
    row = head + text_ids + [tokenizer.eos_token_id]
    cut = max_length is not None and len(row) > max_length
    row = row[:max_length]
    if len(row) <= unpooled:
        raise ValueError(f"max_length={max_length} cuts the row before any pooled token "
                         f"({unpooled} BOS/instruction tokens)")
    return row, unpooled, cut


def _padded(rows, masks, truncated, pad: int, padding_side: str) -> dict[str, torch.Tensor]:
    T = max(len(r) for r in rows)

    def padded(values: list, fill) -> list:
        padding = [fill] * (T - len(values))
        return values + padding if padding_side == "right" else padding + values

    return {"input_ids": torch.tensor([padded(row, pad) for row in rows]),  # (B, T) int64
            "attention_mask": torch.tensor([padded([1] * len(row), 0) for row in rows]),  # (B, T)
            "pool_mask": torch.tensor([padded(mask, False) for mask in masks]),  # (B, T) bool
            "truncated": torch.tensor(truncated, dtype=torch.bool)}  # (B,)


# ----------------------------------------------------------------------------
# Stage-2 sources (PAPER.md section 4): non-retrieval data as example-based pairs.


def _sample_others(rng: random.Random, pool: Sequence[int], count: int, reject) -> list[int]:
    """Up to `count` distinct members of pool not rejected, uniformly: rejection sampling, then an
    exact fallback."""
    chosen: list[int] = []
    for _ in range(20 * count):
        if len(chosen) == count:
            return chosen
        j = pool[rng.randrange(len(pool))]
        if not reject(j) and j not in chosen:
            chosen.append(j)
    rest = [j for j in pool if not reject(j) and j not in chosen]
    return chosen + rng.sample(rest, min(len(rest), count - len(chosen)))


def _example_based_pairs(rows, instruction, num_negatives, seed, task_type, skip_bad,
                         report) -> list[Example]:
    source = f"{task_type} rows"
    problems = Problems(source, skip_bad, report)
    texts, labels = labelled_rows(rows, source, problems)
    by_label: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for label, members in list(by_label.items()):
        # A positive must be another example of the label with a different text (an identical one
        # teaches nothing).
        if len({texts[i] for i in members}) < 2:
            problems("single-example label", f"{source}: label {label!r} has a single example "
                                             f"({texts[members[0]]!r}); a positive needs a second "
                                             "one")
            del by_label[label]
    if len(by_label) < 2:
        raise DataError(f"{source}: need at least two labels with two examples each, "
                        f"got {len(by_label)}")
    active = sorted(i for members in by_label.values() for i in members)
    rng = random.Random(seed)
    examples = []
    for i in active:
        same = by_label[labels[i]]
        positive = _sample_others(rng, same, 1, lambda j: texts[j] == texts[i])[0]
        negatives = _sample_others(rng, active, num_negatives, lambda j: labels[j] == labels[i]
                                   or texts[j] in (texts[i], texts[positive]))
        negative_texts = [texts[j] for j in negatives]
        examples.append(Example(texts[i], instruction, texts[positive], negative_texts, task_type))
    problems.finish()
    return examples


def classification_pairs(rows: Iterable, instruction: str, num_negatives: int = 7, seed: int = 0,
                         skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """Example-based classification pairs (NV-Embed-v2, PAPER.md section 4) from rows (text, label),
    tuples or mappings: query = the text (with `instruction`), positive = another example of its
    label, negatives = `num_negatives` random examples of other labels. A single-example label is an
    error (skip_bad: its row is skipped, counted)."""
    return _example_based_pairs(rows, instruction, num_negatives, seed, "classification", skip_bad,
                                report)


def clustering_pairs(rows: Iterable, instruction: str, num_negatives: int = 7, seed: int = 0,
                     skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """Clustering as example-based pairs, exactly like classification_pairs (labels are the cluster
    names)."""
    return _example_based_pairs(rows, instruction, num_negatives, seed, "clustering", skip_bad,
                                report)


def sts_pairs(rows: Iterable, instruction: str, threshold: float = 4.0, num_negatives: int = 7,
              seed: int = 0, skip_bad: bool = False,
              report: SkipReport | None = None) -> list[Example]:
    """STS pairs (PAPER.md section 4) from rows (text1|sentence1, text2|sentence2, score), tuples or
    mappings. A pair with score >= threshold gives text1 -> text2 and text2 -> text1, task_type
    "sts" (documents get the instruction too). Negatives: random other sentences, never the query,
    its positive or a sentence paired with it at score >= threshold (in-batch negatives are off in
    stage 2)."""
    source = "sts rows"
    problems = Problems(source, skip_bad, report)
    pairs = scored_rows(rows, source, problems)  # (text1, text2, score)
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
            problems.note("identical pair",
                          f"{source}: pair ({a!r}, {a!r}) has the same text twice")
            continue
        for query, positive in ((a, b), (b, a)):
            negatives = _sample_others(rng, pool, num_negatives, lambda j: sentences[j] in
                                       (query, positive) or sentences[j] in similar[query])
            examples.append(Example(query, instruction, positive, [sentences[j] for j in negatives],
                                    "sts"))
    problems.finish()
    return examples


# ----------------------------------------------------------------------------
# Batching (PAPER.md section 4): one dataset per batch, exactly n hard negatives per query, document
# keys.


def text_key(text: str) -> int:
    """A document's key for the loss's masking: identical texts (identical embeddings, whatever
    their ids) get equal keys on every rank. An int64 (8 bytes of blake2b) so the loss all-gathers
    keys as tensors; hash() of a str is salted per process. A collision among n keys has probability
    ~n^2 / 2^65 (it would mask one negative)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def query_positive_keys(examples: Iterable[Example]) -> dict[tuple[str, str], list[int]]:
    """(instruction, query) -> the keys of every positive `examples` give that query, in order, once
    each: a query with several relevant documents has one example per positive
    (`beir_training_examples`), all relevant to it."""
    positives: dict[tuple[str, str], dict[int, None]] = defaultdict(dict)
    for example in examples:
        positives[(example.instruction, example.query)][text_key(example.positive)] = None
    return {query: list(keys) for query, keys in positives.items()}


def hard_negatives(example: Example, num_hard_negatives: int) -> tuple[list[str], int]:
    """Exactly num_hard_negatives negatives (paper: 7): the first n (mined lists are ranked, hardest
    first), or the list repeated cyclically when shorter. Returns (negatives, repeated slots). An
    example with none is refused."""
    have = example.negatives
    if not have and num_hard_negatives > 0:
        where = f"{example.location}: " if example.location else ""
        raise DataError(f"{where}example (query_id={example.query_id!r}, "
                        f"query={example.query[:60]!r}) has no hard negative; "
                        f"{num_hard_negatives} are required")
    chosen = [have[k % len(have)] for k in range(num_hard_negatives)]
    return chosen, max(0, num_hard_negatives - len(have))


@dataclass
class TrainDataset:
    """One training source: every batch is drawn from a single TrainDataset. in_batch_negatives:
    whether the loss may use other queries' documents as negatives (stage 1 yes, stage 2 no;
    retrieval data only). Documents get the instruction iff task_type is "sts". known_positives:
    `query_positive_keys` of the dataset, masked by the loss."""

    name: str
    examples: list[Example]
    in_batch_negatives: bool = True
    num_hard_negatives: int = 7

    def __post_init__(self):
        if not self.examples:
            raise DataError(f"dataset {self.name!r} has no examples")
        kinds = Counter(e.task_type for e in self.examples)
        if len(kinds) != 1:
            raise DataError(f"dataset {self.name!r} mixes task types {dict(kinds)}; "
                            "make one dataset per task")
        # The one place this rule lives (PAPER.md section 4): in classification, clustering or
        # STS data another item of the batch may share the query's class or meaning, and would be
        # pushed away as its negative.
        self.in_batch_negatives = self.in_batch_negatives and self.task_type == "retrieval"
        self.known_positives = query_positive_keys(self.examples)
        self.short_examples = self.repeated_slots = 0
        for example in self.examples:
            repeated = hard_negatives(example, self.num_hard_negatives)[1]  # refuses one with none
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
                f"{'' if self.task_type == 'retrieval' else ' (retrieval data only)'}, "
                f"instruction on documents {'yes' if self.instruction_on_documents else 'no'}, "
                f"{self.num_hard_negatives} hard negatives each; {self.short_examples} examples "
                f"had too few (repeated cyclically: {self.repeated_slots} slots)")

    def collate(self, indices: Sequence[int], tokenizer, max_length: int | None = 512,
                rule: TextRule = TextRule(), padding_side: str = "right") -> dict[str, Any]:
        return collate([self.examples[i] for i in indices], tokenizer, max_length,
                       self.num_hard_negatives, rule, in_batch_negatives=self.in_batch_negatives,
                       dataset=self.name, padding_side=padding_side,
                       known_positives=self.known_positives)


def collate(examples: Sequence[Example], tokenizer, max_length: int | None = 512,
            num_hard_negatives: int = 7, rule: TextRule = TextRule(),
            in_batch_negatives: bool = True, dataset: str = "", padding_side: str = "right",
            known_positives: Mapping[tuple[str, str], Sequence[int]] | None = None) -> dict:
    """B examples -> the loss's batch. documents: B * (1 + n) rows, [pos, neg_1..neg_n] per query
    (query i's positive is row i * (1 + n)); doc_keys (B * (1 + n),) int64: their `text_key`s.
    known_positive_keys (B, P) int64, row i: the keys of query i's positives from `known_positives`
    (default: of these examples only), padded with its first; the loss masks them out of query i's
    negatives. repeated_negatives: the slots filled by `hard_negatives`."""
    if known_positives is None:
        known_positives = query_positive_keys(examples)
    positive_keys = [list(known_positives[(e.instruction, e.query)]) for e in examples]
    width = max(len(keys) for keys in positive_keys)  # P
    documents, document_instructions, repeated = [], [], 0
    for example in examples:
        negatives, n_repeated = hard_negatives(example, num_hard_negatives)
        repeated += n_repeated
        documents += [example.positive] + negatives
        document_instructions += [example.document_instruction] * (1 + num_hard_negatives)
    return {
        "queries": tokenize(tokenizer, [e.query for e in examples],
                            [e.instruction for e in examples], max_length, rule, padding_side),
        "documents": tokenize(tokenizer, documents, document_instructions, max_length, rule,
                              padding_side),
        "doc_keys": torch.tensor([text_key(d) for d in documents]),  # (B * (1 + n),) int64
        "known_positive_keys": torch.tensor([keys + keys[:1] * (width - len(keys))
                                             for keys in positive_keys]),  # (B, P) int64
        "in_batch_negatives": in_batch_negatives, "dataset": dataset,
        "num_hard_negatives": num_hard_negatives, "repeated_negatives": repeated,
    }


# Sampling (plumbing/sampler.py): step k's global batch comes from one dataset, drawn with
# probability proportional to its size, and holds its next B examples in a shuffled epoch order
# (every example once an epoch), a pure function of (seed, k); rank r embeds the r-th contiguous
# slice of it.


if __name__ == "__main__":  # python data.py check-beir FOLDER SPLIT | check-train FILE [--skip-bad]
    from plumbing.data_cli import main
    main()
