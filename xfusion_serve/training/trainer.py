"""The paper's training recipe (X-Fusion, section 5): the vision tower learns, the text tower stays frozen.

loss = lambda_AR * next-token loss (captioning samples) + lambda_DM * flow-matching loss (generation samples).
Every random draw of a sample is seeded by (seed, step, index in the global batch), so one process or
several under torchrun (DDP) see the same batch and reach the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..model import prompts
from ..model.checkpoint import Checkpoint, load_checkpoint, save_vision_tower
from ..model.config import CONFIG_FILE
from ..model.sequence import ImageSegment, pad_sequences, padded_forward
from ..model.xfusion import XFusionModel
from .datasets import CaptionDataset, FolderDataset, encode_dataset
from .order import record_at
from .samples import noised_target

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    checkpoint: str
    out: str
    # a folder holding captions.jsonl; "shapes": the demo's world, captions only; "shapes-tasks": its
    # conversation tasks (the CLI opens both)
    dataset: str = "shapes"
    shapes_size: int = 20000  # images drawn from the shapes world
    data_seed: int = 0
    image_size: tuple[int, int] | None = None  # (height, width); default: the checkpoint's first trained size
    steps: int = 1000
    batch_size: int = 64  # global, over all processes
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # or "cosine" (to 10% at the end)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lambda_ar: float = 0.2
    lambda_dm: float = 1.0
    generation_ratio: float = 2 / 3  # generation : captioning = 2 : 1
    caption_dropout: float = 0.1  # generation samples with an empty prompt, for classifier-free guidance
    caption_max_noise: float = 0.0  # captioning images are clean (t = 0) unless this is > 0: t ~ U(0, max)
    timestep_mean: float = 0.0  # SD3's logit-normal: t = sigmoid(N(mean, std))
    timestep_std: float = 1.0
    instructions: list[str] = field(default_factory=lambda: ["", "Describe the image.", "What is in this picture?"])
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16"
    seed: int = 0
    save_every: int = 500
    log_every: int = 10  # steps between lines of OUT/train_log.jsonl and progress-bar updates
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    # Feature alignment (X-Fusion section 7, finding iii; REPA), off unless align_encoder names a local
    # transformers vision model directory (CLIP, SigLIP or DINOv2): the vision tower's hidden states of an
    # image's tokens after block `align_layer` (counted from 1: 1 = the first block's output) are projected
    # by a small MLP and pulled towards the frozen encoder's patch features; loss += align_weight * that.
    align_encoder: str | None = None
    align_layer: int = 2
    align_weight: float = 0.5
    # The order of records (training/order.py): a seeded shuffle buffer of this many records per epoch.
    shuffle_buffer: int = 10000
    # Streamed datasets (training/streaming.py): DataLoader worker processes decoding images (0: in process);
    # `stream` reads a captions.jsonl folder as a stream too (Parquet, WebDataset and latent caches always are).
    num_workers: int = 2
    stream: bool = False

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if not 0.0 <= self.generation_ratio <= 1.0 or not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("generation_ratio and caption_dropout must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.align_encoder is not None and not Path(self.align_encoder).is_dir():
            raise FileNotFoundError(f"align_encoder: no model directory at {self.align_encoder}")
        if isinstance(self.align_layer, bool) or not isinstance(self.align_layer, int) or self.align_layer < 1:
            raise ValueError(f"align_layer counts vision blocks from 1 (1 = the first block's output), "
                             f"not {self.align_layer!r}")
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise ValueError(f"align_weight must be a finite number >= 0, not {self.align_weight!r}")


class TrainStep(nn.Module):
    """One micro-batch -> summed losses. A module of its own so that DDP wraps everything that trains."""

    def __init__(self, model: XFusionModel):
        super().__init__()
        self.model = model

    def forward(self, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        seqs = [model.embed_sequence(s["segments"]) for s in batch]
        dev = seqs[0].embeds.device
        out = padded_forward(model, *pad_sequences(seqs))

        ar, dm = out.new_zeros(()).float(), out.new_zeros(()).float()
        for b, (s, seq) in enumerate(zip(batch, seqs)):
            if "velocity" in s:  # generation: flow matching on the last image's tokens (those before: the prompt's)
                sl = seq.image_slices[-1]
                v = model.velocity(out[b, sl][None], *s["velocity"].shape[-2:])[0]
                dm = dm + F.mse_loss(v.float(), s["velocity"].to(dev))
            if s.get("targets"):  # captioning: next-token loss on the answer
                start = len(seq.positions) - len(s["targets"])
                logits = model.text.logits(out[b, start - 1 : len(seq.positions) - 1]).float()
                ar = ar + F.cross_entropy(logits, torch.tensor(s["targets"], device=dev), reduction="sum")
        return ar, dm


def make_sample(cfg: TrainConfig, step: int, j: int, latents: torch.Tensor, captions: list[str], tokenizer) -> dict:
    """Sample j of the global batch at `step` from in-memory records (latents [N, C, h, w], N captions): the
    record at the run's position step * cfg.batch_size + j (training/order.py), then `sample_from`."""
    i = record_at(step * cfg.batch_size + j, len(latents), cfg.seed, cfg.shuffle_buffer)
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
            "targets": answer}


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
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATE_FILE))


def _save(model: XFusionModel, opt, cfg: TrainConfig, step: int) -> None:
    out = Path(cfg.out)
    tmp = out / ".saving"
    tmp.mkdir(exist_ok=True)
    save_vision_tower(model, tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": asdict(cfg)}, tmp / STATE_FILE)
    for name in ("vision_tower.safetensors", STATE_FILE):  # rename is atomic: a crash never leaves half a file
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def train(cfg: TrainConfig, data: CaptionDataset | None = None, samples: SampleSource | None = None) -> Path:
    """Trains the vision tower of cfg.checkpoint on `samples` (default: CaptionSamples of `data`, itself by
    default the folder cfg.dataset names) and writes a servable checkpoint to cfg.out. -> cfg.out. Raises
    ValueError for "shapes" or "shapes-tasks" without data or samples: the shapes world belongs to the demo,
    which builds them (as `xfusion-serve train` does)."""
    if data is None and samples is None:
        if cfg.dataset in ("shapes", "shapes-tasks"):
            raise ValueError(f'dataset "{cfg.dataset}" is the demo\'s: pass data=ShapesDataset(...) from '
                             "xfusion_serve.demo.data or samples=TaskSamples(cfg) from "
                             "xfusion_serve.demo.task_samples, or train with `xfusion-serve train`")
        data = FolderDataset(cfg.dataset)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        _prepare_out(cfg)
    if world > 1:
        dist.barrier()
    resume = cfg.resume and (Path(cfg.out) / STATE_FILE).exists()
    ckpt = load_checkpoint(cfg.out if resume else cfg.checkpoint, device=device)
    model = ckpt.model.train()
    height, width = cfg.image_size or ckpt.config.image_sizes[0]

    samples = samples or CaptionSamples(cfg, data)
    samples.prepare(ckpt, height, width, show_progress=cfg.progress and rank == 0)
    ckpt.vae = None  # kept by the source if it encodes as it goes

    step_fn = TrainStep(model)
    # A rank's share may hold no generation sample (no velocity head used): DDP must not wait for it.
    runner = nn.parallel.DistributedDataParallel(step_fn, find_unused_parameters=True) if world > 1 else step_fn
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start = 0
    if resume:
        state = torch.load(Path(cfg.out) / STATE_FILE, map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (cfg.progress and rank == 0), mininterval=2)
    for step in bar:
        batch = samples.batch(step, range(rank, cfg.batch_size, world))
        counts = torch.tensor([sum("velocity" in s for s in batch), sum(len(s.get("targets", [])) for s in batch)],
                              dtype=torch.float32, device=device)
        if world > 1:
            dist.all_reduce(counts)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            ar_sum, dm_sum = runner(batch)
        # Normalised by the global counts and scaled by the world size: DDP's mean of gradients is then
        # exactly the gradient of the global-batch loss.
        ar, dm = ar_sum / counts[1].clamp(min=1), dm_sum / counts[0].clamp(min=1)
        loss = (cfg.lambda_ar * ar + cfg.lambda_dm * dm) * world
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step + 1 == cfg.steps:
            stats = torch.stack([ar.detach(), dm.detach()]).float()
            if world > 1:
                dist.all_reduce(stats)  # each rank holds its share of the global mean
            row = {"step": step, "ar": stats[0].item(), "dm": stats[1].item(), "lr": lr_at(cfg, step)}
            bar.set_postfix(ar=f"{row['ar']:.3f}", dm=f"{row['dm']:.3f}", lr=f"{row['lr']:.2e}")
            if rank == 0:
                with open(Path(cfg.out) / LOG_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save(model, opt, cfg, step + 1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return Path(cfg.out)
