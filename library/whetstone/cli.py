"""``whetstone <job> [--config file.yaml] [key=value ...]``: the job entrypoints under one command.

Each job is also ``python -m jobs.<job>`` and runs unchanged under ``ray job submit``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

JOBS = {
    "quickstart": "jobs.quickstart",
    "ingest": "jobs.ingest",
    "train-contrastive": "jobs.train_contrastive",
    "train-preference": "jobs.train_preference",
    "refresh-index": "jobs.refresh_index",
    "evaluate": "jobs.evaluate",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in {"-V", "--version"}:
        from whetstone import version

        print(f"whetstone {version()}")
        return 0
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        print("\njobs (`whetstone <job> --help` lists each job's config fields):\n  " + "\n  ".join(JOBS))
        print("\noptions:\n  -h, --help     this message\n  -V, --version  print the version")
        return 0 if argv else 2
    name = argv[0].replace("_", "-")
    if name not in JOBS:
        print(f"error: unknown job {argv[0]!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(JOBS[name])
    except ModuleNotFoundError as err:
        print(f"error: job {name} is not available ({err})", file=sys.stderr)
        return 2
    program, sys.argv[0] = sys.argv[0], f"whetstone {name}"  # the job's usage line names the command
    try:
        module.main(argv[1:])
    finally:
        sys.argv[0] = program
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
