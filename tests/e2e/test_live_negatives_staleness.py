"""Live negatives against a real index service: each fallback path forced, then recovery.

A training worker's :class:`whetstone.train.contrastive.LiveNegatives` searches a Serve index
service (one flat shard, real FAISS, the Serve handle) whose versions record the step their
checkpoint was embedded at (``extra.step`` in the manifest). The staleness bound is in steps:

- fresh enough: hard negatives from the index;
- too stale (the served version was embedded more than the bound before the step): in-batch
  fallback, naming the lag; a fresh version swapped in brings live negatives back;
- index down (the application deleted): in-batch fallback, naming the outage; redeployed, live
  negatives come back on the next step.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
from whetstone.data.stream import DocStore
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.client import IndexClient
from whetstone.index.mining import MiningConfig
from whetstone.train.contrastive import LiveNegatives

pytestmark = pytest.mark.e2e

APP, PREFIX = "whetstone-index-staleness", "/index-staleness"
DIM, DOCS, BOUND = 16, 300, 5


def corpus() -> tuple[np.ndarray, list[str], DocStore]:
    rng = np.random.default_rng(7)
    ids = [f"doc-{i}" for i in range(DOCS)]
    table = pa.table({"doc_id": ids, "title": [""] * DOCS, "text": [f"document number {i}" for i in ids]})
    return rng.standard_normal((DOCS, DIM)).astype(np.float32), ids, DocStore(table)


def publish(root: str, version: int, step: int | None, vectors: np.ndarray, ids: list[str]) -> None:
    extra = {} if step is None else {"step": step}
    AnnIndex.build(vectors, ids, AnnConfig(kind="flat")).save(root, version, checkpoint="no-encoder", extra=extra,
                                                              set_latest=False)


def deploy(root: str) -> None:
    from services.index.app import IndexServiceArgs, deploy

    deploy(IndexServiceArgs(index_uri=root, num_replicas=1, num_cpus=0.1, poll_interval_s=0.5),
           name=APP, route_prefix=PREFIX)


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory, tiny_encoder_dir):
    from ray import serve
    from transformers import AutoTokenizer
    from whetstone.index.snapshot import set_latest_version

    from tests.e2e.test_index_service import serve_root_url

    vectors, ids, docs = corpus()
    root = str(tmp_path_factory.mktemp("staleness") / "index")
    publish(root, 1, 0, vectors, ids)
    set_latest_version(root, 1)
    serve_root_url(ray_cluster)
    deploy(root)
    negatives = LiveNegatives(IndexClient.from_handle(app_name=APP, timeout_s=10, retry_after_s=1.0), docs,
                              MiningConfig(num_negatives=2, rank_start=1, rank_end=10), seed=0, rank=0,
                              doc_max_length=16, timeout_s=10, max_steps_behind=BOUND)
    yield {"root": root, "vectors": vectors, "ids": ids, "negatives": negatives,
           "tokenizer": AutoTokenizer.from_pretrained(str(tiny_encoder_dir))}
    serve.delete(APP)


def fetch(live: dict, step: int):
    queries = live["vectors"][:4] + 0.01  # near documents 0-3, which are their positives
    positives = [[live["ids"][i]] for i in range(4)]
    return live["negatives"].fetch(queries, positives, live["tokenizer"], step=step)


def assert_live(batch, version: int, behind: int) -> None:
    assert batch.fallback_reason is None, batch.fallback_reason
    assert (batch.version, batch.steps_behind, batch.from_index) == (version, behind, 4 * 2)
    assert batch.input_ids is not None and batch.input_ids.shape[0] == 4 * 2
    assert not {"doc-0", "doc-1", "doc-2", "doc-3"} & set(batch.ids[:2] + batch.ids[2:4])


def test_stale_index_falls_back_and_a_fresh_version_recovers(live):
    from whetstone.index.client import IndexClient

    assert_live(fetch(live, step=BOUND), version=1, behind=BOUND)  # at the bound: still live
    stale = fetch(live, step=BOUND + 4)
    assert stale.fallback_kind == "stale" and stale.input_ids is None and stale.from_index == 0
    assert stale.version == 1 and stale.steps_behind == BOUND + 4
    assert f"embedded at step 0, {BOUND + 4} steps behind (bound {BOUND})" in stale.fallback_reason

    # A refresh from the checkpoint of step 7 lands: the next step is 2 steps behind, live again.
    publish(live["root"], 2, 7, live["vectors"], live["ids"])
    IndexClient.from_handle(app_name=APP).swap(2)
    assert_live(fetch(live, step=BOUND + 4), version=2, behind=2)

    # A version that did not record its step (published outside a run) is taken as fresh.
    publish(live["root"], 3, None, live["vectors"], live["ids"])
    IndexClient.from_handle(app_name=APP).swap(3)
    unknown = fetch(live, step=1000)
    assert unknown.fallback_reason is None and unknown.version == 3 and unknown.steps_behind is None


def test_index_down_falls_back_and_recovers_when_it_returns(live):
    from ray import serve

    serve.delete(APP)  # the whole index application goes away mid-run
    down = fetch(live, step=3)
    assert down.fallback_kind == "unavailable" and down.input_ids is None and down.version is None
    assert down.fallback_reason.startswith("index unavailable")
    deploy(live["root"])  # back, serving LATEST (v3 after the test above; v1 when run alone)
    # The client fails fast for retry_after_s after an outage; until then steps keep falling back.
    deadline, answers = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        answers.append(fetch(live, step=3))
        if answers[-1].fallback_reason is None:
            break
        time.sleep(0.2)
    back = answers[-1]
    assert back.fallback_reason is None and back.from_index == 4 * 2, back.fallback_reason
    assert all(a.fallback_kind == "unavailable" for a in answers[:-1])
