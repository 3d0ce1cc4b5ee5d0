"""Column names and Arrow schemas of every dataset in a Whetstone store, defined once.

A *store* is a folder (local or ``s3://``) written by :mod:`whetstone.data.ingest`::

    corpus/<gen>/part-00000.parquet ...      CORPUS_SCHEMA
    queries/<gen>/part-*.parquet             QUERIES_SCHEMA
    qrels/<split>/<gen>/part-*.parquet       QRELS_SCHEMA
    pairs/<split>/<gen>/part-*.parquet       PAIRS_SCHEMA  (one row per query; ids only, no texts)
    preference/<split>/<gen>/part-*.parquet  PREFERENCE_SCHEMA
    quarantine/<dataset>/<gen>/part-*.jsonl  rows that failed validation
    manifest.json                            shard list, row counts, schema, sha256 per shard

``<gen>`` is the ingest that wrote the dataset (a sortable timestamp and a random tag): a re-ingest
writes a new one beside it and the manifest, written last, names the shards readers use
(:mod:`whetstone.data.ingest_sink`). Readers follow the manifest, never the folder listing.

Pairs carry document *ids*; texts are resolved inside the Ray Data pipeline
(:mod:`whetstone.data.stream`), so hard negatives mined later never rewrite the pair files.
"""

from __future__ import annotations

import pyarrow as pa

# --- column names -------------------------------------------------------------------------------
DOC_ID = "doc_id"
TITLE = "title"
TEXT = "text"
METADATA = "metadata"  # a JSON object serialised as a string (Arrow has no schemaless struct)

QUERY_ID = "query_id"
TOPIC = "topic"  # optional: the query's k-means topic (topic-aware batches)
QUERY = "query"
SCORE = "score"

POSITIVE_IDS = "positive_ids"
NEGATIVE_IDS = "negative_ids"

PAIR_ID = "pair_id"
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
TIME = "time"

# Columns added by the streaming pipeline (not stored).
POSITIVE_ID = "positive_id"
POSITIVE_TEXT = "positive_text"
NEGATIVE_TEXTS = "negative_texts"
QUERY_INPUT_IDS = "query_input_ids"
POSITIVE_INPUT_IDS = "positive_input_ids"
NEGATIVE_INPUT_IDS = "negative_input_ids"

# --- schemas ------------------------------------------------------------------------------------
CORPUS_SCHEMA = pa.schema(
    [
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(TITLE, pa.string(), nullable=False),  # "" when the source has no title
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(METADATA, pa.string(), nullable=True),
    ]
)

QUERIES_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
    ]
)

QRELS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(DOC_ID, pa.string(), nullable=False),
        pa.field(SCORE, pa.int32(), nullable=False),
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(QUERY, pa.string(), nullable=False),
        pa.field(POSITIVE_IDS, pa.list_(pa.string()), nullable=False),
        pa.field(NEGATIVE_IDS, pa.list_(pa.string()), nullable=False),  # [] when none are given
        pa.field(SCORE, pa.float64(), nullable=True),
    ]
)

PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field(PAIR_ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string(), nullable=False),
        pa.field(CHOSEN, pa.string(), nullable=False),
        pa.field(REJECTED, pa.string(), nullable=False),
        pa.field(TIME, pa.timestamp("us", tz="UTC"), nullable=True),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "corpus": CORPUS_SCHEMA,
    "queries": QUERIES_SCHEMA,
    "qrels": QRELS_SCHEMA,
    "pairs": PAIRS_SCHEMA,
    "preference": PREFERENCE_SCHEMA,
}


def schema_for(dataset: str) -> pa.Schema:
    """The schema of a store dataset name such as ``"corpus"`` or ``"pairs/train"``.

    Raises:
        KeyError: the dataset kind (the part before ``/``) is unknown.
    """
    kind = dataset.split("/", 1)[0]
    if kind not in SCHEMAS:
        raise KeyError(f"unknown dataset {dataset!r}; kinds are {sorted(SCHEMAS)}")
    return SCHEMAS[kind]


def document_text(title: str | None, text: str) -> str:
    """The string to embed for a document: the one place this is decided.

    BEIR convention: ``title + " " + text`` when there is a (non-blank) title, else ``text``.

    >>> document_text("Fahrenheit", "A scale.")
    'Fahrenheit A scale.'
    >>> document_text("", "A scale.")
    'A scale.'
    """
    title = (title or "").strip()
    return f"{title} {text}" if title else text
