"""Ray Data ingest equals the in-process ingest; preference triples and pairs stream per epoch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from whetstone.data import schemas as S
from whetstone.data.ingest import ingest
from whetstone.data.store import read_dataset_table, read_manifest
from whetstone.data.stream import (
    collate_pairs,
    count_training_rows,
    pairs_dataset,
    preference_dataset,
    tokenize_pairs,
)

pytestmark = pytest.mark.integration


def _messy_corpus(folder: Path, files: int = 4, rows: int = 50) -> int:
    """``files`` shards alternating JSONL and Parquet, each with a few defects; returns the record count."""
    folder.mkdir(parents=True)
    total = 0
    for f in range(files):
        records = [{"_id": f"d{f}-{i}", "text": f"text {f} {i}"} for i in range(rows)]
        records[3]["text"] = ""                      # empty text
        records[7]["_id"] = f"d{max(f - 1, 0)}-1"    # duplicate (of the previous shard when f > 0)
        if f % 2 == 0:
            lines = [json.dumps(r) for r in records]
            lines[9] = lines[9][:15]                 # a truncated line
            (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            pq.write_table(pa.Table.from_pylist(records), folder / f"part-{f}.parquet")
        total += rows
    (folder / f"part-{files}.parquet").write_bytes(b"not parquet at all")
    return total + 1


def _quarantine(store: Path) -> list[str]:
    return [line for part in sorted(store.glob("quarantine/**/*.jsonl")) for line in part.read_text().splitlines()]


def test_ray_engine_writes_the_same_store_as_the_local_engine(ray_cluster, tmp_path, capsys):
    source = tmp_path / "src"
    records = _messy_corpus(source)
    local = ingest(str(source), str(tmp_path / "local"), "corpus", rows_per_shard=64, engine="local")
    capsys.readouterr()
    remote = ingest(str(source), str(tmp_path / "ray"), "corpus", rows_per_shard=64, engine="ray", chunk_rows=16,
                    progress_every_s=0)
    # The staged tables arrive at the driver, which counts them: a line per table (interval 0) with the
    # rows, shards and quarantined so far, then the totals.
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[ingest] corpus: ")]
    assert len(out) >= 3 and all(" rows/s), " in line for line in out)
    assert out[-1].startswith(f"[ingest] corpus: done, {records:,} rows in ")
    assert out[-1].endswith(f", {remote.datasets['corpus'].rows_written} written in "
                            f"{len(read_manifest(str(tmp_path / 'ray')).datasets['corpus'].shards)} shards, "
                            f"{remote.datasets['corpus'].rows_quarantined} quarantined")
    assert remote.engine == "ray" and local.engine == "local"
    assert remote.datasets == local.datasets
    counts = remote.datasets["corpus"]
    assert counts.rows_in == records and counts.rows_in == counts.rows_written + counts.rows_quarantined
    # Per shard file: an empty text, a duplicate (but shard 0's own "duplicate" is of itself: d0-1
    # appears at rows 1 and 7), and a truncated line in the JSONL ones; plus the corrupt file.
    assert counts.rows_quarantined == 4 * 2 + 2 + 1
    manifest_local, manifest_ray = read_manifest(str(tmp_path / "local")), read_manifest(str(tmp_path / "ray"))
    assert [s.sha256 for s in manifest_ray.datasets["corpus"].shards] == \
        [s.sha256 for s in manifest_local.datasets["corpus"].shards]
    assert _quarantine(tmp_path / "ray") == _quarantine(tmp_path / "local")
    assert remote.failed_files == {"corpus": [str(source / "part-4.parquet")]}


def test_preference_dataset_reshuffles_each_epoch_and_repeats_per_seed(ray_cluster, shared_data, tmp_path):
    source = shared_data / "preference" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
    store = str(tmp_path / "store")
    ingest(str(source), store, "hh-rlhf", dataset_name="preference/test", rows_per_shard=600)
    table = read_dataset_table(store, "preference/test")
    expected = {r[S.PAIR_ID]: r for r in table.to_pylist()}

    def epochs(ds, n=2):
        out = []
        for _ in range(n):
            order = []
            for batch in ds.iter_batches(batch_size=500, batch_format="pyarrow"):
                assert batch.column_names == S.PREFERENCE_SCHEMA.names
                for row in batch.slice(0, 3).to_pylist():  # spot-check content against the shards
                    assert row == expected[row[S.PAIR_ID]]
                order.extend(batch.column(S.PAIR_ID).to_pylist())
            out.append(order)
        return out

    first = epochs(preference_dataset(store, "test", seed=3))
    again = epochs(preference_dataset(store, "preference/test", seed=3))
    assert sorted(first[0]) == sorted(first[1]) == sorted(expected)  # every triple once per epoch
    assert first[0] != first[1]  # reshuffled per epoch
    assert first == again  # the sequence of orders repeats for a seed
    with pytest.raises(KeyError, match="preference/dev"):
        preference_dataset(store, "dev")


def test_epoch_first_batch_latency_and_multi_positive_queries(ray_cluster, tmp_path, minilm_dir):
    """Multi-positive queries: each epoch picks one labelled positive per query. Prints the
    first-batch latency of each epoch (the tokenizer is cached per worker process, not per epoch)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) for i in range(60)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"query_id": f"q{i}", "query": f"query {i}",
                                           "positive_ids": [f"d{i}", f"d{i + 20}", f"d{i + 40}"]})
                               for i in range(20)))
    store = str(tmp_path / "store")
    ingest(str(corpus), store, "corpus")
    ingest(str(pairs), store, "pairs")
    ds = tokenize_pairs(pairs_dataset(store, "train", seed=5), str(minilm_dir), 16, 16)
    iterator = ds.iterator()
    picked: dict[str, set[str]] = {}
    latencies = []
    for _ in range(3):
        started = time.perf_counter()
        first = None
        rows = 0
        for batch in iterator.iter_batches(batch_size=8, batch_format="numpy"):
            first = first if first is not None else time.perf_counter() - started
            out = collate_pairs(batch)
            for qid, pid, positives in zip(out[S.QUERY_ID], out[S.POSITIVE_ID], out[S.POSITIVE_IDS], strict=True):
                assert pid in positives and len(positives) == 3
                picked.setdefault(qid, set()).add(pid)
            rows += len(out[S.QUERY_ID])
        assert rows == 20
        latencies.append(round(first, 2))
    print(f"first-batch latency per epoch (s): {latencies}")
    assert any(len(p) > 1 for p in picked.values())  # the positive choice changes between epochs

    # positives="all" (the decoupled softmax): every (query, positive) pair once per epoch.
    assert count_training_rows(store, "train", positives="all") == 60
    assert count_training_rows(store, "train") == 20
    seen: list[tuple[str, str]] = []
    for batch in pairs_dataset(store, "train", seed=5, positives="all").iter_batches(batch_size=16,
                                                                                      batch_format="numpy"):
        seen += list(zip(batch[S.QUERY_ID], batch[S.POSITIVE_ID], strict=True))
        assert all(len(p) == 3 for p in batch[S.POSITIVE_IDS])
    assert sorted(seen) == sorted((f"q{i}", f"d{i + k}") for i in range(20) for k in (0, 20, 40))
