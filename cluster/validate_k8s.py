"""Validate KubeRay manifests offline, as ``kubectl apply --validate=strict`` would.

The API server prunes fields that a CRD's structural schema does not declare, so a misspelt
field (``rayStartParms``) vanishes without a word; strict validation rejects it. This walks each
document together with the CRD's OpenAPI v3 schema and reports every key missing from
``properties`` (unless the schema sets ``x-kubernetes-preserve-unknown-fields``), then checks
types, enums, patterns and required fields with jsonschema. Pod templates are inlined in the
KubeRay CRDs, so containers are covered by the same walk; top-level ``metadata`` is only
``type: object`` in a CRD (the API server checks it itself), so it gets a small ObjectMeta schema.

    python cluster/validate_k8s.py                     # k8s/ (files and rendered overlays)
    python cluster/validate_k8s.py my-rayjob.yaml --crds ../shared/kuberay-crds

Kustomize overlays are rendered with the subset of ``kustomize build`` this project uses
(resources, patches merged by kind and name with lists replaced, images), no kubectl needed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRDS = REPO_ROOT.parent / "shared" / "kuberay-crds"
# The C loader where PyYAML has it: the CRD files are tens of thousands of lines.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}
Schemas = dict[tuple[str, str], dict]


@functools.lru_cache(maxsize=4)
def crd_schemas(crd_dir: Path = DEFAULT_CRDS) -> Schemas:
    """(apiVersion, kind) -> openAPIV3Schema for every version of every CRD in ``crd_dir``."""
    out: Schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            out[(f"{group}/{version['name']}", kind)] = schema
    if not out:
        raise FileNotFoundError(f"no CustomResourceDefinition in {crd_dir}")
    return out


def unknown_fields(doc: Any, schema: dict, path: str = "") -> list[str]:
    """Paths in ``doc`` that ``schema`` does not declare, each as ``path: message``.

    A mapping is checked against ``properties`` when the schema lists any; without them it is
    free-form unless ``additionalProperties`` gives a schema for its values. Lists recurse into
    ``items``. ``x-kubernetes-preserve-unknown-fields`` allows undeclared keys at that level
    (declared ones are still walked).
    """
    errors: list[str] = []
    if isinstance(doc, dict):
        properties = schema.get("properties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key, value in doc.items():
            child = f"{path}.{key}" if path else str(key)
            if properties is not None and key in properties:
                errors += unknown_fields(value, properties[key], child)
            elif properties is not None and not preserve:
                errors.append(f"{child}: unknown field {key!r} (known here: {', '.join(sorted(properties))})")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += unknown_fields(value, schema["additionalProperties"], child)
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(doc):
            errors += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return errors


def to_json_schema(schema: Any, partial: bool) -> Any:
    """OpenAPI v3 -> JSON Schema: ``nullable`` becomes a null type; a patch drops ``required``."""
    if isinstance(schema, list):
        return [to_json_schema(item, partial) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: to_json_schema(value, partial) for key, value in schema.items()
           if not (partial and key == "required")}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


_validators: dict[tuple[int, bool], jsonschema.Draft7Validator] = {}


def validate_document(doc: dict, schemas: Schemas, source: str, partial: bool = False) -> list[str]:
    """Every problem with one document, each as ``source: field.path: message``.

    Args:
        partial: the document is a patch: unknown fields and types count, required ones don't.
    """
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"{source}: no CRD schema for apiVersion={key[0]!r} kind={key[1]!r}"]
    schema = schemas[key]
    errors = [f"{source}: {message}" for message in unknown_fields(doc, schema)]
    cache_key = (id(schema), partial)
    if cache_key not in _validators:
        _validators[cache_key] = jsonschema.Draft7Validator(to_json_schema(schema, partial))
    for error in sorted(_validators[cache_key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        errors.append(f"{source}: {where or '<root>'}: {error.message}")
    return errors


def load_docs(path: Path) -> list[dict]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]


def ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster spec inside a RayCluster, RayJob or RayService (or a patch of one)."""
    spec = doc.get("spec") or {}
    found = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
             "RayService": spec.get("rayClusterConfig")}.get(doc.get("kind"))
    return [found] if found else []


def containers(cluster_spec: dict) -> Iterator[dict]:
    """Every container of the head and worker pod templates of a RayCluster spec."""
    for group in [cluster_spec.get("headGroupSpec", {})] + cluster_spec.get("workerGroupSpecs", []):
        yield from group.get("template", {}).get("spec", {}).get("containers", [])


def merge_patch(base: Any, patch: Any) -> Any:
    """Kustomize's patch merge for kinds it has no schema for: mappings merge, lists are replaced."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        out[key] = merge_patch(base[key], value) if key in base else copy.deepcopy(value)
    return out


def render_kustomization(directory: Path) -> list[dict]:
    """``kustomize build`` for the features used here: resources, patches (by path), images.

    Raises:
        ValueError: a patch matches no resource, or more than one (named by its file).
    """
    directory = Path(directory)
    kustomization = load_docs(directory / "kustomization.yaml")[0]
    docs: list[dict] = []
    for ref in kustomization.get("resources", []):
        target = directory / ref
        docs += render_kustomization(target) if target.is_dir() else load_docs(target)
    for patch_ref in kustomization.get("patches", []):
        for patch in load_docs(directory / patch_ref["path"]):
            ident = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == ident]
            if len(matches) != 1:
                raise ValueError(f"{directory / patch_ref['path']}: patch matches {len(matches)} resources")
            docs[matches[0]] = merge_patch(docs[matches[0]], patch)
    for image in kustomization.get("images", []):
        for spec in (s for doc in docs for s in ray_cluster_specs(doc)):
            for container in containers(spec):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def patch_files(root: Path) -> set[Path]:
    """Files that the kustomizations under ``root`` apply as patches (partial resources)."""
    out = set()
    for kustomization in Path(root).rglob("kustomization.yaml"):
        for patch in load_docs(kustomization)[0].get("patches", []):
            if "path" in patch:
                out.add((kustomization.parent / patch["path"]).resolve())
    return out


def validate_tree(root: Path, schemas: Schemas) -> list[str]:
    """Every manifest file under ``root`` (patches as partial), then every rendered kustomization."""
    root = Path(root)
    files = sorted({p.resolve() for p in ([root] if root.is_file() else root.rglob("*.yaml"))})
    patches = patch_files(root) if root.is_dir() else set()
    errors: list[str] = []
    for path in files:
        if path.name == "kustomization.yaml":
            rendered = render_kustomization(path.parent)
            errors += [e for doc in rendered for e in validate_document(doc, schemas, f"{path.parent} (rendered)")]
        else:
            errors += [e for doc in load_docs(path) for e in validate_document(doc, schemas, str(path),
                                                                                partial=path in patches)]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[REPO_ROOT / "k8s"])
    parser.add_argument("--crds", type=Path, default=DEFAULT_CRDS, help="folder of CRD YAML files")
    args = parser.parse_args(argv)
    schemas = crd_schemas(args.crds)
    errors = [e for path in args.paths for e in validate_tree(path, schemas)]
    print("\n".join(errors) if errors else f"ok: {', '.join(map(str, args.paths))}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
