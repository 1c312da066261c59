"""docker/ and deploy/: the Dockerfile passes hadolint, every Kubernetes manifest passes the API schemas,
and every setting they name (environment variables, ports, paths, probe routes, the autoscaler's metric)
is one the server really has, checked against the server itself: its `serve` command line, the routes
its app answers and a scrape of its /metrics."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xfusion_serve import cli
from xfusion_serve import server as server_module
from xfusion_serve.server import DEFAULT_CHECKPOINT, ServerConfig, ServerState, create_app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
ENTRYPOINT = ["xfusion-serve", "serve"]


# ------------------------------------------------------------------------------------------ helpers

def tool(name: str) -> str:
    """A linter installed by `make install` (next to this interpreter), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make install` (the Makefile pins it)")
    return found


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def manifests() -> dict[str, dict]:
    """Every resource the kustomization applies, by kind."""
    out = {}
    for name in kustomization()["resources"]:
        for doc in load_yaml_docs(K8S / name):
            assert doc["kind"] not in out, f"two {doc['kind']} resources; the checks below expect one"
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def app_client():
    """The app without its lifespan: nothing is loaded, but every route answers (/ready with 503)."""
    from fastapi.testclient import TestClient

    return TestClient(create_app(ServerConfig()))


def serves(client, path: str) -> bool:
    """Whether the server has a GET route at `path` (probes and scrapes are GETs)."""
    return client.get(path).status_code not in (404, 405)


def exported_metrics(client) -> dict[str, str]:
    """Metric family -> type, as a scrape of /metrics reports them."""
    text = client.get("/metrics").text
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[dict]]:
    """-> (the global ARG defaults, the stages, each {name, base, env, instructions}). Comment lines
    inside continuations are dropped, as Docker drops them."""
    logical, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    args, stages = {}, []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        elif keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "env": {}, "instructions": []})
        else:
            stage = stages[-1]
            stage["instructions"].append((keyword, rest))
            if keyword == "ENV":
                for pair in shlex.split(rest):
                    key, sep, value = pair.partition("=")
                    assert sep, f"ENV {rest!r}: use KEY=value (the legacy `ENV KEY value` form is ambiguous)"
                    stage["env"][key] = value
    return args, stages


def dockerfile() -> tuple[dict[str, str], list[dict]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def image(variant: str) -> dict:
    """The final image of a build with --build-arg VARIANT=variant: its environment (inherited through
    the stages it derives from) and its last stage's instructions."""
    args, stages = dockerfile()
    assert "VARIANT" in args, "the Dockerfile has no VARIANT build argument"
    args = {**args, "VARIANT": variant}
    by_name = {s["name"]: s for s in stages if s["name"]}

    def env_of(stage: dict) -> dict:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage["base"])
        return {**(env_of(by_name[base]) if base in by_name else {}), **stage["env"]}

    final = stages[-1]
    out = {"env": env_of(final), "instructions": final["instructions"]}
    for keyword in ("EXPOSE", "USER", "ENTRYPOINT", "HEALTHCHECK"):
        values = [rest for k, rest in final["instructions"] if k == keyword]
        assert len(values) == 1, f"the final image stage needs exactly one {keyword}"
        out[keyword] = values[0]
    return out


def serve_config(monkeypatch, env: dict[str, str]):
    """Runs `xfusion-serve serve` with exactly this XFUSION_* environment, stopping where it would start
    the server: -> (the ServerConfig it built, the parsed options)."""
    for key in list(os.environ):
        if key.startswith("XFUSION_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}
    real_serve_command = cli._serve

    def spy(args):
        seen["args"] = args
        real_serve_command(args)

    monkeypatch.setattr(cli, "_serve", spy)
    monkeypatch.setattr(server_module, "serve", lambda config: seen.setdefault("config", config))
    assert cli.main(ENTRYPOINT[1:]) == 0, f"`xfusion-serve serve` refused the environment {env}"
    return seen["config"], seen["args"]


def check_environment(monkeypatch, env: dict[str, str], where: str):
    """Every XFUSION_* variable names a `serve` option and reaches it. -> (ServerConfig, options)."""
    config, args = serve_config(monkeypatch, env)
    options = {k for k in vars(args) if k not in ("command", "func")}
    for key, value in env.items():
        if not key.startswith("XFUSION_"):
            continue
        option = key[len("XFUSION_"):].lower()
        assert option in options, f"{where}: {key} is not a setting of `xfusion-serve serve` " \
                                  f"(it has {', '.join('XFUSION_' + o.upper() for o in sorted(options))})"
        got = getattr(args, option)
        got = ",".join(got) if isinstance(got, list) else got
        if value == "" and got is None:
            continue  # unset from the environment's point of view
        same = float(value) == float(got) if isinstance(got, (int, float)) else value == str(got)
        assert same, f"{where}: {key}={value!r} did not reach --{option.replace('_', '-')} (got {got!r})"
    return config, args


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:+replacement}; anything else is refused, not guessed."""

    def one(m: re.Match) -> str:
        name, op, word = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op is None:
            return value
        if op == ":-":
            return value or word
        if op == ":+":
            return word if value else ""
        raise AssertionError(f"compose.yaml: unsupported interpolation {m.group(0)!r}")

    out = re.sub(r"\$\{(\w+)(?:(:?[-+?])([^}]*))?\}", one, text)
    assert "$" not in out.replace("$$", ""), f"compose.yaml: uninterpolated {text!r}"
    return out


def probe_seconds(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def healthcheck_start_period() -> int:
    m = re.search(r"--start-period=(\d+)s", image("gpu")["HEALTHCHECK"])
    assert m, "HEALTHCHECK needs a --start-period in seconds, long enough for loading"
    return int(m.group(1))


# ------------------------------------------------------------------------------------------ linters

def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_manifest_passes_the_kubernetes_schemas_strictly():
    files = [str(K8S / name) for name in kustomization()["resources"]]
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True)
    output = result.stdout + result.stderr
    # A kind without a schema is a warning with exit status 0: nothing was validated, so it fails here.
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    assert output.count("passed") == len(files), output


def test_the_rendered_kustomization_passes_the_schemas(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; each manifest is validated on its own above")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(out)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered.stdout) if d}
    assert kinds == set(manifests()), kinds


def test_the_kustomization_applies_every_manifest_in_its_folder():
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"in the folder but not applied: {present - listed}; missing: {listed - present}"
    image_names = {i["name"] for i in kustomization().get("images", [])}
    containers = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {c["image"].split(":")[0] for c in containers} <= image_names, "the images: override misses"


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
        assert config.engine.attention_backend == "flash-attn"

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
            assert ServerState(config).checkpoint == DEFAULT_CHECKPOINT, "no mount must mean the demo"
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


# ------------------------------------------------------------------------------------------ Kubernetes

def deployment_env(container: dict, image_env: dict[str, str]) -> dict[str, str]:
    env = dict(image_env)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:  # from a Secret: stand in two keys, to see the comma-separated list reach the server
            assert "secretKeyRef" in var["valueFrom"], var
            env[var["name"]] = "test-key-1,test-key-2"
    return env


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return named[port]


def test_the_deployment_settings_exist_in_the_server(monkeypatch, app_client):
    res = manifests()
    pod = res["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    img = image("gpu")
    config, _ = check_environment(monkeypatch, deployment_env(container, img["env"]), "deployment.yaml")

    # Ports: the container's, the probes', the Service's and the scrape annotation's are the server's.
    assert [p["containerPort"] for p in container["ports"]] == [config.port]
    assert config.host == "0.0.0.0"
    for svc_port in res["Service"]["spec"]["ports"]:
        assert port_number(container, svc_port["targetPort"]) == config.port
    notes = pod["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == config.port and serves(app_client, notes["prometheus.io/path"])

    # Probes: real routes; liveness on /health, readiness on /ready; startup covers loading.
    probes = {kind: container[kind + "Probe"] for kind in ("startup", "liveness", "readiness")}
    for kind, probe in probes.items():
        path = probe["httpGet"]["path"]
        assert serves(app_client, path), f"{kind} probe: the server has no route {path}"
        assert port_number(container, probe["httpGet"]["port"]) == config.port
    assert probes["liveness"]["httpGet"]["path"] == "/health"
    assert probes["readiness"]["httpGet"]["path"] == "/ready"
    assert probe_seconds(probes["startup"]) >= healthcheck_start_period(), "startup shorter than loading"

    # The checkpoint: the PVC, read-only, mounted where XFUSION_CHECKPOINT points.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert config.checkpoint in mounts, f"XFUSION_CHECKPOINT={config.checkpoint} is not a mount"
    mount = mounts[config.checkpoint]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == res["PersistentVolumeClaim"]["metadata"]["name"] and mount["readOnly"]

    # API keys from a Secret reach the server as keys.
    assert config.api_keys == ["test-key-1", "test-key-2"]

    # Shutdown: preStop pause + the server's drain fit in the grace period.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep", pause
    assert int(pause[1]) + config.drain_timeout < spec["terminationGracePeriodSeconds"]

    # GPU, /dev/shm, and writable HOME and /tmp under a read-only root.
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1 and config.engine.device == "cuda"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        for path in (img["env"]["HOME"], "/tmp"):
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} must be writable"
    # Service links would inject variables that share the server's XFUSION_ prefix.
    assert spec["enableServiceLinks"] is False


def test_the_deployment_runs_restricted_as_the_image_user():
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert str(pod_sc["runAsUser"]) == image("gpu")["USER"].split(":")[0], "runAsUser is not the image's user"
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert "privileged" not in sc or sc["privileged"] is False


def test_service_budget_and_autoscaler_select_the_deployment():
    res = manifests()
    deploy = res["Deployment"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    for kind, selector in [("Service", res["Service"]["spec"]["selector"]),
                           ("PodDisruptionBudget", res["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
                           ("Deployment", deploy["spec"]["selector"]["matchLabels"])]:
        assert selector and selector.items() <= labels.items(), f"{kind} selects no pod of the Deployment"
    target = res["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert "replicas" not in deploy["spec"], "the autoscaler owns replicas; apply would reset them"


def test_the_autoscaler_metric_is_one_the_server_exports(app_client):
    hpa = manifests()["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", "a per-replica queue is a Pods metric (averaged over the replicas)"
    wanted = metric["pods"]["metric"]["name"]
    float(metric["pods"]["target"]["averageValue"])  # a plain number of waiting requests

    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    serving = [r for r in rules if r["name"].get("as", r["seriesQuery"].split("{")[0]) == wanted]
    assert len(serving) == 1, f"no prometheus-adapter rule publishes {wanted}"
    rule = serving[0]
    series = re.match(r"['\"]?([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    assert re.search(rule["name"]["matches"], series), "the rule's name.matches misses its series"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a Pods metric maps namespace and pod"

    exported = exported_metrics(app_client)
    assert series in exported, f"the server exports no {series} (it has {sorted(exported)})"
    assert exported[series] == "gauge", "an autoscaler averages a level, not a counter"
    assert series.endswith("num_requests_waiting"), "scale on the queue of waiting requests"
    # The gauge has a series per task label: a pod's queue is their sum, grouped by pod.
    assert re.fullmatch(r"sum\(<<\.Series>>\{<<\.LabelMatchers>>\}\) by \(<<\.GroupBy>>\)",
                        rule["metricsQuery"].strip()), rule["metricsQuery"]
