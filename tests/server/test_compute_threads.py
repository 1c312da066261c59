"""How many threads torch computes with in a serving process: the policy (state.compute_threads), the option
that reaches it from the command line and the environment, and what a served process reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import free_port

from xfusion_serve import EMBEDDED_CHECKPOINT, EngineConfig
from xfusion_serve.engine.config import COMPILE_DECODE_ON_CPU_FROM
from xfusion_serve.model.checkpoint import text_tower_parameters
from xfusion_serve.server.state import ServerConfig, compute_threads, engine_cores


SMALL, LARGE = COMPILE_DECODE_ON_CPU_FROM - 1, COMPILE_DECODE_ON_CPU_FROM


@pytest.mark.parametrize("cores, expected", [({0}, 1), ({0, 1}, 1), ({0, 1, 2, 3}, 3), (set(range(16)), 15)])
def test_a_small_model_keeps_one_usable_core_for_the_api(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert compute_threads(ServerConfig(), SMALL, environ={}) == expected


def test_a_large_model_computes_on_every_core(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert compute_threads(ServerConfig(), LARGE, environ={}) is None


def test_an_explicit_count_or_the_operators_omp_num_threads_wins_and_a_gpu_keeps_torchs_choice(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert compute_threads(ServerConfig(compute_threads=4), SMALL, environ={"OMP_NUM_THREADS": "2"}) == 4
    assert compute_threads(ServerConfig(compute_threads=1), LARGE, environ={}) == 1
    assert compute_threads(ServerConfig(), SMALL, environ={"OMP_NUM_THREADS": "2"}) is None
    assert compute_threads(ServerConfig(engine=EngineConfig(device="cuda")), SMALL, environ={}) is None
    assert compute_threads(ServerConfig(engine=EngineConfig(device="cpu")), SMALL, environ={"OMP_NUM_THREADS": ""}) == 3


def test_the_text_towers_size_is_read_from_its_config_alone(random_checkpoint_dir):
    from xfusion_serve import load_checkpoint

    expected = sum(p.numel() for p in load_checkpoint(random_checkpoint_dir).model.text.parameters())
    assert text_tower_parameters(random_checkpoint_dir) == expected
    assert text_tower_parameters(EMBEDDED_CHECKPOINT) < COMPILE_DECODE_ON_CPU_FROM  # the demo is a small model


@pytest.mark.parametrize("bad", [0, -2])
def test_a_count_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="compute_threads"):
        ServerConfig(compute_threads=bad)


def test_a_served_process_computes_with_the_count_it_was_given_and_says_so(random_checkpoint_dir):
    """`serve --threads N` sets torch's threads in the serving process (where the engine computes), and
    /metrics reports it. N is neither torch's own default (at most the cores) nor this policy's."""
    want = (os.cpu_count() or 1) + 1
    port, env = free_port(), {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen([sys.executable, "-m", "xfusion_serve.cli", "serve", "--checkpoint",
                             str(random_checkpoint_dir), "--port", str(port), "--block-size", "4", "--threads",
                             str(want)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited before it was ready"
            time.sleep(0.1)
        else:
            pytest.fail("the server was not ready after 60 s")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("xfusion_compute_threads "))
        assert float(line.split()[1]) == want
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("cores, threads, expected", [
    ({0, 1}, 1, (1,)),  # the demo on this machine: the API server keeps core 0
    (set(range(16)), 15, tuple(range(1, 16))),
    ({0, 3, 5, 8}, 2, (5, 8)),  # the usable cores of a container, not 0..n-1
    ({0, 1}, 2, None),  # no core left to the API server: nothing to keep apart
    ({0, 1, 2, 3}, 8, None),
    ({0}, 1, None),
])
def test_the_engine_process_computes_on_the_cores_its_threads_leave_the_api(monkeypatch, cores, threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert engine_cores(ServerConfig(), threads) == expected


def test_the_engine_is_not_pinned_when_asked_not_to_on_a_thread_or_on_a_gpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert engine_cores(ServerConfig(), 2) == (2, 3)
    assert engine_cores(ServerConfig(pin_engine=False), 2) is None
    assert engine_cores(ServerConfig(engine_process=False), 2) is None
    assert engine_cores(ServerConfig(engine=EngineConfig(device="cuda")), 2) is None


def served_configs(monkeypatch, *argvs: list[str]) -> list[ServerConfig]:
    """The ServerConfig that `xfusion-serve serve ARGV` would serve, for each argv (serve itself replaced)."""
    from xfusion_serve import cli

    seen = []
    monkeypatch.setattr("xfusion_serve.server.app.serve", seen.append)
    for argv in argvs:
        cli.main(["serve", *argv])
    return seen


def test_pinning_is_on_by_default_and_the_option_and_environment_turn_it_off(monkeypatch):
    monkeypatch.delenv("XFUSION_PIN_ENGINE", raising=False)
    default, off = served_configs(monkeypatch, [], ["--no-pin-engine"])
    monkeypatch.setenv("XFUSION_PIN_ENGINE", "false")
    (from_env,) = served_configs(monkeypatch, [])
    assert (default.pin_engine, off.pin_engine, from_env.pin_engine) == (True, False, False)


def test_a_server_compiles_the_decode_step_of_every_model_unless_told_not_to(monkeypatch):
    monkeypatch.delenv("XFUSION_COMPILE_DECODE", raising=False)
    seen = served_configs(monkeypatch, [], ["--no-compile-decode"])
    assert (seen[0].engine.compile_decode, seen[0].engine.compile_decode_from) == (None, 0)  # chosen: may fall back
    assert seen[1].engine.compile_decode is False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs a core to leave the API server")
def test_a_pinned_server_runs_its_own_threads_off_the_engines_cores_and_gives_them_back(random_checkpoint_dir):
    """The engine process computes on the cores engine_cores gives it; every thread of the API process (the
    event loop, the engine process's reader and sender, the test client's) goes on the others while it serves,
    and gets its cores back when the server closes."""
    from fastapi.testclient import TestClient

    from xfusion_serve.server.app import create_app

    def cores_of_every_thread() -> set[frozenset]:
        seen = set()
        for t in os.listdir("/proc/self/task"):
            try:
                seen.add(frozenset(os.sched_getaffinity(int(t))))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        return seen

    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    torch.set_num_threads(1)  # as `serve` sets it for a small model (compute_threads): a core left to the API
    try:
        app = create_app(ServerConfig(checkpoint=str(random_checkpoint_dir), engine=EngineConfig(block_size=4)))
        with TestClient(app) as client:
            engine = app.state.server.engine
            assert engine.spec.cores == (max(before),)
            assert os.sched_getaffinity(engine._proc.pid) == {max(before)}
            assert cores_of_every_thread() == {frozenset(before - {max(before)})}
            assert client.post("/v1/completions", json={"prompt": "a red", "max_tokens": 4}).status_code == 200
        assert cores_of_every_thread() == {frozenset(before)}
    finally:
        torch.set_num_threads(threads)
