"""One small cache per worker process, for what Ray Data tasks build once and reuse.

Ray Data rebuilds an actor pool on every execution (every epoch), and an actor that imports
transformers and loads a tokenizer takes seconds to start on a busy host; task worker processes
are pooled and reused across epochs, so what the first task builds here (a tokenizer, a DocStore,
a refresh plan fetched from the object store) serves the later tasks in the same process too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CACHE: dict[str, Any] = {}
_SIZE = 8


def cached(key: str, build: Callable[[], Any]) -> Any:
    """The value cached under ``key`` in this process, built with ``build()`` the first time."""
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) >= _SIZE:
            _CACHE.clear()  # a long-lived worker that served many runs: start over
        value = _CACHE[key] = build()
    return value
