"""deploy/kubernetes: every manifest passes the API schemas, and every setting they name (environment
variables, ports, probe routes, the autoscaler's metric) is one the server really has, checked against the
server itself: its `serve` command line, the routes its app answers and a scrape of its /metrics."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from deploy_files import (
    ADAPTER_VALUES,
    K8S,
    check_environment,
    exported_metrics,
    healthcheck_start_period,
    image,
    kustomization,
    manifests,
    probe_seconds,
    serves,
    tool,
)


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
