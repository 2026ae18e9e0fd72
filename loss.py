"""The loss of NV-Embed's contrastive instruction tuning (PAPER.md section 4): InfoNCE over cosine
similarities divided by a temperature, each query against its positive, its hard negatives and, for
retrieval data in stage 1, every other document of the global batch on every rank (in-batch
negatives). That sum is the paper's. Two masking rules are this project's additions: a document
known to be relevant to the query is no negative, and a document among the candidates twice counts
once. NV-Embed-v2's own false-negative rule acts earlier, when the hard negatives are mined: the
margin in mine.py (TopK-PercPos). train.py calls `contrastive_loss` on the embeddings of a whole
batch (plainly, or GradCache's way). Tests: tests/test_loss.py (a naive loop), tests/test_train.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plumbing.distributed import is_distributed, rank, world_size


def contrastive_loss(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                     temperature: float = 0.01, in_batch_negatives: bool = True,
                     known_positive_keys: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of this rank's B queries, averaged over them. query_emb (B, D); doc_emb (B*G, D)
    grouped per query as [positive, hard neg 1..n] (G = 1 + n); doc_keys (B*G,) int64
    (`data.text_key`: identical text, identical key); known_positive_keys (B, P) int64, optional:
    row i holds the key of every document known to be relevant to query i (default: its own
    positive).

        loss_i = -log( exp(s(q_i, d_i+) / tau) / sum_{d in candidates_i} exp(s(q_i, d) / tau) )

    candidates_i: d_i+, its hard negatives and (in-batch) the batch's other documents, as in the
    paper, less what this project's two rules below mask.
    """
    B, D = query_emb.shape
    if B == 0 or doc_emb.shape[0] % B:
        raise ValueError(f"contrastive_loss: doc_emb has {doc_emb.shape[0]} rows, not a multiple "
                         f"of the {B} queries (expected B*(1+n) documents grouped per query)")
    G = doc_emb.shape[0] // B  # documents per query: 1 positive + n hard negatives
    keys = _checked_keys(doc_keys, (B * G,), "doc_keys").to(query_emb.device)  # (B*G,)
    if known_positive_keys is None:
        known_positive_keys = keys[::G, None]  # (B, 1): each query's own positive
    # The known positives are needed only for this rank's queries, so they are not gathered.
    known = _checked_keys(known_positive_keys, (B, None), "known_positive_keys")
    known = known.to(query_emb.device)  # (B, P)

    # s is the cosine similarity, in fp32: with tau = 0.01, bf16 similarities (3 significant digits)
    # would be rounded by more than the gaps the loss has to learn.
    dtype = torch.promote_types(query_emb.dtype, torch.float32)
    query_emb = F.normalize(query_emb.to(dtype), dim=-1)  # (B, D)
    doc_emb = F.normalize(doc_emb.to(dtype), dim=-1)  # (B*G, D)

    # The candidates of query i: its own group (positive and hard negatives) and, with in-batch
    # negatives, every document of the GLOBAL batch, the other queries' groups on every rank.
    if in_batch_negatives:
        offset = 0  # index of this rank's first document in the global batch
        if is_distributed() and world_size() > 1:
            # Every rank must hold the same B (the sampler gives equal slices).
            doc_emb = GatherWithGradient.apply(doc_emb)  # (W*B*G, D), gradients flow to the owners
            keys = _all_gather_ids(keys)  # (W*B*G,): the keys say what every column is
            offset = rank() * B * G
        scores = query_emb @ doc_emb.T / temperature  # (B, C), C = W*B*G: every document
        # tevatron's trick: query i's positive is the first document of its group.
        target = offset + torch.arange(B, device=scores.device) * G  # (B,)
        candidate_keys = keys[None, :]  # (1, C), the same columns for every query
    else:
        groups = doc_emb.view(B, G, D)  # (B, G, D)
        scores = torch.einsum("bd,bgd->bg", query_emb, groups) / temperature  # (B, C), C = G
        target = torch.zeros(B, dtype=torch.long, device=scores.device)  # the positive is column 0
        candidate_keys = keys.view(B, G)  # (B, C): query i sees its own group

    # The paper's sum stops here. Two rules of this project (not the paper's) make the candidates
    # a set of distinct negatives plus the positive. Rule 1, known positives: a document known to be
    # relevant to query i is not its negative (a copy of the positive, the positive of another
    # example of the same query, a relevant document that is another query's positive).
    # NV-Embed-v2's own guard against false negatives is another: mine.py's margin, at mining time.
    known_positive = (candidate_keys[:, :, None] == known[:, None, :]).any(-1)  # (B, C)
    # Rule 2, one copy per document: a copy of a document already among the candidates (a hard
    # negative repeated to fill the n slots, or shared by several queries) would weigh it twice.
    repeated = _repeated_columns(candidate_keys)  # (1 or B, C)
    # The positive column always stays, though rule 1 names it and an earlier column may
    # hold the same document (another query's positive); every other copy of it goes.
    is_target = F.one_hot(target, scores.shape[1]).bool()  # (B, C)
    scores = scores.masked_fill((known_positive | repeated) & ~is_target, float("-inf"))
    return F.cross_entropy(scores, target)


def collapsed_loss(doc_keys: torch.Tensor, queries: int, in_batch_negatives: bool = True,
                   known_positive_keys: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a collapsed model gets on this batch, one that scores every candidate alike: the
    mean over queries of ln(the candidates the two rules leave query i). That is contrastive_loss
    on equal embeddings (every score the same), so the rules are applied exactly as in training,
    ranks included; a width-1 embedding keeps it cheap. The same arguments as contrastive_loss."""
    same = torch.ones(len(doc_keys), 1)  # (B*G, 1): every cosine 1
    return contrastive_loss(same[:queries], same, doc_keys, 1.0, in_batch_negatives,
                            known_positive_keys)


def _repeated_columns(keys: torch.Tensor) -> torch.Tensor:
    """keys (R, C) -> (R, C) bool, True where an earlier column of the row holds the same key. A
    stable sort puts equal keys side by side in column order: O(C) memory, where comparing all pairs
    takes (C, C), 1 GB at 32k."""
    order = keys.argsort(dim=1, stable=True)  # (R, C)
    sorted_keys = keys.gather(1, order)  # (R, C)
    repeat_in_order = torch.zeros_like(sorted_keys, dtype=torch.bool)  # (R, C)
    repeat_in_order[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    # back to column order
    return torch.zeros_like(repeat_in_order).scatter(1, order, repeat_in_order)


class GatherWithGradient(torch.autograd.Function):
    """all_gather of (N, D) rows from every rank -> (W*N, D), differentiable: the backward sums over
    ranks the gradients every rank's loss sends to the rows and hands each rank its own.

    No world-size factor is needed: rank r's parameter gradient is the derivative of sum_r' loss_r'
    through the embeddings rank r computed, and FSDP's (or DDP's) average over the W ranks adds
    these up to d((1/W) sum_r' loss_r') / d(parameters), exactly the gradient of the mean loss over
    all W*B queries that one rank computes on the whole global batch (tests/test_train.py checks 2
    ranks against 1). tevatron instead gathers WITHOUT gradient and lets every rank compute the loss
    of all W*B queries; only the local documents then carry gradient, and it multiplies its loss by
    W to undo the averaging."""

    @staticmethod
    def forward(ctx, local):
        gathered = [torch.empty_like(local) for _ in range(world_size())]
        dist.all_gather(gathered, local.contiguous())
        return torch.cat(gathered)  # (W*N, D)

    @staticmethod
    def backward(ctx, grad):
        # (W*N, D), a copy: never reduce autograd's buffer in place
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # sum over ranks of d(loss_r) / d(rows)
        return grad.chunk(world_size())[rank()]  # (N, D): this rank's rows


def _checked_keys(keys, shape: tuple, what: str) -> torch.Tensor:
    """`keys` if it is an int64 tensor of `shape` (None: any size, at least 1), else a
    ValueError."""
    fits = (isinstance(keys, torch.Tensor) and keys.dtype == torch.long and keys.dim() == len(shape)
            and all(n == want if want is not None else n >= 1
                    for n, want in zip(keys.shape, shape)))
    if not fits:
        is_tensor = isinstance(keys, torch.Tensor)
        found = f"{keys.dtype} {tuple(keys.shape)}" if is_tensor else type(keys).__name__
        # e.g. (8,) or (2, P)
        wanted = str(tuple("P" if n is None else n for n in shape)).replace("'", "")
        raise ValueError(f"contrastive_loss: {what} must be an int64 tensor {wanted} "
                         f"(data.text_key), got {found}")
    return keys


def _all_gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ids (no gradient: they are labels)."""
    gathered = [torch.empty_like(ids) for _ in range(world_size())]
    dist.all_gather(gathered, ids)
    return torch.cat(gathered)
