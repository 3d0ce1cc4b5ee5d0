"""Pieces of the contrastive training step, kept out of the job file so the loop stays short.

- :class:`DualEncoder` embeds queries and documents in ONE forward call, so DDP sees a single
  forward per backward (two separate DDP forwards before one backward is not supported).
- :class:`LiveNegatives` asks the index service for each query's neighbours, mines a rank window
  and turns the chosen ids into tokens; it falls back to in-batch negatives (and says why) when
  the service is down, slow or too stale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whetstone.config.contrastive import LossConfig
from whetstone.index.mining import MiningConfig, mine_negatives
from whetstone.models.encoder import Encoder


class DualEncoder(nn.Module):
    """One shared encoder applied to queries and documents in a single forward (or, with
    ``query_encoder``, a frozen query tower beside the trained document encoder).

    Rows are encoded in length-sorted chunks of ``chunk_size``, each cut to its own longest row,
    and the embeddings are put back in input order: the result is the same as one big batch (each
    row's embedding depends only on its own tokens), but on CPU one (64, 256)-token batch measured
    1.5x slower per row than chunks of 16 (large activation tensors fall out of cache and are
    re-allocated from the OS every step), and padding shorter rows to the batch's longest wastes
    work. The autograd graph spans all chunks: the loss still sees every embedding at once.

    Args:
        encoder: the shared encoder.
        chunk_size: rows per forward chunk; ``None`` encodes each side in one batch.
        autocast: run the transformer (forward and backward) under autocast to this dtype, e.g.
            ``torch.bfloat16``; weights, optimizer state, pooled embeddings and the loss stay float32.
        query_encoder: a frozen query tower: queries are embedded by it in eval mode without
            gradients, and only ``encoder`` (the document tower) trains. Its parameters are set to
            ``requires_grad=False`` here, so DDP and the optimiser leave them alone.
    """

    def __init__(self, encoder: Encoder, chunk_size: int | None = 16, autocast: torch.dtype | None = None,
                 query_encoder: Encoder | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.encoder = encoder
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.query_encoder = query_encoder
        if query_encoder is not None:
            query_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> DualEncoder:
        super().train(mode)
        if self.query_encoder is not None:
            self.query_encoder.eval()  # frozen: never dropout
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               encoder: Encoder | None = None) -> torch.Tensor:
        """(N, L) right-padded tokens -> (N, D) unit-norm embeddings, chunked as described above
        (by ``encoder``, default the trained one)."""
        encoder = encoder or self.encoder
        rows = input_ids.shape[0]
        if self.chunk_size is None or rows <= self.chunk_size:
            width = max(int(attention_mask.sum(dim=1).max()), 1)
            return encoder(input_ids[:, :width], attention_mask[:, :width], autocast=self.autocast)
        lengths = attention_mask.sum(dim=1)  # (N,)
        order = torch.argsort(lengths, stable=True)  # (N,) shortest first
        parts = []
        for chunk in order.split(self.chunk_size):
            width = max(int(lengths[chunk].max()), 1)
            parts.append(encoder(input_ids[chunk, :width], attention_mask[chunk, :width], autocast=self.autocast))
        embeddings = torch.cat(parts)  # (N, D) in sorted order
        return embeddings[torch.argsort(order)]  # back to input order

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        doc_input_ids: torch.Tensor,
        doc_attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (queries (B, D), documents (M, D)), unit-norm."""
        if self.query_encoder is None:
            queries = self.encode(query_input_ids, query_attention_mask)
        else:
            with torch.no_grad():
                queries = self.encode(query_input_ids, query_attention_mask, self.query_encoder)
        return queries, self.encode(doc_input_ids, doc_attention_mask)


def stack_padded(a_ids: torch.Tensor, a_mask: torch.Tensor, b_ids: torch.Tensor, b_mask: torch.Tensor,
                 pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two padded token batches (B1, L1) and (B2, L2) into (B1 + B2, max(L1, L2))."""
    width = max(a_ids.shape[1], b_ids.shape[1])

    def widen(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = width - ids.shape[1]
        return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)

    a_ids, a_mask = widen(a_ids, a_mask)
    b_ids, b_mask = widen(b_ids, b_mask)
    return torch.cat([a_ids, b_ids]), torch.cat([a_mask, b_mask])


@dataclass
class NegativeBatch:
    """Hard negatives for one batch: flat ids (B * N) plus tokens, or nothing on fallback."""

    ids: list[str] = field(default_factory=list)
    input_ids: torch.Tensor | None = None  # (B * N, Ln)
    attention_mask: torch.Tensor | None = None  # (B * N, Ln)
    version: int | None = None
    from_index: int = 0
    random_fill: int = 0
    dropped_by_margin: int = 0
    fallback_reason: str | None = None
    search_s: float = 0.0
    candidates: int = 0  # candidates inside the rank window (before the margin rule)
    steps_behind: int | None = None  # the step mined for minus the step the answering version was embedded at
    fallback_kind: str | None = None  # "unavailable" (index down or slow), "stale" (past the bound), "vectors"
    vectors: torch.Tensor | None = None  # (B * N, D) the index's stored vectors, when not re-encoded


class LiveNegatives:
    """Hard negatives from the live index, mined per batch.

    Args:
        client: an ``IndexClient`` (handle in the cluster, HTTP outside).
        docs: resolves ids to text and is the random-fill pool: the run's
            :class:`whetstone.data.doc_lookup.DocLookup` (or a ``DocStore``, the corpus in memory).
        mining: rank window, margins and random mix.
        seed, rank: the random draws of step t come from ``(seed, rank, t)`` alone, so a resumed run
            mines what an uninterrupted one would have.
        max_steps_behind: staleness bound in steps: a search answered by a version embedded from a
            checkpoint more than this many steps before the step being mined falls back (None: no
            bound). A version that did not record its step (published outside a training run) is
            taken as fresh.
        encode: True: return the negatives' tokens (the step re-encodes them with the current
            weights); False: return their stored vectors from the index (a negative cache: no
            forward or backward for negatives, gradients through the queries only).
    """

    def __init__(self, client, docs, mining: MiningConfig, seed: int, rank: int,
                 doc_max_length: int, timeout_s: float, max_steps_behind: int | None, encode: bool = True):
        self.client = client
        self.docs = docs  # texts by id, and the random-fill pool (a sequence of every id)
        self.mining = mining
        self.seed, self.rank = seed, rank
        self.doc_max_length = doc_max_length
        self.timeout_s = timeout_s
        self.max_steps_behind = max_steps_behind
        self.encode = encode

    @staticmethod
    def embed_queries(encoder: Encoder, query_tokens: dict[str, torch.Tensor]) -> np.ndarray:
        """(B, D) query vectors with the current weights, no grad (the search key)."""
        with torch.no_grad():
            was_training = encoder.training
            encoder.eval()
            vectors = encoder(query_tokens["input_ids"], query_tokens["attention_mask"])  # (B, D)
            encoder.train(was_training)
        return vectors.float().cpu().numpy()

    def fetch(self, vectors: np.ndarray, positive_ids: list[list[str]], tokenizer, step: int = 0) -> NegativeBatch:
        """Search, apply the staleness bound, mine, resolve ids to text and tokenise.

        ``step``: the steps trained so far (the weights that embedded ``vectors``); the lag is it
        minus the step the answering version was embedded at. Thread-safe with respect to the
        training step (it touches no model weights), so the loop runs it for the next batch while
        the current one trains.
        """
        from whetstone.index.client import IndexRequestError, IndexUnavailable

        started = time.monotonic()
        guard = bool(self.mining.relative_margin or self.mining.absolute_margin)
        try:
            # With a false-negative margin, the same call returns the positives' scores.
            result = self.client.search(vectors, k=self.mining.rank_end, exclude_ids=positive_ids,
                                        timeout_s=self.timeout_s, score_excluded=guard)
        except IndexUnavailable as err:
            return NegativeBatch(fallback_reason=f"index unavailable: {err}", fallback_kind="unavailable",
                                 search_s=time.monotonic() - started)
        search_s = time.monotonic() - started
        behind = None if result.embedded_step is None else max(step - result.embedded_step, 0)
        if behind is not None and self.max_steps_behind is not None and behind > self.max_steps_behind:
            return NegativeBatch(version=result.version, search_s=search_s, steps_behind=behind, fallback_kind="stale",
                                 fallback_reason=f"index v{result.version} was embedded at step {result.embedded_step}, "
                                                 f"{behind} steps behind (bound {self.max_steps_behind})")
        positive_scores = positive_reference_scores(result.excluded_scores) if guard else None
        rng = np.random.default_rng([self.seed, self.rank, step])
        mined = mine_negatives(result.ids, result.scores, self.mining, rng, self.docs,
                               positive_scores=positive_scores, exclude=[set(p) for p in positive_ids])
        flat = [doc_id for per_query in mined.ids for doc_id in per_query]
        counts = (mined.from_index, mined.random_fill, mined.dropped_by_margin)
        if not self.encode:
            try:
                _, vectors = self.client.vectors(flat, timeout_s=self.timeout_s)
            except (IndexUnavailable, IndexRequestError) as err:
                return NegativeBatch(version=result.version, search_s=time.monotonic() - started, steps_behind=behind,
                                     fallback_reason=f"stored vectors unavailable: {err}", fallback_kind="vectors")
            return NegativeBatch(flat, None, None, result.version, *counts, None, time.monotonic() - started,
                                 mined.candidates, behind, vectors=torch.tensor(vectors))  # a copy: Ray's is read-only
        tokens = tokenizer(self.docs.texts(flat), padding=True, truncation=True,
                           max_length=self.doc_max_length, return_tensors="pt")
        return NegativeBatch(flat, tokens["input_ids"], tokens["attention_mask"], result.version, *counts, None,
                             search_s, mined.candidates, behind)


def positive_reference_scores(excluded_scores: list[list[float | None]] | None) -> np.ndarray | None:
    """Per query, the highest score among its labelled positives (NaN when none is in the index).

    The margin rule then drops candidates that score within the margin of a labelled positive;
    a query whose positives are unknown to the index keeps its candidates (NaN skips the rule).
    """
    if excluded_scores is None:
        return None
    return np.array([max((s for s in row if s is not None), default=np.nan) for row in excluded_scores],
                    dtype=np.float64)


def build_loss(loss: LossConfig, temperature: float, symmetric: bool) -> nn.Module:
    """The configured loss: InfoNCE or GIST, wrapped in Matryoshka when dims are given.

    Every variant is called as ``loss_fn(queries (B, D), docs (M, D), positive_column (B,),
    exclude_mask=(B, M), **extra)``; GIST takes ``guide_scores=(B, M)`` as the extra argument.
    """
    from whetstone.losses.gist import GISTLoss
    from whetstone.losses.info_nce import InfoNCELoss
    from whetstone.losses.matryoshka import MatryoshkaLoss

    if loss.kind == "gist":
        base: nn.Module = GISTLoss(loss.guide_margin, loss.guide_margin_strategy, temperature, symmetric)
    else:
        base = InfoNCELoss(temperature, symmetric)
    if loss.matryoshka_dims:
        return MatryoshkaLoss(base, loss.matryoshka_dims, loss.matryoshka_weights)
    return base


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up to 1, then linear decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(total_steps - step, 0)
    return remaining / max(total_steps - warmup_steps, 1)
