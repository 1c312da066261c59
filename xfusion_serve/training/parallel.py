"""How the trainer spreads over processes: one process, DDP, or FSDP2 (`fully_shard`), with mixed precision and
activation checkpointing per layer.

FSDP2 shards every decoder block of both towers as its own unit (a text block's frozen weights too: at rest
each process holds 1/world of them, gathered for a block's forward), and the rest (embeddings, the vision
tower's patch, time and output layers) with the root. The optimizer then only ever sees this process's shard
of the trainable parameters: sharded fp32 master weights and optimizer state (ZeRO-3; the paper trained with
DeepSpeed ZeRO stage 2). With bf16, blocks compute in bf16 and gradients are reduced in fp32
(MixedPrecisionPolicy, as torch's FSDP2 tutorial sets it).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.checkpoint import Checkpoint, CheckpointError, weight_files
from ..model.xfusion import XFusionModel

SHARDINGS = ("auto", "fsdp", "ddp")


@dataclass(frozen=True)
class World:
    """This process's place: rank of size, on device."""

    rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment, as torchrun sets them; (0, 1) without."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_world(device: str) -> World:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or none for one process.
    device: "auto" (cuda if any), "cpu", "cuda". NCCL on CUDA, gloo on the CPU."""
    rank, size = rank_and_world()
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)


def leave_world(world: World) -> None:
    if world.distributed:
        dist.barrier()
        dist.destroy_process_group()


def checkpoint_blocks(model: XFusionModel) -> None:
    """Activation checkpointing per decoder block, both towers: a block's activations are recomputed in the
    backward pass instead of kept (torch.utils.checkpoint, non-reentrant). Same gradients, less memory."""
    for block in [*model.text.model.layers, *model.vision.layers]:
        serve = block.serve_rows

        def checkpointed(*args, _serve=serve):
            if not torch.is_grad_enabled():
                return _serve(*args)
            return checkpoint(_serve, *args, use_reentrant=False)

        block.serve_rows = checkpointed


def distribute(step: nn.Module, model: XFusionModel, world: World, sharding: str, bf16: bool,
               whole: list[nn.Module] = ()) -> nn.Module:
    """step (a module whose forward computes the losses over `model`) made ready for `world` -> the module to
    call. sharding: "auto" (FSDP2 with more than one process), "fsdp" or "ddp"; one process: step itself.
    whole: frozen modules inside step that FSDP2 leaves unsharded on every process (the VAE, an image encoder:
    used outside the forward too, and never trained). Raises ValueError for another sharding, RuntimeError for
    a torch whose FSDP2 lacks what this needs."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, not {sharding!r}")
    if not world.distributed:
        return step
    if sharding == "ddp":
        # A rank's share may hold no generation sample (no velocity head used): DDP must not wait for it.
        return nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        raise RuntimeError(f"FSDP2 sharding needs a torch whose FSDPModule has set_reduce_scatter_unused_params "
                           f"(this is {torch.__version__}); use --sharding ddp")
    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for block in [*model.text.model.layers, *model.vision.layers]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(block, "serve_rows")  # the model calls blocks through it, not forward
    fully_shard(step, mesh=mesh, mp_policy=mp, ignored_params={p for m in whole for p in m.parameters()})
    step.set_reduce_scatter_unused_params(True)  # as find_unused_parameters: every rank reduces every shard
    return step


@torch.no_grad()
def load_shards(model: XFusionModel, ckpt: Checkpoint, world: World) -> None:
    """Fills a model sharded on the meta device (`distribute` on a `load_checkpoint(..., load_weights=False)`
    model) with the checkpoint's weights, each process reading only its own rows of each tensor from the
    safetensors files (FSDP2 shards dim 0 as torch.chunk does: ceil(n / world) rows a process): no process ever
    holds the whole model, at load as after. Raises CheckpointError for a missing or mis-shaped tensor."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    model.to_empty(device=world.device)
    where = {}
    for tower, files in weight_files(ckpt).items():
        for file in files:
            with safe_open(file, framework="pt") as fh:
                where.update({f"{tower}.{key}": (file, key) for key in fh.keys()})
    for name, param in model.named_parameters():
        if name not in where:
            files = sorted({str(f) for f, _ in where.values()})
            raise CheckpointError(f"{ckpt.path}: no tensor for parameter {name!r} in {files}")
        file, key = where[name]
        with safe_open(file, framework="pt") as fh:
            rows = fh.get_slice(key)
            shape = tuple(rows.get_shape())
            if shape != tuple(param.shape):
                raise CheckpointError(f"{file}: {key!r} has shape {shape}, the model expects {tuple(param.shape)}")
            local = param.to_local() if isinstance(param, DTensor) else param.data
            start = min(shape[0], world.rank * math.ceil(shape[0] / world.size)) if isinstance(param, DTensor) else 0
            local.copy_(rows[start:start + local.shape[0]])
    model.tables_to(world.device)


def gradient_sync(runner: nn.Module, last: bool):
    """A context for one micro-batch's backward: gradients are reduced across processes only on the last
    micro-batch of a step (DDP's no_sync, FSDP2's set_requires_gradient_sync); elsewhere they accumulate."""
    if isinstance(runner, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else runner.no_sync()
    if hasattr(runner, "set_requires_gradient_sync"):
        runner.set_requires_gradient_sync(last)
    return contextlib.nullcontext()
