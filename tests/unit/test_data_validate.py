"""Record validators and the document text convention, on hand-written records."""

from __future__ import annotations

import pytest
from whetstone.data import schemas as S
from whetstone.data.validate import (
    RowRejected,
    corpus_row,
    is_qrels_header,
    pairs_row,
    parse_json_object,
    preference_row,
    qrels_row,
    query_row,
)


def test_document_text_joins_title_with_a_space_only_when_present():
    assert S.document_text("Title", "Body.") == "Title Body."
    assert S.document_text("", "Body.") == "Body."
    assert S.document_text("   ", "Body.") == "Body."
    assert S.document_text(None, "Body.") == "Body."


def test_schema_for_maps_dataset_names_to_kinds():
    assert S.schema_for("pairs/train") is S.PAIRS_SCHEMA
    assert S.schema_for("corpus") is S.CORPUS_SCHEMA
    with pytest.raises(KeyError, match="unknown dataset 'nope/x'"):
        S.schema_for("nope/x")


def test_corpus_row_keeps_metadata_as_json_and_defaults_title():
    row = corpus_row({"_id": "d1", "text": "hello", "metadata": {"b": 1, "a": "x"}})
    assert row == {S.DOC_ID: "d1", S.TITLE: "", S.TEXT: "hello", S.METADATA: '{"a": "x", "b": 1}'}
    assert corpus_row({"_id": "d1", "text": "t", "metadata": {}})[S.METADATA] is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"text": "t"}, "missing field '_id'"),
        ({"_id": 7, "text": "t"}, "field '_id' must be a string, got int"),
        ({"_id": "d", "text": "   "}, "field 'text' is empty"),
        ({"_id": "d", "text": None}, "field 'text' must be a string, got null"),
        ({"_id": "d", "text": "t", "title": 3}, "field 'title' must be a string or null, got int"),
        ({"_id": "d", "text": "t", "metadata": [1]}, "field 'metadata' must be a JSON object, got list"),
    ],
)
def test_corpus_row_rejections_name_the_field(record, reason):
    with pytest.raises(RowRejected, match=reason):
        corpus_row(record)


def test_query_row_requires_id_and_text():
    assert query_row({"_id": "q", "text": "why?", "metadata": {}}) == {S.QUERY_ID: "q", S.TEXT: "why?"}
    with pytest.raises(RowRejected, match="field 'text' is empty"):
        query_row({"_id": "q", "text": ""})


def test_parse_json_object_explains_truncation_and_non_objects():
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(RowRejected, match="not valid JSON.*truncated"):
        parse_json_object(b'{"_id": "d1", "text": "cut he')
    with pytest.raises(RowRejected, match="expected a JSON object, got list"):
        parse_json_object(b"[1, 2]")
    with pytest.raises(RowRejected, match="not valid UTF-8"):
        parse_json_object(b'{"a": "\xff"}')


def test_qrels_row_and_header_detection():
    assert qrels_row(["q1", "d1", "2"]) == {S.QUERY_ID: "q1", S.DOC_ID: "d1", S.SCORE: 2}
    with pytest.raises(RowRejected, match="field 'score' must be an integer, got '1.5'"):
        qrels_row(["q1", "d1", "1.5"])
    with pytest.raises(RowRejected, match="expected 3 tab-separated fields"):
        qrels_row(["q1", "d1"])
    assert is_qrels_header(["query-id", "corpus-id", "score"])
    assert not is_qrels_header(["19335", "1720389", "1"])


def test_pairs_row_accepts_single_positive_string_and_checks_lists():
    row = pairs_row({"query_id": "q", "query": "x", "positive_ids": "d1", "score": 3})
    assert row[S.POSITIVE_IDS] == ["d1"] and row[S.NEGATIVE_IDS] == [] and row[S.SCORE] == 3.0
    with pytest.raises(RowRejected, match="'positive_ids' is an empty list"):
        pairs_row({"query_id": "q", "query": "x", "positive_ids": []})
    with pytest.raises(RowRejected, match="'negative_ids' must be a list of non-empty strings"):
        pairs_row({"query_id": "q", "query": "x", "positive_ids": ["d"], "negative_ids": [1]})


def test_preference_row_parses_time_and_rejects_identical_completions():
    row = preference_row({"pair_id": "p", "prompt": "Hi", "chosen": "a", "rejected": "b",
                          "time": "2024-01-02T03:04:05Z"})
    assert row[S.TIME].isoformat() == "2024-01-02T03:04:05+00:00"
    with pytest.raises(RowRejected, match="identical"):
        preference_row({"pair_id": "p", "prompt": "Hi", "chosen": "a", "rejected": "a"})
    with pytest.raises(RowRejected, match="field 'time' is not an ISO-8601 timestamp"):
        preference_row({"pair_id": "p", "prompt": "Hi", "chosen": "a", "rejected": "b", "time": "noon"})
