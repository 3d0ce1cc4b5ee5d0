"""pairs_dataset -> tokenize_pairs -> collate_pairs on a local Ray, as a Train worker would use it."""

from __future__ import annotations

import json

import pytest
from whetstone.data import schemas as S
from whetstone.data.ingest import ingest_beir
from whetstone.data.stream import collate_pairs, pairs_dataset, read_dataset_table, tokenize_pairs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(shared_data, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("stream-store")
    ingest_beir(str(shared_data / "retrieval" / "scifact-subset"), str(dest), rows_per_shard=60)
    return str(dest)


@pytest.fixture(scope="module")
def corpus_texts(shared_data) -> dict[str, str]:
    path = shared_data / "retrieval" / "scifact-subset" / "corpus.jsonl"
    docs = [json.loads(line) for line in path.open()]
    return {d["_id"]: S.document_text(d["title"], d["text"]) for d in docs}


def test_padded_batches_with_positive_text_from_the_corpus(ray_cluster, store, corpus_texts, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    pairs = {p[S.QUERY_ID]: p for p in read_dataset_table(store, "pairs/train").to_pylist()}
    ds = tokenize_pairs(pairs_dataset(store, "train", seed=7), str(minilm_dir), query_max_length=24,
                        doc_max_length=48)
    iterator = ds.iterator()  # the same DataIterator API that ray.train.get_dataset_shard returns
    epoch_orders = []
    for epoch in range(2):
        order = []
        # As the training loop consumes it: a seeded local shuffle buffer per epoch.
        for batch in iterator.iter_batches(batch_size=32, batch_format="numpy", prefetch_batches=2,
                                           local_shuffle_buffer_size=256, local_shuffle_seed=epoch):
            assert S.NEGATIVE_IDS not in batch  # scifact pairs carry no static negatives
            for qid, pid, text in zip(batch[S.QUERY_ID], batch[S.POSITIVE_ID], batch[S.POSITIVE_TEXT], strict=True):
                assert pid in pairs[qid][S.POSITIVE_IDS]
                assert text == corpus_texts[pid]
            out = collate_pairs(batch, pad_token_id=tokenizer.pad_token_id)
            q_ids, q_mask = out["query_input_ids"], out["query_attention_mask"]
            assert q_ids.shape == q_mask.shape and q_ids.shape[0] == len(out["query_id"])
            assert out["positive_input_ids"].shape[1] <= 48 and q_ids.shape[1] <= 24
            assert q_mask.sum(dim=1).max() == q_ids.shape[1]  # padded to the longest, not to max_length
            first = out["positive_input_ids"][0, : int(out["positive_attention_mask"][0].sum())].tolist()
            expected = tokenizer(corpus_texts[out["positive_id"][0]], truncation=True, max_length=48)["input_ids"]
            assert first == expected
            assert out["query_id"][0] == batch[S.QUERY_ID][0]
            assert all(out["positive_id"][i] in ids for i, ids in enumerate(out["positive_ids"]))
            order.extend(out["query_id"])
        epoch_orders.append(order)
    assert sorted(epoch_orders[0]) == sorted(epoch_orders[1]) == sorted(pairs)  # every pair, once per epoch
    assert epoch_orders[0] != epoch_orders[1]  # reshuffled per epoch


def test_negatives_per_query_tops_up_with_non_positive_documents(ray_cluster, store, corpus_texts, minilm_dir):
    ds = tokenize_pairs(pairs_dataset(store, "test", seed=1, negatives_per_query=3), str(minilm_dir), 16, 32)
    rows = 0
    for batch in ds.iter_batches(batch_size=40, batch_format="numpy"):
        out = collate_pairs(batch)
        size = len(out["query_id"])
        assert out["negatives_per_query"] == 3
        assert out["negative_input_ids"].shape[0] == 3 * size
        for positives, negatives, texts in zip(out[S.POSITIVE_IDS], out[S.NEGATIVE_IDS], batch[S.NEGATIVE_TEXTS],
                                               strict=True):
            assert len(set(negatives)) == 3 and not set(negatives) & set(positives)
            assert list(texts) == [corpus_texts[n] for n in negatives]
        rows += size
    assert rows == 77
