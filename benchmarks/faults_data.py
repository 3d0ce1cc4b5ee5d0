"""The data-plane scenarios of ``benchmarks.faults``: storage stalls, damaged files, interrupted
re-ingests. Each injects its fault for real (SIGSTOP of moto's S3 server, bytes cut or
overwritten in a file, kill -9 of an ingest process) and returns its figures."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def moto_server():
    """moto's standalone S3 server on a loopback port; yields (endpoint, pid) with the AWS_* env set."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                            "AWS_ENDPOINT_URL")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint, proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus_lines(rows: int, prefix: str = "d") -> bytes:
    return "".join(json.dumps({"doc_id": f"{prefix}{i}", "text": f"text of document {i} " * 6}) + "\n"
                   for i in range(rows)).encode()


def storage_stall_runs(runs: int, stall_s: float, rows: int = 200_000) -> dict:
    """``runs`` S3-to-S3 ingests of ``rows`` rows, each with moto stopped for ``stall_s`` seconds
    half a second in; how many finished with every row."""
    import boto3
    from whetstone.config.base import StorageConfig
    from whetstone.data.ingest_files import ingest_records

    body = _corpus_lines(rows)
    out = []
    with moto_server() as (_, pid):
        s3 = boto3.client("s3")
        for run in range(runs):
            bucket = f"stall-{run}-{int(time.time())}"
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="src/corpus.jsonl", Body=body)

            def stall() -> None:
                time.sleep(0.5)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(stall_s)
                os.kill(pid, signal.SIGCONT)

            staller = threading.Thread(target=stall)
            started = time.monotonic()
            staller.start()
            record: dict = {"run": run}
            try:
                report = ingest_records(f"s3://{bucket}/src/corpus.jsonl", f"s3://{bucket}/store", "corpus",
                                        storage=StorageConfig(), rows_per_shard=50_000, engine="local")
                counts = report.datasets["corpus"]
                record.update(finished=counts.rows_written == rows, rows_written=counts.rows_written)
            except Exception as err:  # noqa: BLE001 - a failed run is a figure here
                record.update(finished=False, error=f"{type(err).__name__}: {err}"[:300])
            staller.join()
            record["seconds"] = round(time.monotonic() - started, 1)
            out.append(record)
            print(f"[faults] storage stall {stall_s:.0f} s, run {run}: {record}", flush=True)
    return {"runs": out, "finished_share": sum(r["finished"] for r in out) / len(out)}


def damaged_files(work: Path) -> dict:
    """Two damaged sources ingested; ``rows_unaccounted`` counts rows that could be read from a
    file but are neither written nor quarantined (a truncated gzip's lost tail is unknowable and
    is reported as such, not counted here)."""
    from whetstone.data.ingest_files import ingest_records

    cases = {}
    lines = [json.dumps({"doc_id": f"g{i}", "text": f"document {i} " * 40}) for i in range(200)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    gz = work / "truncated.jsonl.gz"
    gz.write_bytes(data[: len(data) // 2])
    # the complete lines the truncated file still holds, decompressed as far as it goes
    complete = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data[: len(data) // 2]).count(b"\n")
    report = ingest_records(str(gz), str(work / "store-gz"), "corpus", engine="local")
    counts, (damaged,) = report.datasets["corpus"], report.damaged_files["corpus"]
    # rows_quarantined includes the one record of the break itself
    cases["truncated_gzip"] = {"complete_lines_before_break": complete, "rows_written": counts.rows_written,
                               "rows_quarantined": counts.rows_quarantined, "rows_lost_reported": damaged.rows_lost,
                               "unaccounted": complete - counts.rows_written - (counts.rows_quarantined - 1)}

    table = pa.table({"doc_id": [f"p{i}" for i in range(200)], "text": [f"document number {i} " * 20 for i in range(200)]})
    source = work / "corrupt.parquet"
    pq.write_table(table, source, row_group_size=50, compression="none")
    start = pq.ParquetFile(source).metadata.row_group(2).column(1).data_page_offset
    raw = bytearray(source.read_bytes())
    raw[start:start + 400] = b"\xff" * 400
    source.write_bytes(bytes(raw))
    report = ingest_records(str(source), str(work / "store-pq"), "corpus", engine="local")
    counts = report.datasets["corpus"]
    cases["corrupt_parquet_row_group"] = {"rows_in_file": 200, "rows_written": counts.rows_written,
                                          "rows_quarantined": counts.rows_quarantined,
                                          "unaccounted": 200 - counts.rows_written - counts.rows_quarantined}
    return {"cases": cases, "rows_unaccounted": sum(case["unaccounted"] for case in cases.values())}


def interrupted_reingests(work: Path, runs: int, rows: int = 150_000) -> dict:
    """``runs`` re-ingests over an existing store, each killed (-9) after a different number of
    new shards; after each kill the old dataset must read back whole (checksums verified)."""
    from whetstone.data import schemas as S
    from whetstone.data.ingest_files import ingest_records
    from whetstone.data.store import read_dataset_table

    work.mkdir(parents=True, exist_ok=True)
    source, small, store = work / "big.jsonl", work / "small.jsonl", work / "store-reingest"
    source.write_bytes(_corpus_lines(rows))
    small.write_bytes(_corpus_lines(50, prefix="s"))
    ingest_records(str(small), str(store), "corpus", engine="local")
    code = (f"from whetstone.data.ingest_files import ingest_records; ingest_records({str(source)!r}, "
            f"{str(store)!r}, 'corpus', rows_per_shard=5000, engine='local', chunk_rows=2000)")
    results = []
    for run in range(runs):
        before = len(list(store.rglob("*.parquet")))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = before + 1 + run  # a later kill point each run
        while len(list(store.rglob("*.parquet"))) < target and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            ids = read_dataset_table(str(store), "corpus").column(S.DOC_ID).to_pylist()
            readable = ids == [f"s{i}" for i in range(50)]
        except Exception:  # noqa: BLE001 - unreadable is the figure
            readable = False
        results.append({"run": run, "killed_after_new_shards": target - before, "old_dataset_readable": readable})
    report = ingest_records(str(source), str(store), "corpus", rows_per_shard=50_000, engine="local")
    rerun_ok = report.datasets["corpus"].rows_written == rows
    return {"runs": results, "readable_share": sum(r["old_dataset_readable"] for r in results) / runs,
            "rerun_completed": rerun_ok, "files_left": len(list(store.rglob("*.parquet")))}
