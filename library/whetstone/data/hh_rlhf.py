"""Anthropic hh-rlhf: whole dialogues in, (prompt, chosen completion, rejected completion) out.

Each hh-rlhf record holds two whole dialogues, ``chosen`` and ``rejected``, that share their
beginning. The rule (see the shared data README): the prompt is the chosen dialogue's text up to
and including its last ``"\\n\\nAssistant:"``, the rejected dialogue must begin with exactly that
text, and each completion is what follows it. Pairs that break the rule are not dropped: they are
returned separately with their line number and the reason, so ingest can count them and keep them
aside (on the harmless-base test split, 2,308 of 2,312 pairs split).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from whetstone import storage
from whetstone.config.base import StorageConfig
from whetstone.data.schemas import CHOSEN, PAIR_ID, PROMPT, REJECTED

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
LINE, SPLIT_ERROR = "line", "split_error"


@dataclass(frozen=True)
class RejectedPair:
    """A record that could not be turned into a preference triple.

    Attributes:
        source: the file (or other origin) it came from.
        line: 1-based line number in the source file.
        reason: why it could not be split or parsed.
        raw: the original record (or the raw line text when it was not valid JSON).
    """

    source: str
    line: int
    reason: str
    raw: dict[str, Any] | str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def split_dialogue_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two hh-rlhf dialogues into their shared prompt and the two completions.

    Args:
        chosen: the preferred whole dialogue (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``).
        rejected: the dispreferred whole dialogue.

    Returns:
        (prompt, chosen_completion, rejected_completion); the prompt ends with
        ``"\\n\\nAssistant:"``, the completions keep their leading space. A completion may be
        empty (the assistant said nothing, which can be the preferred answer); tokenisation
        still ends it with EOS, so it has a token to score.

    Raises:
        ValueError: with the reason, when the chosen dialogue has no Assistant turn, the rejected
            one does not start with the prompt, or both completions are identical.
    """
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError(
            f"chosen and rejected must be strings, got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    cut = chosen.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise ValueError("chosen dialogue has no '\\n\\nAssistant:' turn, so there is no prompt to share")
    prompt = chosen[: cut + len(ASSISTANT_MARKER)]
    if not rejected.startswith(prompt):
        diverge = len(os.path.commonprefix([prompt, rejected]))
        raise ValueError(
            f"rejected dialogue does not start with the prompt (the chosen dialogue up to its last "
            f"Assistant turn, {len(prompt)} chars): they diverge at char {diverge}, inside an earlier turn"
        )
    chosen_completion = chosen[len(prompt) :]
    rejected_completion = rejected[len(prompt) :]
    if chosen_completion == rejected_completion:
        raise ValueError("chosen and rejected completions are identical, so the pair states no preference")
    return prompt, chosen_completion, rejected_completion


def dialogue_to_messages(prompt: str) -> list[dict[str, str]]:
    """Turn an hh-rlhf prompt into chat messages, for tokenizers with a chat template.

    ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` becomes
    ``[user a, assistant b, user c]``; the trailing empty Assistant turn is the generation prompt
    the template adds itself. Consecutive turns of one speaker (a few hh-rlhf dialogues have
    them) are merged, so roles alternate. Pair it with ``completion.strip()`` as the assistant
    message.

    Raises:
        ValueError: when the text does not start with a Human turn or does not end with an empty
            Assistant turn.
    """
    if not prompt.startswith(HUMAN_MARKER):
        raise ValueError("hh-rlhf prompt must start with '\\n\\nHuman:'")
    if not prompt.endswith(ASSISTANT_MARKER):
        raise ValueError("hh-rlhf prompt must end with '\\n\\nAssistant:'")
    pieces = _TURN.split(prompt[: -len(ASSISTANT_MARKER)])  # ["", role, text, role, text, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    messages: list[dict[str, str]] = []
    for role, text in zip(pieces[1::2], pieces[2::2], strict=True):
        if messages and messages[-1]["role"] == roles[role]:
            # A few dialogues repeat a speaker; strict templates require alternation, so merge.
            messages[-1]["content"] += "\n\n" + text.strip()
        else:
            messages.append({"role": roles[role], "content": text.strip()})
    return messages


def _parse_line(text: str) -> tuple[str, str, str]:
    """Parse one JSONL line into a triple; raise ValueError with the reason otherwise."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in (CHOSEN, REJECTED) if key not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    return split_dialogue_pair(record[CHOSEN], record[REJECTED])


def parse_hh_rlhf_lines(
    lines: list[str], source: str = "<lines>", id_prefix: str = ""
) -> tuple[list[dict[str, Any]], list[RejectedPair]]:
    """Split hh-rlhf JSONL lines into triples and rejects.

    Args:
        lines: JSONL text lines (blank lines are skipped but still counted for line numbers).
        source: where the lines came from, recorded on each reject.
        id_prefix: prepended to the line number to form ``pair_id`` (hh-rlhf has no ids).

    Returns:
        (rows, rejects). Each row is ``{"pair_id", "line", "prompt", "chosen", "rejected"}`` (the
        columns of ``whetstone.data.schemas.PREFERENCE_SCHEMA`` plus the 1-based source line);
        each reject is a :class:`RejectedPair`.
    """
    rows: list[dict[str, Any]] = []
    rejects: list[RejectedPair] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            prompt, chosen, rejected = _parse_line(text)
        except ValueError as err:
            try:
                raw: dict[str, Any] | str = json.loads(text)
            except json.JSONDecodeError:
                raw = text
            rejects.append(RejectedPair(source=source, line=number, reason=str(err), raw=raw))
            continue
        rows.append(
            {PAIR_ID: f"{id_prefix}{number}", LINE: number, PROMPT: prompt, CHOSEN: chosen, REJECTED: rejected}
        )
    return rows, rejects


def read_hh_rlhf(
    uri: str | os.PathLike, storage_config: StorageConfig | None = None, id_prefix: str = ""
) -> tuple[list[dict[str, Any]], list[RejectedPair]]:
    """Read an hh-rlhf ``.jsonl`` or ``.jsonl.gz`` file (local path or ``s3://``) and split every pair.

    Args:
        uri: the file.
        storage_config: how to reach object storage, for ``s3://`` URIs.
        id_prefix: prepended to the line number to form each row's ``pair_id``.

    Returns:
        (rows, rejects) as in :func:`parse_hh_rlhf_lines`.

    Raises:
        ValueError: when the file is not UTF-8 text (naming the file).
    """
    uri = os.fspath(uri)
    data = storage.read_bytes(uri, storage_config)
    # pyarrow may already have decompressed by extension; the gzip magic tells us whether it did.
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{uri}: not UTF-8 text at byte {err.start}") from None
    return parse_hh_rlhf_lines(text.splitlines(), source=uri, id_prefix=id_prefix)


def split_hh_rlhf_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` form: whole dialogues in, triples plus an error column out.

    Rows that cannot be split get empty prompt/completions and the reason in ``split_error``
    (empty string when fine), so ingest can route them to quarantine with a ``filter`` instead of
    losing them.

    Args:
        batch: columns ``chosen`` and ``rejected`` (whole dialogues), length N, plus any others,
            which pass through unchanged.

    Returns:
        The batch with ``prompt``, ``chosen``, ``rejected`` (completions) and ``split_error``, length N.
    """
    for key in (CHOSEN, REJECTED):
        if key not in batch:
            raise ValueError(f"hh-rlhf batch has no {key!r} column (columns: {sorted(batch)})")
    prompts, chosen_out, rejected_out, errors = [], [], [], []
    for chosen, rejected in zip(batch[CHOSEN], batch[REJECTED], strict=True):
        try:
            prompt, chosen_completion, rejected_completion = split_dialogue_pair(chosen, rejected)
            error = ""
        except ValueError as err:
            prompt, chosen_completion, rejected_completion, error = "", "", "", str(err)
        prompts.append(prompt)
        chosen_out.append(chosen_completion)
        rejected_out.append(rejected_completion)
        errors.append(error)
    out = dict(batch)
    out.update(
        {
            PROMPT: np.asarray(prompts, dtype=object),
            CHOSEN: np.asarray(chosen_out, dtype=object),
            REJECTED: np.asarray(rejected_out, dtype=object),
            SPLIT_ERROR: np.asarray(errors, dtype=object),
        }
    )
    return out
