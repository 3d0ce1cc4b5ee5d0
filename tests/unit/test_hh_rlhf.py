"""hh-rlhf dialogue pairs -> (prompt, chosen, rejected); unsplittable pairs are kept with line and reason."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from whetstone.data.hh_rlhf import (
    ASSISTANT_MARKER,
    dialogue_to_messages,
    parse_hh_rlhf_lines,
    read_hh_rlhf,
    split_dialogue_pair,
    split_hh_rlhf_batch,
)

HH_FILE = "preference/hh-rlhf-harmless-base/test.jsonl.gz"


def test_split_uses_last_assistant_turn_of_chosen():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?\n\nAssistant:"
    got = split_dialogue_pair(prompt + " Knead flour and water.", prompt + " No idea.\n\nHuman: ok")
    assert got == (prompt, " Knead flour and water.", " No idea.\n\nHuman: ok")


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nHuman: hi there", "\n\nHuman: hi there\n\nAssistant: x", "no '\\\\n\\\\nAssistant:' turn"),
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "\n\nHuman: a\n\nAssistant: B\n\nHuman: c\n\nAssistant: e",
            "does not start with the prompt .* diverge at char 23",
        ),
        ("\n\nHuman: a\n\nAssistant: same", "\n\nHuman: a\n\nAssistant: same", "identical"),
        (None, "x", "must be strings"),
    ],
)
def test_unsplittable_pairs_raise_with_reason(chosen, rejected, reason):
    """Divergence offset by hand: len("\\n\\nHuman: a") = 10, len("\\n\\nAssistant: ") = 13, so b/B is char 23."""
    with pytest.raises(ValueError, match=reason):
        split_dialogue_pair(chosen, rejected)


def test_shared_file_splits_2308_of_2312(shared_data):
    path = shared_data / HH_FILE
    rows, rejects = read_hh_rlhf(path, id_prefix="harmless-test-")
    assert len({row["pair_id"] for row in rows}) == 2308 and rows[0]["pair_id"] == "harmless-test-1"
    assert len(rows) == 2308 and len(rejects) == 4
    assert [r.line for r in rejects] == [1255, 1689, 1953, 2037]
    assert all("does not start with the prompt" in r.reason for r in rejects)
    assert all(isinstance(r.raw, dict) and set(r.raw) == {"chosen", "rejected"} for r in rejects)
    assert str(rejects[0]).startswith(f"{path}:1255: ")
    # Every split reconstructs its source dialogues exactly.
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        source = [json.loads(line) for line in handle]
    for row in rows:
        record = source[row["line"] - 1]
        assert row["prompt"].endswith(ASSISTANT_MARKER)
        assert row["prompt"] + row["chosen"] == record["chosen"]
        assert row["prompt"] + row["rejected"] == record["rejected"]


def test_bad_lines_are_kept_aside_with_line_numbers(tmp_path):
    good = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
    lines = [json.dumps(good), "", "{not json", json.dumps({"chosen": "x"}), json.dumps([1, 2]), json.dumps(good)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, rejects = read_hh_rlhf(str(path))
    assert [row["line"] for row in rows] == [1, 6] and [row["pair_id"] for row in rows] == ["1", "6"]
    assert rows[0]["prompt"] == "\n\nHuman: q\n\nAssistant:" and rows[0]["chosen"] == " yes"
    assert [(r.line, r.reason.split(" (")[0]) for r in rejects] == [
        (3, "not valid JSON"),
        (4, "missing field(s) ['rejected']"),
        (5, "expected a JSON object, got list"),
    ]
    assert rejects[0].raw == "{not json"
    same_rows, same_rejects = parse_hh_rlhf_lines(lines)
    assert same_rows == rows and [r.source for r in same_rejects] == ["<lines>"] * 3


def test_dialogue_to_messages():
    prompt = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: how do I bake bread?\n\nAssistant:"
    assert dialogue_to_messages(prompt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "how do I bake bread?"},
    ]
    repeated = "\n\nHuman: a\n\nHuman: b\n\nAssistant:"
    assert dialogue_to_messages(repeated) == [{"role": "user", "content": "a\n\nb"}]
    with pytest.raises(ValueError, match="must end with"):
        dialogue_to_messages("\n\nHuman: hi\n\nAssistant: done")
    with pytest.raises(ValueError, match="must start with"):
        dialogue_to_messages("hi\n\nAssistant:")


def test_dialogue_to_messages_on_every_shared_prompt(shared_data):
    rows, _ = read_hh_rlhf(shared_data / HH_FILE)
    for row in rows:
        messages = dialogue_to_messages(row["prompt"])
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "user"
        # Turns alternate, so a chat template accepts them.
        assert all(m["role"] != n["role"] for m, n in zip(messages, messages[1:], strict=False))


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"chosen": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: not UTF-8 text at byte 12"):
        read_hh_rlhf(path)


def test_batch_form_for_ray_data_keeps_failures_in_a_column():
    prompt = "\n\nHuman: q\n\nAssistant:"
    batch = {
        "chosen": np.array([prompt + " yes", "\n\nHuman: no turn"], dtype=object),
        "rejected": np.array([prompt + " no", "whatever"], dtype=object),
        "source_id": np.array([10, 11]),
    }
    out = split_hh_rlhf_batch(batch)
    assert out["prompt"].tolist() == [prompt, ""]
    assert out["chosen"].tolist() == [" yes", ""] and out["rejected"].tolist() == [" no", ""]
    assert out["split_error"][0] == "" and "no '\\n\\nAssistant:' turn" in out["split_error"][1]
    assert out["source_id"].tolist() == [10, 11]
    with pytest.raises(ValueError, match="no 'rejected' column"):
        split_hh_rlhf_batch({"chosen": np.array(["x"], dtype=object)})
