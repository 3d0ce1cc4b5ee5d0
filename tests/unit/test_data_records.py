"""Record-format ingest (corpus / pairs / preference / hh-rlhf from JSONL, JSONL.gz, Parquet), no Ray.

The malformed source below has one defect per kind the issue names; each test counts the source
records independently of the ingest code (lines written, Parquet rows) and checks that every one
is either in a shard or in quarantine with its file and line/row.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from whetstone.data import schemas as S
from whetstone.data.ingest import IngestError, ingest
from whetstone.data.records import list_source_files, stage_file
from whetstone.data.sources import SourceError
from whetstone.data.store import ShardWriter, read_dataset_table, read_manifest


def _quarantine(store: Path, dataset: str) -> list[dict]:
    return [json.loads(line) for part in sorted((store / "quarantine" / dataset).rglob("*.jsonl"))
            for line in part.read_text().splitlines()]


def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def corpus_source(tmp_path) -> Path:
    """Three shards: JSONL with bad lines and a truncated last line, Parquet with a bad row, a
    corrupt Parquet file. 13 records in all (6 + 6 + 1 whole-file), 6 good."""
    src = tmp_path / "corpus-src"
    _write_jsonl(src / "a.jsonl", [
        json.dumps({"_id": "d1", "title": "T1", "text": "first"}),          # 1 ok
        json.dumps({"id": "d2", "text": "second", "metadata": {"k": 1}}),  # 2 ok (id alias)
        json.dumps({"_id": "d3"}),                                          # 3 missing text
        "",                                                                 # 4 blank: not a row
        json.dumps({"_id": "d4", "text": 42}),                              # 5 wrong type
        json.dumps({"_id": "d1", "text": "again"}),                         # 6 duplicate id
        '{"_id": "d5", "text": "cut',                                       # 7 truncated JSON
    ])
    table = pa.table({"id": ["p1", "p2", "p3", "d2", "p5", "p6"],
                      "title": ["a", None, "c", "d", "e", "f"],
                      "text": ["one", "two", "   ", "dup of a.jsonl", "five", "six"]})
    pq.write_table(table, src / "b.parquet")  # row 3 empty text, row 4 duplicates a.jsonl line 2
    (src / "c.parquet").write_bytes(b"PAR1" + b"\x00" * 64)  # corrupt: no footer
    return src


def test_malformed_corpus_is_quarantined_naming_file_and_position(corpus_source, tmp_path):
    store = tmp_path / "store"
    report = ingest(str(corpus_source), str(store), "corpus", rows_per_shard=3, engine="local")
    counts = report.datasets["corpus"]
    jsonl_rows = sum(1 for line in (corpus_source / "a.jsonl").read_text().splitlines() if line.strip())
    parquet_rows = pq.read_metadata(corpus_source / "b.parquet").num_rows
    assert counts.rows_in == jsonl_rows + parquet_rows + 1 == 13  # + 1: the corrupt file as a whole
    assert counts.rows_written == 6 and counts.rows_quarantined == 7
    assert counts.rows_in == counts.rows_written + counts.rows_quarantined

    a, b, c = (str(corpus_source / name) for name in ("a.jsonl", "b.parquet", "c.parquet"))
    got = {(q["file"], q.get("line", q.get("row"))): q["reason"] for q in _quarantine(store, "corpus")}
    assert set(got) == {(a, 3), (a, 5), (a, 6), (a, 7), (b, 3), (b, 4), (c, 0)}
    assert "missing field 'text'" in got[(a, 3)]
    assert "'text' must be a string, got int" in got[(a, 5)]
    assert "duplicate doc_id 'd1' (first at line 1)" in got[(a, 6)]
    assert "not valid JSON" in got[(a, 7)]
    assert "field 'text' is empty" in got[(b, 3)]
    assert f"duplicate doc_id 'd2' (first at line 2 of {a})" in got[(b, 4)]
    assert "not a readable Parquet file" in got[(c, 0)]
    assert report.failed_files == {"corpus": [c]}
    parquet_records = [q for q in _quarantine(store, "corpus") if q["file"] == b]
    assert all("row" in q and "line" not in q for q in parquet_records)

    table = read_dataset_table(str(store), "corpus")
    assert table.column(S.DOC_ID).to_pylist() == ["d1", "d2", "p1", "p2", "p5", "p6"]  # source order
    assert json.loads(table.filter(pa.compute.equal(table.column(S.DOC_ID), "d2"))
                      .column(S.METADATA)[0].as_py()) == {"k": 1}
    manifest = read_manifest(str(store))
    assert [s.rows for s in manifest.datasets["corpus"].shards] == [3, 3]
    assert manifest.quarantine["corpus"].rows == 7


def test_truncated_gzip_keeps_lines_before_the_break_and_counts_it(tmp_path):
    lines = [json.dumps({"_id": f"d{i}", "text": f"document {i} " * 40}) for i in range(400)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    source = tmp_path / "docs.jsonl.gz"
    source.write_bytes(data[: len(data) * 2 // 3])  # cut mid-stream, as an interrupted upload
    report = ingest(str(source), str(tmp_path / "store"), "corpus", engine="local")
    counts = report.datasets["corpus"]
    assert counts.rows_quarantined == 1 and counts.rows_written == counts.rows_in - 1
    assert 0 < counts.rows_written < 400
    (record,) = _quarantine(tmp_path / "store", "corpus")
    assert record["file"] == str(source) and record["line"] == counts.rows_written + 1
    assert "gzip stream ends early" in record["reason"]
    assert f"line {record['line']} is incomplete" in record["reason"]
    (damaged,) = report.damaged_files["corpus"]  # listed as damaged: what was read, and that the rest is lost
    assert damaged.file == str(source) and damaged.rows_read == counts.rows_written and damaged.rows_lost is None
    assert "DAMAGED" in report.summary() and "an unknown number of rows lost" in report.summary()


def test_a_corrupt_row_group_loses_only_its_rows_and_every_row_is_counted(tmp_path):
    """A 200-row Parquet file in four row groups of 50 whose third group's data is overwritten:
    the other 150 rows are written, the 50 of the broken group (their count from the footer) are
    quarantined as one record that says so, and the file is listed as damaged."""
    table = pa.table({"_id": [f"d{i}" for i in range(200)], "text": [f"document number {i} " * 20 for i in range(200)]})
    source = tmp_path / "docs.parquet"
    pq.write_table(table, source, row_group_size=50, compression="none")
    meta = pq.ParquetFile(source).metadata.row_group(2)
    start = meta.column(1).data_page_offset
    data = bytearray(source.read_bytes())
    data[start:start + 400] = b"\xff" * 400  # the third group's text page header and data
    source.write_bytes(bytes(data))

    report = ingest(str(source), str(tmp_path / "store"), "corpus", engine="local")
    counts = report.datasets["corpus"]
    assert (counts.rows_in, counts.rows_written, counts.rows_quarantined) == (200, 150, 50)
    written = read_dataset_table(str(tmp_path / "store"), "corpus").column(S.DOC_ID).to_pylist()
    assert written == [f"d{i}" for i in range(200) if not 100 <= i < 150]
    (record,) = _quarantine(tmp_path / "store", "corpus")
    assert record["row"] == 101 and record["rows_lost"] == 50 and "row group 2 (rows 101 to 150" in record["reason"]
    (damaged,) = report.damaged_files["corpus"]
    assert (damaged.file, damaged.rows_read, damaged.rows_lost) == (str(source), 150, 50)
    assert report.failed_files == {}  # read in part, not rejected whole


def test_pairs_checked_against_the_store_corpus_and_other_datasets_kept(corpus_source, tmp_path):
    store = tmp_path / "store"
    ingest(str(corpus_source), str(store), "corpus", engine="local")
    pairs_src = tmp_path / "pairs.jsonl"
    _write_jsonl(pairs_src, [
        json.dumps({"query": "what is first?", "positive_ids": ["d1"], "negative_ids": ["p2"], "score": 1}),
        json.dumps({"query_id": "q2", "query": "second?", "positive_id": "d2"}),
        json.dumps({"query_id": "q3", "query": "ghost?", "positive_ids": ["nope"]}),
        json.dumps({"query_id": "q4", "query": "bad neg", "positive_ids": ["d1"], "negative_ids": ["p3"]}),
        json.dumps({"query_id": "q2", "query": "dup", "positive_ids": ["d1"]}),
        json.dumps({"query_id": "q6", "query": "", "positive_ids": ["d1"]}),
    ])
    report = ingest(str(pairs_src), str(store), "pairs", dataset_name="pairs/dev", engine="local")
    assert report.datasets["pairs/dev"].model_dump() == {"rows_in": 6, "rows_written": 2, "rows_quarantined": 4}
    reasons = {q["line"]: q["reason"] for q in _quarantine(store, "pairs/dev")}
    assert "'nope' is not in the store's corpus" in reasons[3]
    assert "'p3' is not in the store's corpus" in reasons[4]  # p3 was quarantined from the corpus
    assert "duplicate query_id 'q2'" in reasons[5] and "'query' is empty" in reasons[6]
    rows = read_dataset_table(str(store), "pairs/dev").to_pylist()
    assert rows[0] == {S.QUERY_ID: "pairs.jsonl:1", S.QUERY: "what is first?", S.POSITIVE_IDS: ["d1"],
                       S.NEGATIVE_IDS: ["p2"], S.SCORE: 1.0}
    assert rows[1][S.POSITIVE_IDS] == ["d2"]
    manifest = read_manifest(str(store))
    assert set(manifest.datasets) == {"corpus", "pairs/dev"}  # the corpus survived the pairs ingest
    assert set(manifest.quarantine) == {"corpus", "pairs/dev"}
    assert manifest.datasets["pairs/dev"].source == str(pairs_src)

    # Re-ingesting one dataset replaces it alone, stale quarantine included.
    _write_jsonl(pairs_src, [json.dumps({"query_id": "q1", "query": "x", "positive_ids": ["d1"]})])
    ingest(str(pairs_src), str(store), "pairs", dataset_name="pairs/dev", engine="local")
    manifest = read_manifest(str(store))
    assert manifest.datasets["pairs/dev"].rows == 1 and "pairs/dev" not in manifest.quarantine
    assert not (store / "quarantine" / "pairs" / "dev").exists()
    assert manifest.datasets["corpus"].rows == 6


def test_preference_from_parquet_and_jsonl_with_time(tmp_path):
    src = tmp_path / "pref"
    src.mkdir()
    pq.write_table(pa.table({
        "prompt": ["Hi", "Hey", "Yo"], "chosen": ["a", "b", "same"], "rejected": ["x", "y", "same"],
        "time": pa.array([0, 86_400_000_000, None], pa.timestamp("us")),
    }), src / "part-0.parquet")
    _write_jsonl(src / "part-1.jsonl", [
        json.dumps({"pair_id": "j1", "prompt": "P", "chosen": "c", "rejected": "r", "time": "2024-05-01T12:00:00Z"}),
        json.dumps({"prompt": "P", "chosen": "c", "rejected": "r", "time": "yesterday"}),
    ])
    report = ingest(str(src), str(tmp_path / "store"), "preference", engine="local")
    assert report.datasets["preference/train"].model_dump() == {"rows_in": 5, "rows_written": 3,
                                                                "rows_quarantined": 2}
    rows = read_dataset_table(str(tmp_path / "store"), "preference/train").to_pylist()
    assert [r[S.PAIR_ID] for r in rows] == ["part-0.parquet:1", "part-0.parquet:2", "j1"]
    assert rows[1][S.TIME].isoformat() == "1970-01-02T00:00:00+00:00"
    assert rows[2][S.TIME].isoformat() == "2024-05-01T12:00:00+00:00"
    reasons = {(Path(q["file"]).name, q.get("row", q.get("line"))): q["reason"]
               for q in _quarantine(tmp_path / "store", "preference/train")}
    assert "identical" in reasons[("part-0.parquet", 3)]
    assert "not an ISO-8601 timestamp" in reasons[("part-1.jsonl", 2)]


def test_hh_rlhf_splits_on_ingest_and_quarantines_the_unsplittable(shared_data, tmp_path):
    from whetstone.data.hh_rlhf import split_dialogue_pair

    source = shared_data / "preference" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
    records = [json.loads(line) for line in gzip.open(source, "rt") if line.strip()]
    report = ingest(str(source), str(tmp_path / "store"), "hh-rlhf", dataset_name="preference/test")
    counts = report.datasets["preference/test"]
    assert counts.rows_in == len(records) == 2312
    assert counts.rows_written == 2308 and counts.rows_quarantined == 4
    quarantined = _quarantine(tmp_path / "store", "preference/test")
    for q in quarantined:
        assert q["file"] == str(source) and "cannot be split" in q["reason"]
        with pytest.raises(ValueError):
            split_dialogue_pair(records[q["line"] - 1]["chosen"], records[q["line"] - 1]["rejected"])
    rows = read_dataset_table(str(tmp_path / "store"), "preference/test").to_pylist()
    first = records[0]
    assert rows[0][S.PROMPT] + rows[0][S.CHOSEN] == first["chosen"]
    assert rows[0][S.PROMPT] + rows[0][S.REJECTED] == first["rejected"]
    assert rows[0][S.PAIR_ID] == "test.jsonl.gz:1"


def test_bad_requests_are_named(corpus_source, tmp_path):
    (corpus_source / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="notes.txt"):
        list_source_files(str(corpus_source))
    (corpus_source / "notes.txt").unlink()
    (corpus_source / "_SUCCESS").write_text("")  # writer markers are skipped, not errors
    assert [Path(uri).name for uri, _ in list_source_files(str(corpus_source))] == \
        ["a.jsonl", "b.parquet", "c.parquet"]
    with pytest.raises(SourceError, match="does not exist"):
        ingest(str(tmp_path / "missing"), str(tmp_path / "s"), "corpus")
    with pytest.raises(IngestError, match="'pairs/<split>'"):
        ingest(str(corpus_source), str(tmp_path / "s"), "pairs", dataset_name="train")
    with pytest.raises(IngestError, match="must be 'corpus'"):
        ingest(str(corpus_source), str(tmp_path / "s"), "corpus", dataset_name="docs")
    with pytest.raises(IngestError, match="unknown kind"):
        ingest(str(corpus_source), str(tmp_path / "s"), "tsv")  # type: ignore[arg-type]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("")
    with pytest.raises(IngestError, match="not empty"):
        ingest(str(corpus_source), str(tmp_path / "foreign"), "corpus")


def test_staged_chunks_do_not_change_the_shard_bytes(corpus_source, tmp_path):
    """The Ray engine hands the writer differently sized tables; shard bytes must not depend on it."""
    file_uri = str(corpus_source / "b.parquet")
    digests = []
    for chunk_rows in (1, 2, 100):
        writer = ShardWriter(str(tmp_path / f"s{chunk_rows}"), "corpus", S.CORPUS_SCHEMA, rows_per_shard=4)
        for table in stage_file(file_uri, "corpus", "b.parquet", chunk_rows=chunk_rows):
            assert table.num_rows <= chunk_rows
            writer.add_table(table.filter(pa.compute.is_null(table.column("_reason"))))
        digests.append([s.sha256 for s in writer.close().shards])
    assert digests[0] == digests[1] == digests[2] and len(digests[0]) == 2


def test_ingest_job_formats(corpus_source, tmp_path, shared_data, capsys):
    from jobs.ingest import main

    out = main(["--config", "jobs/configs/ingest/hh_rlhf.yaml", f"store_uri={tmp_path / 'hh'}",
                f"source={shared_data / 'preference' / 'hh-rlhf-harmless-base' / 'test.jsonl.gz'}"])
    assert out["datasets"]["preference/test"]["rows_written"] == 2308
    out = main(["--config", "jobs/configs/ingest/smoke.yaml", f"store_uri={tmp_path / 'beir'}"])
    assert out["datasets"]["corpus"]["rows_in"] == out["datasets"]["corpus"]["rows_written"] > 0
    out = main(["--config", "jobs/configs/ingest/corpus.yaml", f"source={corpus_source}",
                f"store_uri={tmp_path / 'beir'}"])
    assert out["datasets"]["corpus"]["rows_in"] == 13 and out["engine"] == "local"
    assert set(read_manifest(str(tmp_path / "beir")).datasets) >= {"corpus", "queries", "pairs/train"}
    with pytest.raises(SystemExit):
        main(["--config", "jobs/configs/ingest/smoke.yaml", "dataset_name=corpus"])
    assert "dataset_name applies to the record formats" in capsys.readouterr().err
