"""TAS: FAISS k-means topics and single-topic batches that cover every row once per epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from whetstone.train.tas_balanced import TopicBatches, TopicRegrouper, cluster_queries


def blobs(per_blob: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three tight unit-norm blobs around orthogonal axes e0, e1, e2 of R^8 (true topic per row)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), per_blob)
    vectors = np.eye(8, dtype=np.float32)[truth] + 0.05 * rng.standard_normal((len(truth), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(truth))  # interleave so clusters are not contiguous rows
    return vectors[order], truth[order]


def test_cluster_queries_recovers_separated_topics_deterministically():
    vectors, truth = blobs(40, seed=0)
    labels = cluster_queries(vectors, k=3, seed=5)
    assert labels.shape == (120,) and labels.dtype == np.int64
    # each true topic maps to exactly one cluster, and the three clusters are distinct
    mapping = {topic: set(labels[truth == topic].tolist()) for topic in range(3)}
    assert all(len(found) == 1 for found in mapping.values())
    assert len(set().union(*mapping.values())) == 3
    assert np.array_equal(labels, cluster_queries(vectors, k=3, seed=5))


def test_cluster_queries_edge_cases_and_errors():
    vectors, _ = blobs(4, seed=1)
    assert np.array_equal(cluster_queries(vectors, k=1), np.zeros(12, dtype=np.int64))
    with pytest.raises(ValueError, match=r"k must be in \[1, 12\]"):
        cluster_queries(vectors, k=13)
    broken = vectors.copy()
    broken[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[7\] contain NaN"):
        cluster_queries(broken, k=2)


def check_epoch(batches: list[np.ndarray], labels: np.ndarray, batch_size: int) -> None:
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(labels)))  # every row exactly once
    for batch in batches:
        assert len(set(labels[batch].tolist())) == 1  # one topic per batch
        assert 1 <= len(batch) <= batch_size


def test_topic_batches_cover_every_row_once_with_single_topic_batches():
    # cluster sizes 10, 7, 3, 1 with batch 4: full batches 2+1+0+0, leftovers 2, 3, 3, 1 -> 7 batches
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3 + [5] * 1)
    np.random.default_rng(0).shuffle(labels)
    sampler = TopicBatches(labels, batch_size=4, seed=3)
    batches = sampler.global_batches()
    check_epoch(batches, labels, 4)
    assert len(batches) == len(sampler) == 7
    assert sorted(len(batch) for batch in batches) == [1, 2, 3, 3, 4, 4, 4]
    assert [list(map(int, batch)) for batch in batches] == list(sampler)


def test_topic_batches_are_deterministic_per_seed_and_epoch():
    labels = np.repeat(np.arange(5), 12)
    same = [b.tolist() for b in TopicBatches(labels, 5, seed=9).global_batches(epoch=2)]
    again = [b.tolist() for b in TopicBatches(labels, 5, seed=9).global_batches(epoch=2)]
    assert same == again
    sampler = TopicBatches(labels, 5, seed=9)
    sampler.set_epoch(3)
    next_epoch = [b.tolist() for b in sampler.global_batches()]
    other_seed = [b.tolist() for b in TopicBatches(labels, 5, seed=10).global_batches(epoch=2)]
    assert next_epoch != same and other_seed != same
    check_epoch([np.array(b) for b in next_epoch], labels, 5)


def test_topic_batches_drop_last_drops_only_leftovers():
    labels = np.array([0] * 10 + [1] * 7)
    sampler = TopicBatches(labels, batch_size=4, seed=0, drop_last=True)
    batches = sampler.global_batches()
    assert [len(batch) for batch in batches] == [4, 4, 4] and len(sampler) == 3
    assert all(len(set(labels[batch].tolist())) == 1 for batch in batches)


def test_topic_batches_order_follows_cluster_size():
    """The big topic (90% of rows) should own about 90% of the first half of an epoch's batches,
    not be bunched at one end; averaged over 20 epochs the share is close to its row share."""
    labels = np.array([0] * 900 + [1] * 100)
    sampler = TopicBatches(labels, batch_size=10, seed=4)
    first_half = Counter()
    for epoch in range(20):
        batches = sampler.global_batches(epoch)
        first_half.update(int(labels[batch[0]]) for batch in batches[: len(batches) // 2])
    share = first_half[0] / sum(first_half.values())
    assert 0.85 < share < 0.95


def test_topic_batches_shard_global_batches_across_ranks():
    # sizes 9 and 5, batch 4, 2 replicas: cluster 0 -> 4, 4, leftover 1 (< 2 ranks) merged -> 4, 5;
    # cluster 1 -> 4, leftover 1 merged -> 5. So 3 global batches, every rank gets rows of each.
    labels = np.array([0] * 9 + [1] * 5)
    ranks = [TopicBatches(labels, 4, seed=1, num_replicas=2, rank=rank) for rank in range(2)]
    global_batches = ranks[0].global_batches()
    assert sorted(len(batch) for batch in global_batches) == [4, 5, 5] and len(ranks[0]) == 3
    per_rank = [list(sampler) for sampler in ranks]
    for step, batch in enumerate(global_batches):
        pieces = [per_rank[rank][step] for rank in range(2)]
        assert all(pieces) and sorted(pieces[0] + pieces[1]) == sorted(batch.tolist())
    check_epoch(global_batches, labels, 4 + 1)


def test_topic_batches_bad_arguments():
    with pytest.raises(ValueError, match="1-D integer"):
        TopicBatches(np.array([0.5, 1.0]), 2)
    with pytest.raises(ValueError, match="batch_size"):
        TopicBatches([0, 1], 0)
    with pytest.raises(ValueError, match="rank"):
        TopicBatches([0, 1], 2, num_replicas=2, rank=2)


def _row_batches(topics: list[int], size: int):
    """The stream a worker's shard yields: numpy batches with a ragged list column, like Ray Data."""
    for start in range(0, len(topics), size):
        part = list(range(start, min(start + size, len(topics))))
        tokens = np.empty(len(part), dtype=object)
        tokens[:] = [np.arange(i % 5 + 1) for i in part]
        yield {"row": np.asarray(part), "topic": np.asarray([topics[i] for i in part]), "ids": tokens}


def test_regrouper_emits_one_topic_batches_then_mixed_leftovers_and_keeps_every_full_batch():
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 3, size=53).tolist()
    regrouper = TopicRegrouper(_row_batches(topics, 7), batch_size=4)
    batches = list(regrouper)
    assert len(batches) == 53 // 4  # as many as a drop_last iterator: the steps per epoch do not change
    assert all(len(b["row"]) == 4 for b in batches)
    pure = [b for b in batches if len(set(b["topic"].tolist())) == 1]
    assert len(pure) == regrouper.pure_batches and regrouper.pure_batches + regrouper.mixed_batches == len(batches)
    assert all(len(set(b["topic"].tolist())) == 1 for b in batches[: len(pure)])  # the mixed ones come last
    # at most 3 topics x 3 leftover rows can end up mixed: one or two mixed batches, the rest pure
    assert regrouper.mixed_batches <= 2 and regrouper.pure_share == len(pure) / len(batches)
    rows = [r for b in batches for r in b["row"].tolist()]
    assert len(rows) == len(set(rows)) == 52  # no row twice; only 53 - 52 = 1 row left over
    for b in batches:  # rows keep their own values across columns, ragged lists intact
        for row, topic, ids in zip(b["row"].tolist(), b["topic"].tolist(), b["ids"], strict=True):
            assert topic == topics[row] and ids.tolist() == list(range(row % 5 + 1))


def test_regrouper_names_a_missing_topic_column():
    with pytest.raises(KeyError, match="'topic' column"):
        list(TopicRegrouper(iter([{"row": np.arange(3)}]), batch_size=2))


def test_with_topics_names_queries_without_a_topic():
    import pyarrow as pa
    from whetstone.data.stream import with_topics

    table = pa.table({"query_id": ["a", "b"], "query": ["x", "y"]})
    assert with_topics(table, {"a": 1, "b": 0}).column("topic").to_pylist() == [1, 0]
    with pytest.raises(KeyError, match=r"1 queries have no topic, e\.g\. \['b'\]"):
        with_topics(table, {"a": 1})
