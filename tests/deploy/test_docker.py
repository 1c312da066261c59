"""docker/: the Dockerfile passes hadolint, and every setting the image and the compose file name
(environment variables, ports, paths, the health check's route, Prometheus' scrape) is one the server really
has, checked against the server itself: its `serve` command line, its routes and a scrape of its /metrics."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    DOCKERFILE,
    DOCKERIGNORE,
    ENTRYPOINT,
    ROOT,
    check_environment,
    dockerfile,
    image,
    interpolate,
    serves,
    tool,
)

from xfusion_serve import EMBEDDED_CHECKPOINT
from xfusion_serve.server.state import ServerState

# ------------------------------------------------------------------------------------------ linters

def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ Dockerfile

@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_the_image_settings_exist_in_the_server(monkeypatch, app_client, variant):
    img = image(variant)
    config, _ = check_environment(monkeypatch, img["env"], f"Dockerfile ({variant})")
    assert json.loads(img["ENTRYPOINT"]) == ENTRYPOINT
    assert img["EXPOSE"].split("/")[0] == str(config.port), "EXPOSE is not the port the server listens on"
    assert config.host == "0.0.0.0", "a server bound to loopback cannot be reached from outside its container"
    assert config.checkpoint is None, "the image must default to the embedded checkpoint"
    assert config.engine.device.startswith("cuda" if variant == "gpu" else "cpu")
    if variant == "gpu":
        # not flash-attn until it has run on a GPU here (issue 19): the Triton kernels, whose decode reads only
        # each sequence's tokens of the CUDA graphs' whole-context tables
        assert config.engine.attention_backend == "triton"
        assert config.engine.compile_decode and config.engine.compile_denoise, "GPU steps run as CUDA graphs"
    else:  # the project's C++ decode attention, built for the host at start-up (needs g++, below)
        assert config.engine.attention_backend == "cpu"
    # torch.compile builds its kernels at start-up: Triton's launcher in C on GPU, C++ kernels on the CPU.
    runtime = " ".join(rest for k, rest in img["all_instructions"] if k == "RUN" and "apt-get install" in rest)
    assert "python3-dev" in runtime and ("gcc" if variant == "gpu" else "g++") in runtime

    check = img["HEALTHCHECK"]
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):(?:%s|\d+)(/[\w/-]*)", check)
    assert m, f"HEALTHCHECK does not request a local URL: {check}"
    assert m.group(1) == "/health" and serves(app_client, m.group(1)), "HEALTHCHECK must call the liveness route"
    fallback = re.search(r"XFUSION_PORT['\"]?,\s*['\"](\d+)", check)
    assert fallback and int(fallback.group(1)) == config.port, "HEALTHCHECK's port is not the server's"

    uid = img["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root UID (runAsNonRoot checks it)"
    home = img["env"].get("HOME")
    assert home and home != "/", "the image needs a real HOME for torch's and Triton's caches"
    assert re.search(rf"useradd\b[^&]*--uid {uid}\b[^&]*--home-dir {re.escape(home)}\b",
                     " ".join(rest for k, rest in img["instructions"] if k == "RUN")), \
        "the USER's UID must be a named user whose home is HOME"


def test_the_docker_context_holds_what_the_dockerfile_copies():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "the context is an allow-list: `*`, then the `!` exceptions"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in dockerfile()[1]:
        for keyword, rest in stage["instructions"]:
            if keyword == "COPY" and "--from" not in rest:
                for src in rest.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
                    assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


# ------------------------------------------------------------------------------------------ compose

def compose_servers() -> dict[str, dict]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: s for name, s in services.items()
            if (COMPOSE.parent / s.get("build", {}).get("context", ".") / s.get("build", {}).get(
                "dockerfile", "")).resolve() == DOCKERFILE}


@pytest.mark.parametrize("checkpoint_dir", [None, "/srv/my-checkpoint"])
def test_compose_settings_exist_in_the_server(monkeypatch, checkpoint_dir):
    servers = compose_servers()
    assert {s["build"]["args"]["VARIANT"] for s in servers.values()} == {"gpu", "cpu"}
    outer = {"CHECKPOINT_DIR": checkpoint_dir} if checkpoint_dir else {}
    for name, service in servers.items():
        variant = service["build"]["args"]["VARIANT"]
        env = {**image(variant)["env"],
               **{k: interpolate(str(v), outer) for k, v in service.get("environment", {}).items()}}
        config, _ = check_environment(monkeypatch, env, f"compose.yaml {name}")
        published = {int(p.split(":")[-1]) for p in service["ports"]}
        assert config.port in published, f"{name} publishes {published}, the server listens on {config.port}"
        # Which mount holds the checkpoint: the one whose source CHECKPOINT_DIR sets.
        probe = {"CHECKPOINT_DIR": "/probe"}
        targets = [interpolate(v, probe).split(":")[1] for v in service.get("volumes", [])
                   if interpolate(v, probe).split(":")[0] == "/probe"]
        assert len(targets) == 1, f"{name}: CHECKPOINT_DIR must be mounted exactly once"
        mounts = {m[1]: m for m in (interpolate(v, outer).split(":") for v in service["volumes"])}
        assert mounts[targets[0]][2:] == ["ro"], f"{name}: mount the checkpoint read-only"
        if checkpoint_dir:
            assert mounts[targets[0]][0] == checkpoint_dir
            assert config.checkpoint == targets[0], "the mounted checkpoint is not the one served"
        else:
            assert ServerState(config).checkpoint == EMBEDDED_CHECKPOINT, "no mount must mean the demo"
        grace = int(str(service["stop_grace_period"]).rstrip("s"))
        assert grace > config.drain_timeout, f"{name}: docker would kill the server mid-drain"
        if variant == "gpu":
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert any("gpu" in d.get("capabilities", []) for d in devices)


def test_compose_prometheus_scrapes_the_server(monkeypatch, app_client):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    config_file = (COMPOSE.parent / next(s for s, t in mounts.items() if t.endswith("prometheus.yml"))).resolve()
    jobs = yaml.safe_load(config_file.read_text())["scrape_configs"]
    targets = [(job.get("metrics_path", "/metrics"), t) for job in jobs for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets, "Prometheus scrapes nothing"
    for name, service in compose_servers().items():
        config, _ = check_environment(monkeypatch, image(service["build"]["args"]["VARIANT"])["env"], name)
        aliases = set(service["networks"]["default"]["aliases"]) | {name}
        assert any(serves(app_client, path) and host in aliases and int(port) == config.port
                   for path, t in targets for host, port in [t.split(":")]), f"nothing scrapes {name}"
