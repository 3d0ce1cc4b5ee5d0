"""Record validation: turn one raw source record into a row of a store schema, or reject it.

Each validator takes what one source line holds (a parsed JSON object, or TSV fields) and returns
a dict whose keys are the column names in :mod:`whetstone.data.schemas`, or raises
:class:`RowRejected` whose message is the reason written to quarantine (it names the field).
Cross-row rules (duplicate ids, qrels naming unknown documents) live in the ingest loop, which
sees every row.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

from whetstone.data import schemas as S


class RowRejected(ValueError):
    """One record failed validation; ``str(err)`` is the reason (it names the field)."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode one JSONL line into a dict.

    Raises:
        RowRejected: the bytes are not UTF-8, not JSON (e.g. a truncated last line) or not an object.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowRejected(f"line is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowRejected(f"not valid JSON ({err.msg} at column {err.colno}); truncated line?") from None
    if not isinstance(value, dict):
        raise RowRejected(f"expected a JSON object, got {_type_name(value)}")
    return value


def require_string(record: dict[str, Any], field: str, *, allow_empty: bool = False) -> str:
    """``record[field]`` as a string; rejects missing, non-string and (by default) blank values."""
    if field not in record:
        raise RowRejected(f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise RowRejected(f"field {field!r} is empty")
    return value


def optional_string(record: dict[str, Any], field: str) -> str | None:
    """``record[field]`` when present and not null; rejects a non-string value."""
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowRejected(f"field {field!r} must be a string or null, got {_type_name(value)}")
    return value


def string_list(record: dict[str, Any], field: str, *, required: bool) -> list[str]:
    """A list of non-empty id strings; a single string is accepted as a one-element list."""
    value = record.get(field)
    if value is None:
        if required:
            raise RowRejected(f"missing field {field!r}")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RowRejected(f"field {field!r} must be a list of non-empty strings")
    if required and not value:
        raise RowRejected(f"field {field!r} is an empty list")
    return value


CORPUS_ID_FIELDS = ("_id", "id", S.DOC_ID)


def corpus_row(record: dict[str, Any]) -> dict[str, Any]:
    """A corpus record: an id (``_id`` as in BEIR, ``id`` or ``doc_id``), ``text``, optional
    ``title`` and ``metadata`` object (or a JSON object string, as a Parquet column holds it)."""
    present = [name for name in CORPUS_ID_FIELDS if name in record]
    if len(present) > 1:
        raise RowRejected(f"fields {present} all name the document id; keep one")
    metadata = record.get("metadata")
    if isinstance(metadata, str):  # Parquet sources carry metadata as a JSON string column
        try:
            metadata = json.loads(metadata) if metadata.strip() else None
        except json.JSONDecodeError:
            raise RowRejected("field 'metadata' is a string but not a JSON object") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise RowRejected(f"field 'metadata' must be a JSON object, got {_type_name(metadata)}")
    return {
        S.DOC_ID: require_string(record, present[0] if present else "_id"),
        S.TITLE: optional_string(record, "title") or "",
        S.TEXT: require_string(record, "text"),
        S.METADATA: json.dumps(metadata, ensure_ascii=False, sort_keys=True) if metadata else None,
    }


def query_row(record: dict[str, Any]) -> dict[str, Any]:
    """A BEIR query record (``_id``, ``text``; other fields are ignored)."""
    return {S.QUERY_ID: require_string(record, "_id"), S.TEXT: require_string(record, "text")}


def qrels_row(fields: list[str]) -> dict[str, Any]:
    """One BEIR qrels TSV line split on tabs: ``query-id``, ``corpus-id``, ``score`` (an int)."""
    if len(fields) != 3:
        raise RowRejected(f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}")
    query_id, doc_id, score = (f.strip() for f in fields)
    if not query_id:
        raise RowRejected("field 'query-id' is empty")
    if not doc_id:
        raise RowRejected("field 'corpus-id' is empty")
    try:
        value = int(score)
    except ValueError:
        raise RowRejected(f"field 'score' must be an integer, got {score!r}") from None
    if not -(2**31) <= value < 2**31:
        raise RowRejected(f"field 'score' {value} does not fit in int32")
    return {S.QUERY_ID: query_id, S.DOC_ID: doc_id, S.SCORE: value}


def is_qrels_header(fields: list[str]) -> bool:
    """True when a first qrels line is a header (its score column is not an integer)."""
    if len(fields) != 3:
        return False
    try:
        int(fields[2].strip())
    except ValueError:
        return True
    return False


def _first_present(record: dict[str, Any], names: tuple[str, ...]) -> str:
    """The first of ``names`` that ``record`` has (else the first name, so errors cite it)."""
    return next((name for name in names if name in record), names[0])


def _default_id(record: dict[str, Any], field: str, default_id: str | None) -> str:
    if field not in record and default_id is not None:
        return default_id
    return require_string(record, field)


def pairs_row(record: dict[str, Any], default_id: str | None = None) -> dict[str, Any]:
    """A pairs record: ``query``, ``positive_ids`` (or ``positive_id``), optional ``query_id``,
    ``negative_ids`` (or ``negative_id``) and ``score``.

    Args:
        record: the parsed source record.
        default_id: the ``query_id`` to use when the record has none (ingest passes
            ``"<file name>:<line>"``); ``None`` makes ``query_id`` required.
    """
    score = record.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RowRejected(f"field 'score' must be a finite number or null, got {score!r}")
        score = float(score)
    return {
        S.QUERY_ID: _default_id(record, S.QUERY_ID, default_id),
        S.QUERY: require_string(record, S.QUERY),
        S.POSITIVE_IDS: string_list(record, _first_present(record, (S.POSITIVE_IDS, S.POSITIVE_ID)), required=True),
        S.NEGATIVE_IDS: string_list(record, _first_present(record, (S.NEGATIVE_IDS, "negative_id")),
                                    required=False),
        S.SCORE: score,
    }


def parse_time(value: Any) -> datetime | None:
    """An optional timestamp: ISO-8601 string or Unix seconds; naive times are taken as UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):  # a Parquet timestamp column
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, bool):
        raise RowRejected("field 'time' must be an ISO-8601 string or Unix seconds, got bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RowRejected(f"field 'time' is not finite: {value!r}")
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise RowRejected(f"field 'time' is not an ISO-8601 timestamp: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise RowRejected(f"field 'time' must be an ISO-8601 string or Unix seconds, got {_type_name(value)}")


def preference_row(record: dict[str, Any], default_id: str | None = None) -> dict[str, Any]:
    """A preference record: ``prompt``, ``chosen``, ``rejected``, optional ``pair_id`` and ``time``.

    Args:
        record: the parsed source record.
        default_id: the ``pair_id`` when the record has none; ``None`` makes it required.
    """
    chosen = require_string(record, S.CHOSEN)
    rejected = require_string(record, S.REJECTED)
    if chosen == rejected:
        raise RowRejected("fields 'chosen' and 'rejected' are identical")
    return {
        S.PAIR_ID: _default_id(record, S.PAIR_ID, default_id),
        S.PROMPT: require_string(record, S.PROMPT),
        S.CHOSEN: chosen,
        S.REJECTED: rejected,
        S.TIME: parse_time(record.get(S.TIME)),
    }


def hh_rlhf_row(record: dict[str, Any], default_id: str | None = None) -> dict[str, Any]:
    """An Anthropic hh-rlhf record (two whole dialogues) split into a preference row.

    The split rule is :func:`whetstone.data.hh_rlhf.split_dialogue_pair`; a pair it cannot split
    is rejected with its reason. ``pair_id`` and ``time`` are taken when present (hh-rlhf has
    neither), else ``default_id`` and null.
    """
    from whetstone.data.hh_rlhf import split_dialogue_pair

    chosen = require_string(record, S.CHOSEN)
    rejected = require_string(record, S.REJECTED)
    try:
        prompt, chosen_completion, rejected_completion = split_dialogue_pair(chosen, rejected)
    except ValueError as err:
        raise RowRejected(f"hh-rlhf pair cannot be split: {err}") from None
    # An empty completion is allowed here (unlike the generic preference format): in hh-rlhf the
    # assistant saying nothing is a real, sometimes preferred, answer.
    return {
        S.PAIR_ID: _default_id(record, S.PAIR_ID, default_id),
        S.PROMPT: prompt,
        S.CHOSEN: chosen_completion,
        S.REJECTED: rejected_completion,
        S.TIME: parse_time(record.get(S.TIME)),
    }
