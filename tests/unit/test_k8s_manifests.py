"""Every KubeRay manifest in k8s/ validates against the CRD schemas, strictly.

The API server prunes fields a structural schema does not declare, so a misspelt field
(``rayStartParms``) is dropped without a word; ``kubectl apply --validate=strict`` rejects it.
cluster/validate_k8s.py does what strict validation does, offline (the unknown-field walk plus
jsonschema for types, enums and required fields); these tests run it over every file and
rendered overlay, prove it rejects a misspelt field, and check what the schema cannot: token
auth everywhere, credentials from Secrets, entrypoints that name real modules and configs, and
the RayService's Serve config equal to services/index/serve_config.yaml.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "kuberay-crds"
SERVE_CONFIG = REPO_ROOT / "services" / "index" / "serve_config.yaml"
TOP_LEVEL = ["ray-cluster.cpu.yaml", "ray-job.train-contrastive.yaml", "ray-job.train-preference.yaml",
             "ray-service.index.yaml"]
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images", "namespace", "namePrefix",
                      "nameSuffix", "labels", "commonAnnotations", "components", "configMapGenerator",
                      "secretGenerator", "replacements"}


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_k8s", REPO_ROOT / "cluster" / "validate_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vk = _load_validator()
load_docs, ray_cluster_specs, containers = vk.load_docs, vk.ray_cluster_specs, vk.containers
validate_document, unknown_fields = vk.validate_document, vk.unknown_fields


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is not present (CI and developers have ../shared beside the repo)")
    return vk.crd_schemas(CRD_DIR)


# ------------------------------------------------------------------------ the files in k8s/


def yaml_files() -> list[Path]:
    """Every YAML file under k8s/, symlinks resolved and counted once."""
    return sorted({path.resolve() for path in K8S_DIR.rglob("*.yaml")})


def kustomizations() -> dict[Path, dict]:
    return {p: load_docs(p)[0] for p in yaml_files() if p.name == "kustomization.yaml"}


def resource_docs() -> Iterator[tuple[str, dict]]:
    for path in yaml_files():
        if path.name != "kustomization.yaml":
            for doc in load_docs(path):
                yield str(path.relative_to(REPO_ROOT)), doc


def render_with_kubectl(overlay: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# ------------------------------------------------------------------------------------ tests


def test_layout_keeps_kuberay_names_at_top_level():
    """k8s/<name>.yaml are the base's files (symlinks), so `kubectl apply -f k8s/<name>` works."""
    for name in TOP_LEVEL:
        top = K8S_DIR / name
        assert top.exists(), f"k8s/{name} is missing"
        assert top.resolve() == (K8S_DIR / "base" / name).resolve(), f"k8s/{name} is not k8s/base/{name}"
    base = kustomizations()[(K8S_DIR / "base" / "kustomization.yaml").resolve()]
    assert sorted(base["resources"]) == sorted(TOP_LEVEL)


@pytest.mark.parametrize("path", [p for p in yaml_files() if p.name != "kustomization.yaml"],
                         ids=lambda p: str(p.relative_to(K8S_DIR)))
def test_every_manifest_validates_strictly(path: Path, schemas):
    partial = path in vk.patch_files(K8S_DIR)
    errors = []
    for doc in load_docs(path):
        errors += validate_document(doc, schemas, str(path.relative_to(REPO_ROOT)), partial=partial)
    assert not errors, "\n".join(errors)


def test_kustomizations_reference_existing_files():
    found = kustomizations()
    assert {p.parent.name for p in found} >= {"base", "cpu", "gpu"}
    for path, kustomization in found.items():
        assert kustomization.get("kind") == "Kustomization", f"{path}: kind is not Kustomization"
        unknown = set(kustomization) - KUSTOMIZATION_KEYS
        assert not unknown, f"{path}: unknown kustomize fields {sorted(unknown)}"
        refs = kustomization.get("resources", []) + [p["path"] for p in kustomization.get("patches", [])]
        for ref in refs:
            assert (path.parent / ref).exists(), f"{path}: {ref} does not exist"


def test_misspelt_field_in_a_copy_is_rejected_with_its_path(schemas):
    doc = load_docs(K8S_DIR / "ray-job.train-contrastive.yaml")[0]
    assert validate_document(doc, schemas, "copy") == []

    bad = copy.deepcopy(doc)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParms"] = head.pop("rayStartParams")
    head["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["nmae"] = "whetstone-s3"
    bad["spec"]["shutdownAfterJobFinish"] = True
    errors = "\n".join(validate_document(bad, schemas, "copy"))
    assert "spec.rayClusterSpec.headGroupSpec.rayStartParms: unknown field" in errors
    assert "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].envFrom[0].secretRef.nmae" in errors
    assert "spec.shutdownAfterJobFinish: unknown field" in errors

    # Type and enum errors come from the schema itself, also with their path.
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "three"
    wrong_type["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    errors = "\n".join(validate_document(wrong_type, schemas, "copy"))
    assert "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'three' is not of type 'integer'" in errors
    assert "spec.rayClusterSpec.authOptions.mode" in errors

    misspelt_metadata = copy.deepcopy(doc)
    misspelt_metadata["metadata"]["lables"] = {"a": "b"}
    assert any("metadata.lables" in e for e in validate_document(misspelt_metadata, schemas, "copy"))


def test_unknown_field_walk_honours_preserve_unknown_fields():
    schema = {
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"known": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
            "free": {"type": "object"},
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
            "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {}}}},
        },
    }
    doc = {"strict": {"a": "1", "b": 2}, "open": {"anything": 1, "known": {"x": 1, "y": 2}},
           "free": {"whatever": {"deep": 1}}, "items": [{"n": 1}, {"m": 2}], "map": {"k": {"v": 1, "w": 2}}}
    errors = unknown_fields(doc, schema)
    assert [e.split(":")[0] for e in errors] == ["strict.b", "open.known.y", "items[1].m", "map.k.w"]


def by_name(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


def test_python_render_matches_kubectl_kustomize():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed; the Python render stands alone")
    for overlay in ("cpu", "gpu"):
        directory = K8S_DIR / "overlays" / overlay
        assert by_name(vk.render_kustomization(directory)) == by_name(render_with_kubectl(directory)), overlay


def test_rendered_overlays_validate(schemas):
    for overlay in ("cpu", "gpu"):
        docs = vk.render_kustomization(K8S_DIR / "overlays" / overlay)
        assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob", "RayJob", "RayService"]
        errors = [e for d in docs for e in validate_document(d, schemas, f"overlays/{overlay}")]
        assert not errors, "\n".join(errors)
        gpu_groups = [g["groupName"] for d in docs for spec in ray_cluster_specs(d)
                      for g in spec.get("workerGroupSpecs", [])
                      if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                             for c in g["template"]["spec"]["containers"])]
        images = {c["image"] for d in docs for spec in ray_cluster_specs(d) for c in containers(spec)}
        if overlay == "cpu":
            assert gpu_groups == [] and images == {"whetstone:0.1.0-cpu"}
        else:
            assert len(gpu_groups) == 3 and images == {"whetstone:0.1.0-gpu"}


def test_token_auth_is_on_everywhere():
    clusters = 0
    for source, doc in resource_docs():
        for spec in ray_cluster_specs(doc):
            if "headGroupSpec" not in spec:
                continue  # a patch touching worker groups only keeps the base's authOptions
            clusters += 1
            assert spec.get("authOptions", {}).get("mode") == "token", f"{source}: authOptions.mode is not token"
            for container in containers(spec):
                for env in container.get("env", []):
                    assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token"), source
    assert clusters == len(TOP_LEVEL)


def test_storage_credentials_come_from_secrets():
    for source, doc in resource_docs():
        for spec in ray_cluster_specs(doc):
            for container in containers(spec):
                refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
                assert "whetstone-s3" in refs, f"{source}: {container['name']} has no envFrom secretRef whetstone-s3"
                for env in container.get("env", []):
                    secret_like = re.search(r"(^|_)(SECRET|TOKEN|PASSWORD|ACCESS_KEY)(_|$)", env["name"])
                    assert not (secret_like and "value" in env), f"{source}: {env['name']} is a literal"


def rayjobs() -> list[tuple[str, dict]]:
    return [(s, d) for s, d in resource_docs() if d.get("kind") == "RayJob" and "entrypoint" in d["spec"]]


@pytest.mark.parametrize("source,doc", rayjobs(), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_entrypoint_names_existing_module_and_config(source: str, doc: dict):
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"{source}: {argv[:3]}"
    assert argv[3] == "--config", f"{source}: the entrypoint must pass --config <file>"
    module, config, overrides = argv[2], argv[4], argv[5:]
    assert all("=" in o for o in overrides), f"{source}: overrides must be key=value: {overrides}"
    module_file = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert module_file.is_file(), f"{source}: {module_file.relative_to(REPO_ROOT)} does not exist"
    assert (REPO_ROOT / config).is_file(), f"{source}: {config} does not exist"
    # The config with the entrypoint's overrides must load as the job's own config model.
    import importlib

    from whetstone.config.base import StrictModel, load_config

    job = importlib.import_module(module)
    models = {v for k, v in vars(job).items() if isinstance(v, type) and issubclass(v, StrictModel)
              and k.endswith("JobConfig")}
    assert len(models) == 1, f"{module} must define one *JobConfig model to check the overrides against"
    load_config(models.pop(), REPO_ROOT / config, overrides)


def test_rayjob_runtime_env_matches_cluster_file():
    cluster_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (REPO_ROOT / "cluster" / "Dockerfile").read_text(), re.M)[-1]
    for source, doc in rayjobs():
        if "runtimeEnvYAML" not in doc["spec"]:
            continue
        runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == workdir, f"{source}: working_dir is not the image's {workdir}"
        assert runtime_env["env_vars"] == cluster_env["env_vars"], f"{source}: env_vars differ"


def ray_service() -> dict:
    return load_docs(K8S_DIR / "ray-service.index.yaml")[0]


def test_rayservice_serve_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    names = {app["name"]: app for app in config["applications"]}
    assert names["whetstone-index"]["route_prefix"] == "/index"
    assert names["whetstone-index"]["import_path"] == "services.index.app:build_app"
    try:
        from services.index.app import IndexServiceArgs
    except ImportError as err:
        pytest.skip(f"services.index.app is not importable yet: {err}")
    IndexServiceArgs.model_validate(names["whetstone-index"]["args"])


def test_rayservice_serve_config_uses_object_storage_and_no_secrets():
    """Replicas run on any pod: a relative path would name a different, empty folder on each."""
    config = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
    for app in config["applications"]:
        for key, value in app.get("args", {}).items():
            assert not re.search(r"token|secret", key, re.I), f"{app['name']}: {key} belongs in a Secret"
            if key.endswith("_uri"):
                assert str(value).startswith("s3://"), (
                    f"{app['name']}.args.{key}={value!r} is not an object-storage URI: set it in "
                    "services/index/serve_config.yaml, then run python cluster/sync_serve_config.py")


def test_rayservice_serve_config_equals_services_file():
    if not SERVE_CONFIG.is_file():
        pytest.skip(f"{SERVE_CONFIG.relative_to(REPO_ROOT)} does not exist yet (the index service's file)")
    embedded = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(SERVE_CONFIG.read_text()), (
        "serveConfigV2 differs from services/index/serve_config.yaml: run python cluster/sync_serve_config.py")


def test_ray_version_is_pinned_consistently():
    import ray

    versions = {spec["rayVersion"] for _, doc in resource_docs() for spec in ray_cluster_specs(doc)
                if "rayVersion" in spec}
    dockerfile = (REPO_ROOT / "cluster" / "Dockerfile").read_text()
    docker_pin = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert versions == {docker_pin} == {ray.__version__}


def test_validate_k8s_cli_flags_a_misspelt_copy(tmp_path: Path, schemas, capsys):
    good = (K8S_DIR / "ray-service.index.yaml").read_text()
    assert vk.main([str(K8S_DIR / "ray-service.index.yaml"), "--crds", str(CRD_DIR)]) == 0
    bad = tmp_path / "ray-service.index.yaml"
    bad.write_text(good.replace("  rayClusterDeletionDelaySeconds:", "  rayClusterDeletionDelaySecond:"))
    assert vk.main([str(bad), "--crds", str(CRD_DIR)]) == 1
    assert f"{bad}: spec.rayClusterDeletionDelaySecond: unknown field" in capsys.readouterr().out
