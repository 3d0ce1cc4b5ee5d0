"""A bounded schemathesis run against a live service's OpenAPI document (real HTTP on loopback).

Every operation the document lists gets ``examples`` generated requests that fit the schema
(positive) and as many that break it (negative: wrong types, missing fields, out-of-range
values), sent as they are. What counts is the service's answer: any 5xx is a server error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # "METHOD path -> status: body" per 5xx
    skipped: list[str] = field(default_factory=list)  # "METHOD path mode" that has no case to generate


def fuzz_openapi(base_url: str, examples: int = 25, headers: dict[str, str] | None = None,
                 spec_path: str = "/openapi.json") -> FuzzResult:
    """Send ``examples`` positive and ``examples`` negative cases per operation of
    ``base_url + spec_path`` to ``base_url`` (the service's route prefix); returns what came back."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(base_url + spec_path)
    result = FuzzResult()
    for operation in schema.get_all_operations():
        op = operation.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(generation_mode=mode))
            def send(case) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=60)
                result.cases += 1
                result.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    result.server_errors.append(f"{case.method} {case.path} -> {response.status_code}: "
                                                f"{response.text[:300]}")

            try:
                send()
            except Unsatisfiable:  # nothing to break (an operation without parameters has no negative cases)
                result.skipped.append(f"{op.method.upper()} {op.path} {mode.value}")
    return result
