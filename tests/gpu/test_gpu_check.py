"""benchmarks/gpu_check.sh's CPU dry run: every step of the GPU check (the checkpoint, the CUDA-marked tests,
the benchmark) on the CPU at sizes that take seconds, so that the script works when a GPU session comes."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": os.sys.executable,
                                                                            "OMP_NUM_THREADS": "2"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--preset", "tiny",
                          "--vae", "tiny", "--image-size", "32x32", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {name: step["exit"] for name, step in summary.items() if isinstance(step, dict)} == \
        {"checkpoint": "0", "tests": "0", "bench": "0"}
    suite = ET.parse(tmp_path / "tests.xml").getroot().find("testsuite")
    # every CUDA-marked test ran on the CPU but the Triton kernels inside a compiled step; none failed
    skipped = [case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None]
    assert int(suite.get("tests")) >= 6 and skipped == ["test_the_compiled_decode_step_gives_the_eager_tokens[triton]"]
    assert suite.get("failures") == suite.get("errors") == "0"
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["dtype"] == "bfloat16" and [row["requests"] for row in bench["chat"]] == [1, 4]
    assert all(row["decode_tok_s"] > 0 and row["greedy_same_as_transformers"] >= 0 for row in bench["chat"])
    assert "time_to_first_token_ms" in bench["chat"][0]
    assert [row["requests"] for row in bench["images"]] == [1, 2]
    assert all(row["engine_images_s"] > 0 and row["naive_images_s"] > 0 for row in bench["images"])
    assert bench["memory"]["weight_bytes"] > 0 and bench["memory"]["peak_rss_bytes"] > bench["memory"]["weight_bytes"]
