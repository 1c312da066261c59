"""What a training run writes: the servable vision tower, and the state to resume from.

The state (trainable weights and optimizer, each process its own shard under FSDP2) is saved with
torch.distributed.checkpoint (DCP) into `trainer_state.<step>/`, then `trainer_state.json` is replaced to point
at it (an atomic rename: a crash mid-save leaves the previous state in force); older states are removed. The
vision tower is gathered whole on rank 0 and written as `vision_tower.safetensors`, the file the server loads,
by a rename too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..model.checkpoint import VISION_TOWER_FILE

STATE_POINTER = "trainer_state.json"
VISION_PREFIX = "model.vision."  # the vision tower's parameters inside TrainStep


def has_state(out: str | Path) -> bool:
    return (Path(out) / STATE_POINTER).is_file()


def remove_state(out: str | Path) -> None:
    """Drops the resumable state (for a checkpoint that is only to be served)."""
    out = Path(out)
    (out / STATE_POINTER).unlink(missing_ok=True)
    for old in out.glob("trainer_state.*"):
        if old.is_dir():
            shutil.rmtree(old)


def save_state(step_module: nn.Module, opt: torch.optim.Optimizer, out: str | Path, progress: dict,
               rank: int) -> None:
    """Every process saves its shard of the trainable weights and optimizer state (collective); progress:
    {"step": steps done, "tokens": tokens trained on, ...}, kept beside it for `load_state`."""
    out, step = Path(out), progress["step"]
    model_sd, optim_sd = get_state_dict(step_module, opt, options=StateDictOptions(ignore_frozen_params=True))
    name = f"trainer_state.{step}"
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / name))
    _barrier()
    if rank == 0:
        tmp = out / (STATE_POINTER + ".tmp")
        tmp.write_text(json.dumps(progress | {"dir": name}, indent=1) + "\n")
        os.replace(tmp, out / STATE_POINTER)
        for old in out.glob("trainer_state.*"):
            if old.is_dir() and old.name != name:
                shutil.rmtree(old)
    _barrier()


# What a resumed run must share with the run that saved, for the resumed one to be its continuation: the
# model, the data and its order, the batch, and what trains.
RESUME_FIELDS = ("dataset", "shapes_size", "data_seed", "seed", "batch_size", "shuffle_buffer",
                 "image_size", "align_encoder", "align_layer")


def check_resumable(out: str | Path, config: dict) -> None:
    """ValueError, naming what differs, unless `out` holds a state saved by a run with the same RESUME_FIELDS
    as `config` (a TrainConfig as a dict); also for an older xfusion-serve's trainer_state.pt."""
    out = Path(out)
    if not (out / STATE_POINTER).is_file():
        if (out / "trainer_state.pt").is_file():
            raise ValueError(f"{out}: trainer_state.pt is an older xfusion-serve's state, which this one cannot "
                             "resume; train into a new output")
        return
    saved = json.loads((out / STATE_POINTER).read_text()).get("config", {})
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON keeps tuples as lists
    differ = [f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in RESUME_FIELDS
              if norm(saved.get(k)) != norm(config.get(k))]
    if differ:
        raise ValueError(f"{out}: --resume would not continue the saved run ({'; '.join(differ)}); use the same "
                         "settings or a new output")


def load_state(step_module: nn.Module, opt: torch.optim.Optimizer, out: str | Path) -> tuple[int, int]:
    """Restores the trainable weights and optimizer state saved in `out` (collective) -> (steps done, tokens
    trained on). Raises FileNotFoundError when there is none."""
    pointer = Path(out) / STATE_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer}: no training state to resume from")
    saved = json.loads(pointer.read_text())
    model_sd, optim_sd = get_state_dict(step_module, opt, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(out) / saved["dir"]))
    # dcp.load fails on a key the saved state lacks; the frozen text tower is simply not part of it
    set_state_dict(step_module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return int(saved["step"]), int(saved.get("tokens", 0))


def export_vision_tower(step_module: nn.Module, out: str | Path, rank: int) -> None:
    """The vision tower gathered whole (collective) and written by rank 0 as the servable
    vision_tower.safetensors (float32 master weights, names as `save_vision_tower` writes them)."""
    full = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                      ignore_frozen_params=True))
    if rank == 0:
        tower = {k[len(VISION_PREFIX):]: v.detach().contiguous().cpu() for k, v in full.items()
                 if k.startswith(VISION_PREFIX)}
        tmp = Path(out) / (VISION_TOWER_FILE + ".tmp")
        save_file(tower, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, Path(out) / VISION_TOWER_FILE)
    _barrier()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
