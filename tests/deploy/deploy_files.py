"""What tests/deploy/test_docker.py and tests/deploy/test_kubernetes.py read: the Dockerfile, the compose file
and the manifests, parsed; the linters `make install` pins; and the settings `xfusion-serve serve` builds from an
environment, to check every setting those files name against the server itself."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from xfusion_serve import cli
from xfusion_serve.server import app as server_app

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
ENTRYPOINT = ["xfusion-serve", "serve"]


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
    the stages it derives from), its last stage's instructions and those of every stage it derives from."""
    args, stages = dockerfile()
    assert "VARIANT" in args, "the Dockerfile has no VARIANT build argument"
    args = {**args, "VARIANT": variant}
    by_name = {s["name"]: s for s in stages if s["name"]}

    def chain(stage: dict) -> list[dict]:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage["base"])
        return (chain(by_name[base]) if base in by_name else []) + [stage]

    final = stages[-1]
    out = {"env": {k: v for s in chain(final) for k, v in s["env"].items()}, "instructions": final["instructions"],
           "all_instructions": [i for s in chain(final) for i in s["instructions"]]}
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
    monkeypatch.setattr(server_app, "serve", lambda config: seen.setdefault("config", config))
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
