"""Tests for loss.py: contrastive_loss against a naive InfoNCE loop (the one reference the other
tests use), its masking of known positives and repeated documents, and a batch's loss end to end.
Two ranks against one: tests/test_train.py.

Run: python -m pytest -q tests/test_loss.py
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import loss as loss_module  # noqa: E402
import train  # noqa: E402
from plumbing import training_files  # noqa: E402
from plumbing.base_checkpoints import ByteTokenizer  # noqa: E402

torch.set_num_threads(1)

# ---------------------------------------------------------------- the loss


def naive_infonce(queries, docs, keys, group_size, temperature, in_batch_negatives,
                  known_positives=None):
    """The loss of PAPER.md section 4, one query at a time, in plain Python.

    queries: B lists of floats; docs: B*G lists of floats grouped per query [pos, negs];
    keys: B*G document keys (identical key = identical document); known_positives: B sets
    of the keys known relevant to each query (default: its own positive). Query i's
    candidates are built by hand: its positive, then each document of its pool (its group,
    or the whole batch with in-batch negatives) that is not a known positive of query i
    and not a copy of a document already taken.
    """
    if known_positives is None:
        known_positives = [{keys[i * group_size]} for i in range(len(queries))]

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i, query in enumerate(queries):
        positive = i * group_size
        pool = range(len(docs)) if in_batch_negatives else range(positive, positive + group_size)
        candidates, taken = [positive], {keys[positive]}
        for j in pool:
            if keys[j] in known_positives[i] or keys[j] in taken:
                continue
            candidates.append(j)
            taken.add(keys[j])
        logits = [cosine(query, docs[j]) / temperature for j in candidates]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(logit - top) for logit in logits))
        total += log_denominator - logits[0]
    return total / len(queries)


def random_batch(B, G, D, seed):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, D, generator=generator, dtype=torch.float64)
    docs = torch.randn(B * G, D, generator=generator, dtype=torch.float64)
    # Nudge each positive towards its query so the loss is in a realistic range.
    docs[::G] += 0.5 * queries
    keys = list(range(100, 100 + B * G))  # every document distinct
    return queries, docs, keys


def copy_document(docs, keys, to, source):
    """Row `to` becomes the document of row `source`: same key, same embedding."""
    docs[to], keys[to] = docs[source], keys[source]


def loss(queries, docs, keys, temperature, in_batch_negatives, known_positives=None):
    """loss.contrastive_loss with the keys as tensors, known_positives as B sets (padded rows)."""
    known = None
    if known_positives is not None:
        width = max(map(len, known_positives))
        known = torch.tensor([sorted(s) + [min(s)] * (width - len(s))
                              for s in known_positives])  # (B, P)
    return loss_module.contrastive_loss(queries, docs, torch.tensor(keys), temperature,
                                        in_batch_negatives, known).item()


@pytest.mark.parametrize("in_batch_negatives", [False, True])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_loss_matches_naive_loop(in_batch_negatives, temperature):
    B, G, D = 4, 3, 8
    queries, docs, keys = random_batch(B, G, D, seed=1)
    got = loss(queries, docs, keys, temperature, in_batch_negatives)
    want = naive_infonce(queries.tolist(), docs.tolist(), keys, G, temperature, in_batch_negatives)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_loss_masks_duplicates_of_the_positive(in_batch_negatives):
    B, G, D = 3, 3, 8
    queries, docs, keys = random_batch(B, G, D, seed=2)
    # Query 2 has the same positive as query 0, and one of query 1's hard negatives is
    # that document too; query 1 also has a hard negative that duplicates its own positive.
    copy_document(docs, keys, 2 * G, 0)
    copy_document(docs, keys, G + 2, 0)
    copy_document(docs, keys, G + 1, G)
    got = loss(queries, docs, keys, 0.05, in_batch_negatives)
    want = naive_infonce(queries.tolist(), docs.tolist(), keys, G, 0.05, in_batch_negatives)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # Without the mask the value would differ: the test would notice a missing mask.
    unmasked = naive_infonce(queries.tolist(), docs.tolist(), list(range(B * G)), G, 0.05,
                             in_batch_negatives)
    assert abs(unmasked - want) > 1e-3


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_loss_counts_each_document_once(in_batch_negatives):
    B, G, D = 3, 4, 8
    queries, docs, keys = random_batch(B, G, D, seed=5)
    copy_document(docs, keys, 3, 1)  # query 0's negatives repeated cyclically: [n1, n2, n1]
    copy_document(docs, keys, G + 3, G + 1)  # query 1's too: [m1, m2, m1] ...
    copy_document(docs, keys, 2 * G + 2, G + 1)  # ... and m1 is also a hard negative of query 2
    copy_document(docs, keys, 2 * G + 3, 2)  # and so is query 0's n2
    got = loss(queries, docs, keys, 0.05, in_batch_negatives)
    want = naive_infonce(queries.tolist(), docs.tolist(), keys, G, 0.05, in_batch_negatives)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    every_copy = naive_infonce(queries.tolist(), docs.tolist(), list(range(B * G)), G, 0.05,
                               in_batch_negatives)
    assert abs(every_copy - want) > 1e-3  # counting copies would give another loss


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_loss_masks_every_known_positive(in_batch_negatives):
    B, G, D = 4, 3, 8
    queries, docs, keys = random_batch(B, G, D, seed=4)
    # Query 3 is another example of query 1 (a query with two relevant documents); query 1's
    # positive is relevant to query 0 as well, whose (query 0, that document) example is not
    # in the batch; and query 2 has a relevant document among its own hard negatives.
    queries[3] = queries[1]
    known = [{keys[0], keys[G]}, {keys[G], keys[3 * G]}, {keys[2 * G], keys[2 * G + 1], 999},
             {keys[3 * G], keys[G]}]
    got = loss(queries, docs, keys, 0.05, in_batch_negatives, known)
    want = naive_infonce(queries.tolist(), docs.tolist(), keys, G, 0.05, in_batch_negatives, known)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    own_positive_only = naive_infonce(queries.tolist(), docs.tolist(), keys, G, 0.05,
                                      in_batch_negatives)
    assert abs(own_positive_only - want) > 1e-3


def test_loss_checks_keys_and_shapes():
    queries, docs, keys = random_batch(2, 2, 4, seed=3)
    with pytest.raises(ValueError, match="not a multiple"):
        loss_module.contrastive_loss(queries, docs[:3], torch.tensor(keys[:3]))
    with pytest.raises(ValueError, match=r"doc_keys must be an int64 tensor \(4,\)"):
        loss_module.contrastive_loss(queries, docs, torch.tensor(keys[:3]))
    with pytest.raises(ValueError, match="doc_keys must be an int64 tensor"):
        loss_module.contrastive_loss(queries, docs, [str(k) for k in keys])
    with pytest.raises(ValueError, match=r"known_positive_keys must be an int64 tensor \(2, P\)"):
        loss_module.contrastive_loss(queries, docs, torch.tensor(keys),
                                     known_positive_keys=torch.tensor(keys))


# Through the data pipeline: data.TrainDataset -> collate -> train.forward_backward, with a
# model whose embedding is a fixed function of the text, against a naive loop that builds
# every query's candidates from the example texts.

class BagOfBytes(torch.nn.Module):
    """An embedder for the loss tests: the sum of a random vector per byte of the pooled text."""

    def __init__(self, D=16, seed=0):
        super().__init__()
        self.table = \
            torch.nn.Parameter(torch.randn(259, D, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64))

    def forward(self, batch):
        return (self.table[batch["input_ids"]] * batch["pool_mask"][..., None]).sum(1)  # (B, D)


def known_positive_examples():
    """8 examples, 4 per rank on 2 ranks, with what the masking rules are for.

    - query a has two relevant documents: doc alpha (its example is in the batch, on rank 0)
      and doc beta (its example is not; doc beta is query f's positive, on rank 1);
    - query b too, both examples in the batch (rank 0 and rank 1), and its second example has
      the first one's positive among its hard negatives;
    - doc alpha, query a's positive, is also a hard negative of query d;
    - query b's single negative is repeated to fill the 2 slots, query g's list repeats one;
    - doc kilo is a hard negative of queries a and c (rank 0), doc lima of a and e (both ranks).
    """
    def example(query, positive, negatives):
        return training_files.Example(query, "Find", positive, negatives, "retrieval")

    return [example("query a", "doc alpha", ["doc kilo", "doc lima"]),
            example("query b", "doc bravo", ["doc mike"]),
            example("query c", "doc charlie", ["doc kilo", "doc november"]),
            example("query d", "doc delta", ["doc oscar", "doc alpha"]),
            example("query e", "doc echo", ["doc lima", "doc papa"]),
            example("query f", "doc beta", ["doc quebec", "doc romeo"]),
            example("query g", "doc golf", ["doc sierra", "doc sierra"]),
            example("query b", "doc hotel", ["doc tango", "doc bravo"])]


def known_positive_dataset(in_batch_negatives):
    """The examples above plus (query a, doc beta), which no batch of the tests takes."""
    examples = known_positive_examples() + \
        [training_files.Example("query a", "Find", "doc beta", ["doc x"], "retrieval")]
    return data.TrainDataset("known-positives", examples, in_batch_negatives=in_batch_negatives,
                             num_hard_negatives=2)


def naive_batch_loss(model, examples, all_examples, num_hard_negatives, temperature,
                     in_batch_negatives):
    """The loss of a batch of examples, every query's candidates built from the texts by hand."""
    def embed(text, instruction=""):
        return model(data.tokenize(ByteTokenizer(), [text], instruction))[0].tolist()

    groups = [[e.positive] + [e.negatives[k % len(e.negatives)] for k in range(num_hard_negatives)]
              for e in examples]
    texts = [text for group in groups for text in group]
    known = [{other.positive for other in all_examples
              if (other.instruction, other.query) == (e.instruction, e.query)}
             for e in examples]
    with torch.no_grad():
        return naive_infonce([embed(e.query, e.instruction) for e in examples],
                             [embed(t) for t in texts], texts, 1 + num_hard_negatives, temperature,
                             in_batch_negatives, known)


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_batch_loss_masks_known_positives_and_counts_documents_once(in_batch_negatives):
    dataset, model = known_positive_dataset(in_batch_negatives), BagOfBytes()
    batch = dataset.collate(range(8), ByteTokenizer(), max_length=64)
    got, _ = train.forward_backward(model, batch, 0.05, 1.0, torch.device("cpu"))
    want = naive_batch_loss(model, known_positive_examples(), dataset.examples, 2, 0.05,
                            in_batch_negatives)
    assert got.item() == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- 2 ranks (FSDP2, gloo) vs 1 rank


def naive_candidate_counts(keys, group_size, queries, in_batch_negatives, known_positives):
    """How many candidates each query keeps, built by hand as naive_infonce builds them."""
    counts = []
    for i in range(queries):
        positive = i * group_size
        pool = range(len(keys)) if in_batch_negatives else range(positive, positive + group_size)
        taken = {keys[positive]}
        counts.append(1 + sum(1 for j in pool if keys[j] not in known_positives[i] | taken
                              and not taken.add(keys[j])))
    return counts


@pytest.mark.parametrize("in_batch_negatives", [False, True])
def test_collapsed_loss_is_the_mean_log_of_each_querys_candidates(in_batch_negatives):
    """A collapsed model's loss: ln of the candidates each query keeps once known positives and
    copies are masked, averaged; here 1 to 11 candidates a row, below ln of the softmax's width."""
    B, G = 4, 3
    keys = list(range(100, 100 + B * G))
    keys[2] = keys[1]  # query 0's negatives repeated cyclically
    keys[G + 2] = keys[2 * G + 1]  # a hard negative shared by queries 1 and 2
    known = [{keys[0], keys[G]}, {keys[G]}, {keys[2 * G], keys[2 * G + 2]}, {keys[3 * G]}]
    width = max(map(len, known))
    known_tensor = torch.tensor([sorted(s) + [min(s)] * (width - len(s)) for s in known])
    got = loss_module.collapsed_loss(torch.tensor(keys), B, in_batch_negatives, known_tensor)
    counts = naive_candidate_counts(keys, G, B, in_batch_negatives, known)
    assert got.item() == pytest.approx(sum(math.log(c) for c in counts) / B, rel=1e-6)
    assert len(set(counts)) > 1 and got.item() < math.log(B * G if in_batch_negatives else G)
