"""Collators: pure functions from a numpy batch (as Ray Data yields it) to padded torch tensors.

Ray Data hands list columns to ``iter_batches(batch_format="numpy")`` either as a 2-D integer
array (when every row happens to have the same length) or as an object array of 1-D arrays;
both are accepted. Padding is dynamic: to the longest sequence in the batch, not to max_length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from whetstone.data import schemas as S


def _sequences(column: Any) -> list[np.ndarray]:
    """A batch column of token id sequences as a list of 1-D int64 arrays."""
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return [row.astype(np.int64, copy=False) for row in column]
    return [np.asarray(row, dtype=np.int64).reshape(-1) for row in column]


def _as_list(column: Any) -> list[Any]:
    """A batch column as plain Python values (lists for list columns)."""
    out = []
    for value in column:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out.append(value)
    return out


def pad_sequences(sequences: Sequence[np.ndarray], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence.

    Args:
        sequences: N 1-D integer arrays of lengths L_i >= 1.
        pad_token_id: the value of padded positions.

    Returns:
        ``input_ids`` (N, max L_i) int64 and ``attention_mask`` (N, max L_i) int64, 1 on real tokens.

    >>> ids, mask = pad_sequences([np.array([5, 6, 7]), np.array([8])])
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if not sequences:
        raise ValueError("cannot pad an empty list of sequences")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if lengths.min() == 0:
        raise ValueError(f"sequence {int(np.argmin(lengths))} is empty; tokenize with special tokens")
    width = int(lengths.max())
    input_ids = np.full((len(sequences), width), pad_token_id, dtype=np.int64)  # (N, L)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)  # (N, L)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = seq
        attention_mask[i, : len(seq)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


def _collate_negatives(batch: dict[str, Any], pad_token_id: int, out: dict[str, Any]) -> None:
    """Flatten per-query negatives to (B*N, Ln) tensors; every query must have the same N."""
    per_query = [_sequences(row) for row in batch[S.NEGATIVE_INPUT_IDS]]
    counts = {len(seqs) for seqs in per_query}
    if len(counts) != 1:
        query_ids = _as_list(batch[S.QUERY_ID])
        ragged = [f"{qid}: {len(seqs)}" for qid, seqs in zip(query_ids, per_query, strict=True)][:5]
        raise ValueError(f"queries in a batch have different numbers of negatives ({', '.join(ragged)}, ...); "
                         "build the dataset with negatives_per_query=k")
    out["negatives_per_query"] = counts.pop()
    if out["negatives_per_query"]:
        flat = [seq for seqs in per_query for seq in seqs]
        out[S.NEGATIVE_INPUT_IDS], out["negative_attention_mask"] = pad_sequences(flat, pad_token_id)
    if S.NEGATIVE_IDS in batch:
        out[S.NEGATIVE_IDS] = _as_list(batch[S.NEGATIVE_IDS])


def collate_pairs(batch: dict[str, np.ndarray], pad_token_id: int = 0) -> dict[str, Any]:
    """Pad a batch of tokenized pairs to its longest query and longest document.

    Args:
        batch: a ``batch_format="numpy"`` batch from :func:`~whetstone.data.stream.tokenize_pairs`
            with B rows.
        pad_token_id: the tokenizer's pad id.

    Returns:
        ``query_input_ids`` / ``query_attention_mask`` (B, Lq), ``positive_input_ids`` /
        ``positive_attention_mask`` (B, Ld) as int64 tensors; ``query_id``, ``positive_id`` (lists
        of B str) and ``positive_ids`` (list of B lists, all labelled positives for masking).
        When the batch has negatives: ``negative_input_ids`` / ``negative_attention_mask``
        (B*N, Ln), query i's negatives at rows i*N..i*N+N-1, ``negative_ids`` (B lists of N) and
        ``negatives_per_query`` (N).
    """
    out: dict[str, Any] = {}
    out["query_input_ids"], out["query_attention_mask"] = pad_sequences(
        _sequences(batch[S.QUERY_INPUT_IDS]), pad_token_id)
    out["positive_input_ids"], out["positive_attention_mask"] = pad_sequences(
        _sequences(batch[S.POSITIVE_INPUT_IDS]), pad_token_id)
    out[S.QUERY_ID] = _as_list(batch[S.QUERY_ID])
    out[S.POSITIVE_ID] = _as_list(batch[S.POSITIVE_ID])
    out[S.POSITIVE_IDS] = _as_list(batch[S.POSITIVE_IDS])
    if S.NEGATIVE_INPUT_IDS in batch:
        _collate_negatives(batch, pad_token_id, out)
    return out
