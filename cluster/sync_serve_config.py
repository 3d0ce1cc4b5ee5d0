"""Copy services/index/serve_config.yaml into the RayService's ``serveConfigV2`` block.

KubeRay embeds the Serve config in the RayService as a YAML string, so the two copies drift
unless one is generated from the other. The services file is the source (``serve run`` and
``serve deploy`` use it); this rewrites only the block scalar in the manifest, keeping its
comments, and ``--check`` exits 1 when the two differ as data (what the test asserts).

    python cluster/sync_serve_config.py           # rewrite k8s/base/ray-service.index.yaml
    python cluster/sync_serve_config.py --check   # exit 1 when they differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO_ROOT / "services" / "index" / "serve_config.yaml"
RAY_SERVICE = REPO_ROOT / "k8s" / "base" / "ray-service.index.yaml"
KEY = "serveConfigV2: |"


def embedded_serve_config(manifest_text: str) -> object:
    """The parsed ``serveConfigV2`` string of the (single) RayService in ``manifest_text``."""
    doc = yaml.safe_load(manifest_text)
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def replace_block(manifest_text: str, serve_config_text: str) -> str:
    """``manifest_text`` with the ``serveConfigV2: |`` block replaced by ``serve_config_text``.

    Raises:
        ValueError: the manifest has no ``serveConfigV2: |`` line.
    """
    lines = manifest_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(starts) != 1:
        raise ValueError(f"{RAY_SERVICE}: expected one '{KEY}' line, found {len(starts)}")
    start = starts[0]
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    # The block runs while lines are blank or indented deeper than the key.
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent
    ):
        end += 1
    pad = " " * (key_indent + 2)
    body = [
        (pad + line if line.strip() else "\n") if line.endswith("\n") else pad + line + "\n"
        for line in serve_config_text.splitlines(keepends=True)
        if not line.lstrip().startswith("#")  # the file's own comments describe the file
    ]
    return "".join(lines[: start + 1] + body + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    if not SERVE_CONFIG.is_file():
        print(f"{SERVE_CONFIG} does not exist", file=sys.stderr)
        return 2
    source_text = SERVE_CONFIG.read_text()
    manifest_text = RAY_SERVICE.read_text()
    same = embedded_serve_config(manifest_text) == yaml.safe_load(source_text)
    if args.check:
        print(f"{RAY_SERVICE.name}: serveConfigV2 {'matches' if same else 'differs from'} {SERVE_CONFIG}")
        return 0 if same else 1
    if same:
        print(f"{RAY_SERVICE} already matches {SERVE_CONFIG}")
        return 0
    updated = replace_block(manifest_text, source_text)
    if embedded_serve_config(updated) != yaml.safe_load(source_text):
        raise SystemExit(f"rewriting {RAY_SERVICE} did not reproduce {SERVE_CONFIG}; edit it by hand")
    RAY_SERVICE.write_text(updated)
    print(f"updated serveConfigV2 in {RAY_SERVICE} from {SERVE_CONFIG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
