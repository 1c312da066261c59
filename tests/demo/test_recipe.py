"""The demo recipe's one command, end to end with tiny settings (about a minute): every stage runs, the anneal
stage's weights are what it ships, and its manifest holds."""

from __future__ import annotations

import json

from xfusion_serve.demo.recipe import ANNEAL_LR, MANIFEST, main, sha256_files


def test_the_recipe_runs_end_to_end_and_ships_the_annealed_weights(tmp_path):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--seed", "3", "--llm-steps", "2", "--vae-steps", "2", "--train-steps", "2",
                 "--anneal-steps", "2", "--batch-size", "4", "--eval-samples", "2", "--eval-tasks", "1"]) == 0
    work = tmp_path / "demo.work"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sha256"] == sha256_files(out)
    shipped = (out / "vision_tower.safetensors").read_bytes()
    assert shipped == (work / "annealed" / "vision_tower.safetensors").read_bytes()
    assert shipped != (work / "trained" / "vision_tower.safetensors").read_bytes()  # the anneal did train
    anneal, first = manifest["anneal_config"], manifest["train_config"]
    assert (anneal["steps"], anneal["lr"], anneal["data_seed"]) == (2, ANNEAL_LR, 4)  # fresh samples: seed + 1
    assert (first["steps"], first["data_seed"]) == (2, 3)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 0, 1]  # both stages' logs, in order
    assert set(manifest["seconds"]) >= {"llm_s", "vae_s", "train_s", "anneal_s", "eval_s", "total_s"}
    assert set(manifest["figures"]) >= {"captioning", "generation", "tasks"}
