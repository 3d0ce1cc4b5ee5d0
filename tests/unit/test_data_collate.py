"""collate_pairs on batches shaped the way Ray Data's numpy iter_batches yields them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from whetstone.data.collate import collate_pairs, pad_sequences


def _object_array(rows):
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out


def _batch(query_ids, positive_ids):
    return {
        "query_id": np.array(["q1", "q2"], dtype=object),
        "positive_id": np.array(["d1", "d7"], dtype=object),
        "positive_ids": _object_array([np.array(["d1"], dtype=object), np.array(["d7", "d8"], dtype=object)]),
        "query_input_ids": query_ids,
        "positive_input_ids": positive_ids,
    }


def test_pads_to_the_longest_sequence_in_the_batch_not_max_length():
    batch = _batch(_object_array([np.array([101, 5, 102]), np.array([101, 102])]),
                   _object_array([np.array([101, 9, 9, 9, 102]), np.array([101, 8, 102])]))
    out = collate_pairs(batch, pad_token_id=0)
    assert out["query_input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert out["query_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["positive_input_ids"].shape == (2, 5) and out["positive_input_ids"].dtype == torch.int64
    assert out["positive_attention_mask"].sum(dim=1).tolist() == [5, 3]
    assert out["query_id"] == ["q1", "q2"] and out["positive_id"] == ["d1", "d7"]
    assert out["positive_ids"] == [["d1"], ["d7", "d8"]]


def test_equal_length_rows_arriving_as_a_2d_array_also_work():
    batch = _batch(np.array([[101, 5, 102], [101, 6, 102]], dtype=np.int32),
                   _object_array([np.array([101, 102]), np.array([101, 3, 102])]))
    out = collate_pairs(batch, pad_token_id=7)
    assert out["query_attention_mask"].all()
    assert out["positive_input_ids"].tolist() == [[101, 102, 7], [101, 3, 102]]


def test_negatives_are_flattened_query_major():
    batch = _batch(_object_array([np.array([1, 2]), np.array([3])]), _object_array([np.array([4]), np.array([5])]))
    batch["negative_input_ids"] = _object_array([
        _object_array([np.array([10, 11]), np.array([12])]),
        _object_array([np.array([13]), np.array([14, 15, 16])]),
    ])
    batch["negative_ids"] = _object_array([np.array(["n1", "n2"]), np.array(["n3", "n4"])])
    out = collate_pairs(batch)
    assert out["negatives_per_query"] == 2
    assert out["negative_input_ids"].tolist() == [[10, 11, 0], [12, 0, 0], [13, 0, 0], [14, 15, 16]]
    assert out["negative_ids"] == [["n1", "n2"], ["n3", "n4"]]
    batch["negative_input_ids"] = _object_array([_object_array([np.array([10])]), _object_array([])])
    with pytest.raises(ValueError, match="different numbers of negatives.*q1: 1, q2: 0"):
        collate_pairs(batch)


def test_pad_sequences_rejects_empty_input():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_sequences([np.array([1]), np.array([], dtype=np.int64)])
