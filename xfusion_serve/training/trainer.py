"""The paper's training recipe (X-Fusion, section 5): the vision tower learns, the text tower stays frozen.

loss = lambda_AR * next-token loss (captioning samples) + lambda_DM * flow-matching loss (generation samples).
Every random draw of a sample is seeded by (seed, step, index in the global batch), so one process or
several under torchrun (FSDP2 or DDP: training/parallel.py), in one batch or in micro-batches, see the same
batch and reach the same weights.
"""

from __future__ import annotations

import gc
import json
import math
import random
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..model import prompts
from ..model.checkpoint import Checkpoint, load_checkpoint
from ..model.config import CONFIG_FILE
from ..model.sequence import ImageSegment
from .alignment import FeatureAlignment
from .config import TrainConfig
from .datasets import CaptionDataset, FolderDataset, encode_dataset
from .evaluation import Evaluator, due, evaluate
from .losses import TrainStep
from .order import record_at
from .parallel import (World, checkpoint_blocks, distribute, gradient_sync, join_world, leave_world,
                       load_shards)
from .samples import noised_target
from .saving import check_resumable, export_vision_tower, has_state, load_state, save_state

LOG_FILE = "train_log.jsonl"


def make_sample(cfg: TrainConfig, step: int, j: int, latents: torch.Tensor, captions: list[str], tokenizer) -> dict:
    """Sample j of the global batch at `step` from in-memory records (latents [N, C, h, w], N captions): the
    record at the run's position step * cfg.batch_size + j (training/order.py), then `sample_from`."""
    i = record_at(step * cfg.batch_size + j, len(latents), cfg.seed, cfg.shuffle_buffer_for(len(latents)))
    return sample_from(cfg, step, j, latents[i], captions[i], tokenizer)


def sample_from(cfg: TrainConfig, step: int, j: int, x0: torch.Tensor, caption: str, tokenizer) -> dict:
    """Sample j of the global batch at `step` from its record: x0 [C, h, w] float32 (scaled latents) and its
    caption. Generation or captioning, noise, t and caption dropout are drawn from the seed (cfg.seed, step, j),
    whatever source the record came from."""
    rng = random.Random(f"{cfg.seed}:{step}:{j}")
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    noise = torch.randn(x0.shape, generator=gen)
    if rng.random() < cfg.generation_ratio:
        t = torch.sigmoid(torch.randn((), generator=gen) * cfg.timestep_std + cfg.timestep_mean).item()
        prompt = "" if rng.random() < cfg.caption_dropout else caption
        return noised_target([prompts.generation_prompt(tokenizer, prompt)], x0, noise, t)
    t = rng.uniform(0.0, cfg.caption_max_noise) if cfg.caption_max_noise > 0 else 0.0
    answer = prompts.encode(tokenizer, caption) + [tokenizer.eos_token_id]
    instruction = prompts.caption_instruction(tokenizer, rng.choice(cfg.instructions))
    return {"segments": [prompts.caption_prefix(tokenizer), ImageSegment((1 - t) * x0 + t * noise, t),
                         instruction + answer],
            "targets": answer, "x0": x0}


class SampleSource(Protocol):
    """Where a run's samples come from. `prepare` runs once before the first step with the loaded checkpoint
    (to encode a dataset with its VAE, say; the trainer drops its own reference to the VAE afterwards);
    `batch(step, indices)` -> the samples at those places of the global batch of `step`, each drawn from its
    own seed, so that every process and every resume sees the same ones. A sample is a dict for TrainStep:
    "segments", and "targets" (token ids ending the sequence) and/or "velocity" (the last image's)."""

    def prepare(self, ckpt: Checkpoint, height: int, width: int, show_progress: bool) -> None: ...

    def batch(self, step: int, indices: range) -> list[dict]: ...


class CaptionSamples:
    """The paper's recipe on (image, caption) pairs (make_sample); latents encoded once, in `prepare`. Records
    come in the order of training/order.py, as from a stream of the same data in one process."""

    def __init__(self, cfg: TrainConfig, data: CaptionDataset):
        self.cfg, self.data = cfg, data

    def prepare(self, ckpt: Checkpoint, height: int, width: int, show_progress: bool) -> None:
        self.latents = encode_dataset(ckpt.vae, self.data, height, width, show_progress=show_progress)
        self.captions, self.tokenizer = self.data.captions(), ckpt.tokenizer

    def batch(self, step: int, indices: range) -> list[dict]:
        return [make_sample(self.cfg, step, j, self.latents, self.captions, self.tokenizer) for j in indices]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
    return cfg.lr


def _prepare_out(cfg: TrainConfig) -> None:
    """The output is a servable checkpoint: the input's files (text tower byte for byte), then our vision tower."""
    src, out = Path(cfg.checkpoint).resolve(), Path(cfg.out).resolve()
    if src != out and not (out / CONFIG_FILE).exists():
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("trainer_state*"))


def _micro_batches(cfg: TrainConfig, world: World) -> list[range]:
    """This process's places in the global batch (every world.size-th), cut into cfg.grad_accum micro-batches.
    Raises ValueError unless batch_size is a multiple of processes x grad_accum."""
    if cfg.batch_size % (world.size * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum "
                         f"({world.size} x {cfg.grad_accum})")
    mine = range(world.rank, cfg.batch_size, world.size)
    n = len(mine) // cfg.grad_accum
    return [mine[m * n:(m + 1) * n] for m in range(cfg.grad_accum)]


def _all_sum(values: list[float], world: World) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t)
    return t


def train(cfg: TrainConfig, data: CaptionDataset | None = None, samples: SampleSource | None = None,
          evaluator: Evaluator | None = None) -> Path:
    """Trains the vision tower of cfg.checkpoint on `samples` (default: CaptionSamples of `data`, itself by
    default the folder cfg.dataset names) and writes a servable checkpoint to cfg.out. -> cfg.out. Raises
    ValueError for "shapes" or "shapes-tasks" without data or samples: the shapes world belongs to the demo,
    which builds them (as `xfusion-serve train` does); ValueError for a batch that does not split evenly, or
    for cfg.eval_every without an `evaluator` (training/evaluation.py: run every eval_every steps).

    Under torchrun each process trains on its share of every global batch (training/parallel.py: FSDP2 or DDP);
    the gradient of a step is that of the global batch's loss, whatever the processes and micro-batches."""
    if data is None and samples is None:
        if cfg.dataset in ("shapes", "shapes-tasks"):
            raise ValueError(f'dataset "{cfg.dataset}" is the demo\'s: pass data=ShapesDataset(...) from '
                             "xfusion_serve.demo.data or samples=TaskSamples(cfg) from "
                             "xfusion_serve.demo.task_samples, or train with `xfusion-serve train`")
        data = FolderDataset(cfg.dataset)
    if cfg.eval_every and evaluator is None:
        raise ValueError("eval_every needs an evaluator: pass train(..., evaluator=...), or --eval-prompts to "
                         "`xfusion-serve train`")
    if cfg.resume:
        check_resumable(cfg.out, asdict(cfg))
    world = join_world(cfg.device)
    try:
        _train(cfg, world, data, samples, evaluator)
    finally:
        # FSDP's state keeps gloo's work objects in reference cycles; collected at interpreter exit they abort
        # the process (SIGABRT, "terminate called without an active exception", about 1 run in 10 here):
        # collected now, while the interpreter and the process group live.
        gc.collect()
    leave_world(world)
    return Path(cfg.out)


def _train(cfg: TrainConfig, world: World, data: CaptionDataset | None, samples: SampleSource | None,
           evaluator: Evaluator | None) -> None:
    """train()'s steps, in a frame of their own: everything that holds the model is freed when it returns."""
    micro = _micro_batches(cfg, world)
    if world.rank == 0:
        _prepare_out(cfg)
    if world.distributed:
        dist.barrier()
    sharded = world.distributed and cfg.sharding != "ddp"  # FSDP2: each process reads only its shard
    ckpt = load_checkpoint(cfg.checkpoint, device=world.device, load_weights=not sharded)
    model = ckpt.model.train()
    height, width = cfg.image_size or ckpt.config.image_sizes[0]
    samples = samples or CaptionSamples(cfg, data)
    samples.prepare(ckpt, height, width, show_progress=cfg.progress and world.rank == 0)
    vae, ckpt.vae = ckpt.vae if cfg.align_encoder else None, None  # a source that encodes as it goes kept its own

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and world.device.type == "cuda")
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    alignment = None
    if cfg.align_encoder:
        alignment = FeatureAlignment(cfg.align_encoder, model.text_config.hidden_size, seed=cfg.seed).to(world.device)
    step_fn = TrainStep(model, alignment, cfg.align_layer, vae if alignment else None)
    runner = distribute(step_fn, model, world, cfg.sharding, bf16, whole=step_fn.frozen_helpers())
    if sharded:
        load_shards(model, ckpt, world)
    params = [p for p in step_fn.parameters() if p.requires_grad]  # the vision tower (and the alignment's MLP)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start, tokens = load_state(runner, opt, cfg.out) if cfg.resume and has_state(cfg.out) else (0, 0)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", unit="step",
               disable=not (cfg.progress and world.rank == 0), mininterval=2)
    clock, trained = time.perf_counter(), 0
    for step in bar:
        try:
            batches, failure = [samples.batch(step, part) for part in micro], None
        except Exception as e:  # noqa: BLE001 - raised below on every process, none left waiting for the others
            batches, failure = [[] for _ in micro], e
        # Normalised by the global counts and scaled by the world size: the mean of gradients over processes
        # (DDP, FSDP2) summed over micro-batches is then exactly the gradient of the global batch's loss.
        counts = _all_sum([sum("velocity" in s for b in batches for s in b),
                           sum(len(s.get("targets", [])) for b in batches for s in b),
                           sum(_length(s, model.config.patch_size) for b in batches for s in b),
                           sum(any(isinstance(g, ImageSegment) for g in s["segments"]) for b in batches for s in b),
                           float(failure is not None)], world)
        if counts[4] > 0:
            raise failure or RuntimeError(f"another process could not read its data at step {step}; see its error")
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        ar_total, dm_total, align_total = 0.0, 0.0, 0.0
        for m, batch in enumerate(batches):
            with gradient_sync(runner, last=m == len(batches) - 1), \
                    torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=bf16):
                sums = runner(batch)
                ar, dm = sums.ar / counts[1].clamp(min=1).float(), sums.dm / counts[0].clamp(min=1).float()
                align = sums.align / counts[3].clamp(min=1).float()
                ((cfg.lambda_ar * ar + cfg.lambda_dm * dm + cfg.align_weight * align) * world.size).backward()
            ar_total, dm_total = ar_total + ar.detach(), dm_total + dm.detach()
            align_total = align_total + align.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens, trained = tokens + int(counts[2]), trained + int(counts[2])
        done = step + 1 == cfg.steps or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)
        evaluating = evaluator is not None and due(step, cfg.eval_every, done)
        logged = step % cfg.log_every == 0 or step + 1 == cfg.steps
        if logged or evaluating:
            stats = _all_sum([float(ar_total), float(dm_total), float(align_total)], world)  # shares of each
            now = time.perf_counter()
            row = {"step": step, "ar": stats[0].item(), "dm": stats[1].item(), "lr": lr_at(cfg, step),
                   **({"align": stats[2].item()} if alignment else {}),
                   "tokens": tokens, "tok_s": round(trained / max(now - clock, 1e-9), 1),
                   "peak_memory_gib": round(_peak_memory(world) / 2**30, 3)}
            bar.set_postfix(ar=f"{row['ar']:.3f}", dm=f"{row['dm']:.3f}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{row['tok_s']:.0f}")
            if logged and world.rank == 0:
                with open(Path(cfg.out) / LOG_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if evaluating:
            losses = {k: row[k] for k in ("ar", "dm", "align") if k in row}
            evaluate(runner, model, evaluator, step + 1, losses, cfg.out, world.rank, world.device)
        if (step + 1) % cfg.save_every == 0 or done:
            save_state(runner, opt, cfg.out, {"step": step + 1, "tokens": tokens, "config": asdict(cfg)}, world.rank)
            export_vision_tower(runner, cfg.out, world.rank)
        if done:
            break



def _peak_memory(world: World) -> float:
    """The largest peak over the processes, in bytes: CUDA memory allocated on a GPU, resident memory (RSS)
    on the CPU."""
    if world.device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(world.device))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    t = torch.tensor([peak], dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _length(sample: dict, patch: int) -> int:
    """Tokens of a sample's sequence: its text tokens, and its images' patches with <boi> and <eoi>."""
    return sum(seg.latent.shape[-2] // patch * (seg.latent.shape[-1] // patch) + 2
               if isinstance(seg, ImageSegment) else len(seg) for seg in sample["segments"])
