"""BEIR ingest into a local store: counts against the source, checksums, gz, quarantine."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from whetstone.data import schemas as S
from whetstone.data.ingest import IngestError, ingest_beir
from whetstone.data.sources import SourceError
from whetstone.data.store import DataIntegrityError, read_manifest
from whetstone.data.stream import DocStore, load_eval_split, read_dataset_table


def _source_qrels(path: Path) -> list[list[str]]:
    """Data rows of a qrels TSV read independently of the ingest code (header: non-numeric score)."""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return rows[1:] if not rows[0][2].strip().isdigit() else rows


@pytest.fixture(scope="module")
def scifact(shared_data) -> Path:
    return shared_data / "retrieval" / "scifact-subset"


@pytest.fixture(scope="module")
def scifact_store(scifact, tmp_path_factory):
    dest = tmp_path_factory.mktemp("scifact-store")
    return dest, ingest_beir(str(scifact), str(dest), rows_per_shard=700)


def test_scifact_counts_match_the_source(scifact, scifact_store):
    dest, report = scifact_store
    assert report.datasets["corpus"].rows_written == 2101
    assert report.datasets["queries"].rows_written == 265
    for split, rows, queries in (("train", 194, 188), ("test", 78, 77)):
        source_rows = _source_qrels(scifact / "qrels" / f"{split}.tsv")
        assert len(source_rows) == rows
        assert report.datasets[f"qrels/{split}"].rows_written == rows
        assert report.datasets[f"pairs/{split}"].rows_written == len({r[0] for r in source_rows}) == queries
    assert report.rows_quarantined == 0
    manifest = read_manifest(str(dest))
    assert manifest.total_rows == sum(c.rows_written for c in report.datasets.values())
    assert [s.rows for s in manifest.datasets["corpus"].shards] == [700, 700, 700, 1]
    assert json.loads(report.model_dump_json())["manifest_uri"].endswith("manifest.json")


def test_manifest_checksums_and_schema_match_the_shards(scifact_store):
    dest, _ = scifact_store
    manifest = read_manifest(str(dest))
    for name, entry in manifest.datasets.items():
        assert [f.name for f in entry.schema_fields] == S.schema_for(name).names
        for shard in entry.shards:
            data = (dest / shard.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256
            assert len(data) == shard.bytes
            assert pq.read_metadata(dest / shard.path).num_rows == shard.rows


def test_pairs_hold_every_positive_of_each_query(scifact, scifact_store):
    dest, _ = scifact_store
    expected: dict[str, list[str]] = {}
    for query_id, doc_id, score in _source_qrels(scifact / "qrels" / "train.tsv"):
        if int(score) > 0:
            expected.setdefault(query_id, []).append(doc_id)
    pairs = read_dataset_table(str(dest), "pairs/train").to_pylist()
    assert {p[S.QUERY_ID]: p[S.POSITIVE_IDS] for p in pairs} == expected
    queries = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (scifact / "queries.jsonl").open()}
    assert all(p[S.QUERY] == queries[p[S.QUERY_ID]] for p in pairs)
    assert max(len(p[S.POSITIVE_IDS]) for p in pairs) > 1  # scifact has multi-positive queries


def test_gzip_source_gives_the_same_store(scifact, scifact_store, tmp_path):
    source = tmp_path / "gz-source"
    (source / "qrels").mkdir(parents=True)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        with gzip.open(source / f"{rel}.gz", "wb") as out:
            out.write((scifact / rel).read_bytes())
    report = ingest_beir(str(source), str(tmp_path / "store"), rows_per_shard=700)
    dest, plain = scifact_store
    assert report.datasets == plain.datasets
    for name in ("corpus", "pairs/train", "qrels/test"):
        assert read_dataset_table(str(tmp_path / "store"), name).equals(read_dataset_table(str(dest), name))


def test_headerless_graded_qrels(shared_data, tmp_path):
    source = shared_data / "retrieval" / "msmarco-dl19-subset"
    report = ingest_beir(str(source), str(tmp_path / "store"))
    rows = _source_qrels(source / "qrels" / "test.tsv")
    assert report.datasets["qrels/test"].rows_written == len(rows)  # the first line is data, not a header
    eval_split = load_eval_split(str(tmp_path / "store"), "test")
    assert len(eval_split.queries) == len({r[0] for r in rows}) == 43
    assert sorted(int(s) for _, _, s in rows) == sorted(v for q in eval_split.qrels.values() for v in q.values())
    assert max(int(s) for _, _, s in rows) > 1  # graded, and the grades survive
    positives = {r[0] for r in rows if int(r[2]) > 0}
    assert report.datasets["pairs/test"].rows_written == len(positives)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def malformed_source(tmp_path) -> Path:
    source = tmp_path / "bad"
    _write_lines(source / "corpus.jsonl", [
        '{"_id": "d1", "title": "T", "text": "first doc"}',
        '{"_id": "d2", "text": "second doc"}',
        '{"_id": "d1", "text": "duplicate id"}',          # line 3: duplicate
        '{"_id": "d3", "text": ""}',                       # line 4: empty text
        '',                                                # blank: not a row
        '{"_id": 4, "text": "int id"}',                    # line 6: wrong type
        '{"title": "no id", "text": "x"}',                 # line 7: missing field
        '{"_id": "d5", "text": "ok"}',
        '{"_id": "d6", "text": "truncat',                  # line 9: truncated JSON
    ])
    _write_lines(source / "queries.jsonl", [
        '{"_id": "q1", "text": "query one"}',
        '{"_id": "q2", "text": "query two"}',
        '{"_id": "q3"}',                                   # line 3: missing text
    ])
    _write_lines(source / "qrels" / "train.tsv", [
        "query-id\tcorpus-id\tscore",
        "q1\td1\t1",
        "q1\td5\t1",
        "q2\td2\t0",
        "q2\td404\t1",                                     # line 5: unknown doc
        "q3\td1\t1",                                       # line 6: query was quarantined
        "q1\td1\t1",                                       # line 7: duplicate pair
        "q2\td5\tone",                                     # line 8: bad score
    ])
    return source


def test_malformed_rows_land_in_quarantine_with_file_and_line(malformed_source, tmp_path):
    dest = tmp_path / "store"
    report = ingest_beir(str(malformed_source), str(dest))
    counts = report.datasets
    assert (counts["corpus"].rows_in, counts["corpus"].rows_written, counts["corpus"].rows_quarantined) == (8, 3, 5)
    assert (counts["queries"].rows_in, counts["queries"].rows_quarantined) == (3, 1)
    assert (counts["qrels/train"].rows_in, counts["qrels/train"].rows_written) == (7, 3)
    for c in counts.values():
        assert c.rows_in == c.rows_written + c.rows_quarantined
    records = [json.loads(line) for f in report.quarantine_files["corpus"] for line in Path(f).open()]
    by_line = {r["line"]: r for r in records}
    assert sorted(by_line) == [3, 4, 6, 7, 9]
    assert all(r["file"] == str(malformed_source / "corpus.jsonl") for r in records)
    assert "duplicate doc_id 'd1' (first at line 1)" in by_line[3]["reason"]
    assert "field 'text' is empty" in by_line[4]["reason"]
    assert "field '_id' must be a string, got int" in by_line[6]["reason"]
    assert "missing field '_id'" in by_line[7]["reason"]
    assert "truncated" in by_line[9]["reason"] and by_line[9]["raw"] == '{"_id": "d6", "text": "truncat'
    qrels_q = {json.loads(line)["line"]: json.loads(line)["reason"]
               for f in report.quarantine_files["qrels/train"] for line in Path(f).open()}
    assert sorted(qrels_q) == [5, 6, 7, 8]
    assert "corpus-id 'd404'" in qrels_q[5] and "query-id 'q3'" in qrels_q[6]
    assert "duplicate qrels pair" in qrels_q[7] and "'score' must be an integer" in qrels_q[8]
    pairs = read_dataset_table(str(dest), "pairs/train").to_pylist()
    assert [(p[S.QUERY_ID], p[S.POSITIVE_IDS]) for p in pairs] == [("q1", ["d1", "d5"])]  # q2 has no positive
    assert read_manifest(str(dest)).quarantine["corpus"].rows == 5


def test_reingest_replaces_the_store_and_refuses_foreign_folders(malformed_source, tmp_path):
    dest = tmp_path / "store"
    ingest_beir(str(malformed_source), str(dest), rows_per_shard=1)
    assert len(list((dest / "corpus").rglob("*.parquet"))) == 3
    ingest_beir(str(malformed_source), str(dest), rows_per_shard=100)
    assert len(list((dest / "corpus").rglob("*.parquet"))) == 1  # no stale shards survive
    assert not (dest / "INGESTING").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match="not empty and holds no manifest.json"):
        ingest_beir(str(malformed_source), str(foreign))


def test_missing_and_ambiguous_sources_are_named(malformed_source, tmp_path):
    with pytest.raises(IngestError, match=r"no qrels for split\(s\) \['dev'\]"):
        ingest_beir(str(malformed_source), str(tmp_path / "s1"), splits=["dev"])
    shutil.copy(malformed_source / "corpus.jsonl", tmp_path / "c.gz")
    with gzip.open(malformed_source / "corpus.jsonl.gz", "wb") as out:
        out.write(b"{}")
    with pytest.raises(SourceError, match="corpus.jsonl and .*corpus.jsonl.gz exist"):
        ingest_beir(str(malformed_source), str(tmp_path / "s2"))
    (malformed_source / "corpus.jsonl").unlink()
    (malformed_source / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"_id": "a", "text": "b"}\n' * 50)[:-20])
    with pytest.raises(SourceError, match=r"corpus.jsonl.gz: gzip stream ends early .*line \d+ is incomplete"):
        ingest_beir(str(malformed_source), str(tmp_path / "s3"))


def test_tampered_shard_is_detected(scifact_store, tmp_path):
    dest, _ = scifact_store
    copy = tmp_path / "copy"
    shutil.copytree(dest, copy)
    (shard,) = (copy / "queries").rglob("part-00000.parquet")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match="queries/.*part-00000.parquet: sha256"):
        read_dataset_table(str(copy), "queries")
    with pytest.raises(DataIntegrityError, match="manifest.json does not exist"):
        read_dataset_table(str(tmp_path / "nowhere"), "queries")


def test_docstore_resolves_ids_to_document_text(scifact, scifact_store):
    dest, _ = scifact_store
    docs = DocStore.load(str(dest))
    source = [json.loads(line) for line in (scifact / "corpus.jsonl").open()]
    assert len(docs) == len(source) and docs.ids[:3] == [d["_id"] for d in source[:3]]
    picked = [source[5], source[1000], source[2100]]
    assert docs.texts([d["_id"] for d in picked]) == [S.document_text(d["title"], d["text"]) for d in picked]
    with pytest.raises(KeyError, match="document id 'nope' is not in the corpus"):
        docs.texts(["nope"])
    import numpy as np

    exclude = set(docs.ids[:2000])
    sampled = docs.sample_ids(50, np.random.default_rng(0), exclude)
    assert len(set(sampled)) == 50 and not set(sampled) & exclude
    assert sampled == docs.sample_ids(50, np.random.default_rng(0), exclude)
    with pytest.raises(ValueError, match="only 101 remain"):
        docs.sample_ids(102, np.random.default_rng(0), exclude)


def _kill_when(args: list[str], ready, timeout_s: float = 120.0) -> None:
    """Run ``python -c <args>`` as its own process and kill -9 it once ``ready()`` holds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the ingest ended ({proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_killed_reingest_leaves_the_old_store_readable_and_a_rerun_completes(tmp_path):
    """kill -9 of an ingest once it has written new shards over an existing store: the old
    manifest and every shard it names are intact (checksums verified on read); the rerun
    completes and removes the dead ingest's files. A killed first ingest is resumed by a rerun
    (the INGESTING marker), not refused as a foreign folder."""
    import json

    rows = 150_000
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"text of document {i} " * 6}) + "\n"
                              for i in range(rows)))
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"_id": f"s{i}", "text": f"old document {i}"}) + "\n" for i in range(50)))
    store = tmp_path / "store"
    code = ("from whetstone.data.ingest_files import ingest_records; "
            "ingest_records({src!r}, {dest!r}, 'corpus', rows_per_shard=5000, engine='local', chunk_rows=2000)")

    # a first ingest killed mid-way, then rerun: no refusal, a complete store
    _kill_when([code.format(src=str(source), dest=str(store))], lambda: len(list(store.rglob("*.parquet"))) >= 2)
    assert (store / "INGESTING").exists() and not (store / "manifest.json").exists()
    from whetstone.data.ingest_files import ingest_records

    ingest_records(str(small), str(store), "corpus", engine="local")
    assert read_dataset_table(str(store), "corpus").column(S.DOC_ID).to_pylist() == [f"s{i}" for i in range(50)]
    assert len(list(store.rglob("*.parquet"))) == 1 and not (store / "INGESTING").exists()

    # a re-ingest over that store killed once it has written new shards: the old dataset stays readable
    _kill_when([code.format(src=str(source), dest=str(store))], lambda: len(list(store.rglob("*.parquet"))) >= 3)
    assert read_dataset_table(str(store), "corpus").column(S.DOC_ID).to_pylist() == [f"s{i}" for i in range(50)]
    report = ingest_records(str(source), str(store), "corpus", rows_per_shard=50_000, engine="local")
    assert report.datasets["corpus"].rows_written == rows
    table = read_dataset_table(str(store), "corpus")
    assert table.num_rows == rows and table.column(S.DOC_ID).to_pylist()[-1] == f"d{rows - 1}"
    assert len(list(store.rglob("*.parquet"))) == 3  # the dead ingest's shards and the old ones are gone


def _progress(out: str, dataset: str) -> tuple[list[tuple[int, int, int]], str]:
    """The ``[ingest] <dataset>:`` lines of a job's output: the periodic ones as (rows, shards,
    quarantined), and the closing one."""
    import re

    periodic, final = [], None
    for line in out.splitlines():
        match = re.fullmatch(rf"\[ingest\] {re.escape(dataset)}: ([\d,]+) rows \([\d,.]+ rows/s\), "
                             r"([\d,]+) shards?, ([\d,]+) quarantined", line)
        if match:
            periodic.append(tuple(int(group.replace(",", "")) for group in match.groups()))
        elif line.startswith(f"[ingest] {dataset}: done, "):
            assert final is None, f"two closing lines for {dataset}"
            final = line
    assert final is not None, f"no closing line for {dataset} in:\n{out}"
    return periodic, final


def test_the_ingest_job_prints_progress_with_rates_and_the_totals(scifact, malformed_source, tmp_path, capsys):
    """A small interval (progress_every_s) so the 2,101-row corpus gets periodic lines; the closing
    line's counts are the report's, which test_scifact_counts_match_the_source checks against the source."""
    from jobs.ingest import main

    report = main([f"source={scifact}", f"store_uri={tmp_path / 'store'}", "rows_per_shard=700",
                   "progress_every_s=0.002"])
    out = capsys.readouterr().out
    corpus = report["datasets"]["corpus"]
    assert corpus["rows_in"] == 2101
    periodic, final = _progress(out, "corpus")
    assert periodic, f"no periodic corpus line in:\n{out}"
    rows = [r for r, _, _ in periodic]
    assert rows == sorted(rows) and rows[-1] <= 2101 and all(q == 0 for _, _, q in periodic)
    assert all(shards == r // 700 for r, shards, _ in periodic)  # shards written so far, 700 rows each
    assert final.startswith("[ingest] corpus: done, 2,101 rows in ") and " rows/s), " in final
    assert final.endswith(", 2,101 written in 4 shards, 0 quarantined")
    for name, counts in report["datasets"].items():  # every dataset closes with its own totals
        assert _progress(out, name)[1].endswith(f", {counts['rows_written']:,} written in "
                                                f"{len(read_manifest(str(tmp_path / 'store')).datasets[name].shards)} "
                                                f"shard{'s' if name == 'corpus' else ''}, "
                                                f"{counts['rows_quarantined']:,} quarantined")

    main([f"source={malformed_source}", f"store_uri={tmp_path / 'bad-store'}", "progress_every_s=0"])
    _, final = _progress(capsys.readouterr().out, "corpus")
    assert final.startswith("[ingest] corpus: done, 8 rows in ") and final.endswith(", 3 written in 1 shard, "
                                                                                     "5 quarantined")
