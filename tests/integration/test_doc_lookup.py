"""Document texts from the partition actors (``whetstone.data.doc_lookup``) on a local Ray."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from whetstone.data.doc_lookup import DocLookup, partition_of, start_doc_lookup
from whetstone.data.stream import DocStore
from whetstone.index.snapshot import shard_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from whetstone.data.ingest import ingest_beir
    from whetstone.datasets import path

    root = str(tmp_path_factory.mktemp("lookup") / "scifact")
    ingest_beir(str(path("scifact-subset")), root, rows_per_shard=700)  # several corpus shards
    return root


def test_partitions_hold_the_corpus_once_and_answer_like_the_docstore(ray_cluster, store):
    whole = DocStore.load(store)
    lookup = start_doc_lookup(store, None, partitions=3)
    assert len(lookup) == len(whole) and sum(lookup.sizes) == len(whole) and min(lookup.sizes) > 0
    ids = whole.ids
    assert sorted(lookup) == sorted(ids)  # every id in exactly one partition
    np.testing.assert_array_equal(partition_of(ids, 3), shard_of(ids, 3))  # the index shards' hash
    picked = [ids[i] for i in np.random.default_rng(0).choice(len(ids), size=50, replace=False)] + [ids[0]] * 2
    assert lookup.texts(picked) == whole.texts(picked)  # order kept, repeats answered
    assert lookup.texts([]) == []
    # Each partition holds its share, not the corpus: together about one corpus.
    held = lookup.memory_bytes()
    assert max(held) < 0.6 * sum(held) and sum(held) < 1.5 * whole.table.nbytes + 16 * len(whole)
    # Picklable (a Train worker or Ray Data task gets handles and sizes only) and usable there.
    clone = pickle.loads(pickle.dumps(lookup))
    assert isinstance(clone, DocLookup) and clone.texts(picked[:3]) == whole.texts(picked[:3])

    @ray_cluster.remote(num_cpus=0.1)
    def in_worker(docs, wanted):
        return docs.texts(wanted), docs[0] in set(docs)

    texts, first_is_an_id = ray_cluster.get(in_worker.remote(lookup, picked[:5]))
    assert texts == whole.texts(picked[:5]) and first_is_an_id
    with pytest.raises(KeyError, match="'no-such-doc' is not in the corpus"):
        lookup.texts([ids[1], "no-such-doc"])
    rng = np.random.default_rng(3)
    sample = lookup.sample_ids(20, rng, exclude=set(ids[:100]))
    assert len(set(sample)) == 20 and not set(sample) & set(ids[:100]) and set(sample) <= set(ids)
    # Mining's random fill draws from the lookup in batches (sample_ids), not one actor call per id.
    from whetstone.index.mining import _random_ids

    banned = set(ids[:50])
    fill = _random_ids(lookup, 7, np.random.default_rng(4), banned)
    assert len(set(fill)) == 7 and not set(fill) & banned and set(fill) <= set(ids)
