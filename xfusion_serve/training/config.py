"""The configuration of a training run (`xfusion-serve train`: one option per field), checked when made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .parallel import SHARDINGS

STREAM_SHUFFLE_BUFFER = 10000  # records a stream mixes over, by default (training/order.py)


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
    # At scale (training/parallel.py): batch_size stays the global batch, split over processes, then over
    # grad_accum micro-batches each; "auto" sharding is FSDP2 with more than one process.
    grad_accum: int = 1
    sharding: str = "auto"  # "auto", "fsdp" or "ddp"
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass
    max_tokens: int | None = None  # stop once this many tokens (all processes) were trained on
    eval_every: int = 0  # steps between evaluations (training/evaluation.py; 0: none); `train` needs an evaluator
    eval_prompts: list[str] = field(default_factory=list)  # what `xfusion-serve train`'s evaluator draws
    # Feature alignment (X-Fusion section 7, finding iii; REPA), off unless align_encoder names a local
    # transformers vision model directory (CLIP, SigLIP or DINOv2): the vision tower's hidden states of an
    # image's tokens after block `align_layer` (counted from 1: 1 = the first block's output) are projected
    # by a small MLP and pulled towards the frozen encoder's patch features; loss += align_weight * that.
    align_encoder: str | None = None
    align_layer: int = 2
    align_weight: float = 0.5
    # The order of records (training/order.py): a seeded shuffle buffer of this many records per epoch. None:
    # data in memory is drawn in a full permutation each epoch, a stream through STREAM_SHUFFLE_BUFFER records.
    shuffle_buffer: int | None = None
    # Streamed datasets (training/streaming.py): DataLoader worker processes decoding images (0: in process);
    # `stream` reads a captions.jsonl folder as a stream too (Parquet, WebDataset and latent caches always are).
    num_workers: int = 2
    stream: bool = False

    def shuffle_buffer_for(self, records: int | None) -> int:
        """The shuffle buffer of a source of `records` records in memory (None: a stream)."""
        if self.shuffle_buffer is not None:
            return self.shuffle_buffer
        return records if records is not None else STREAM_SHUFFLE_BUFFER

    def __post_init__(self):
        if self.shuffle_buffer is not None and self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, not {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {self.num_workers}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if not 0.0 <= self.generation_ratio <= 1.0 or not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("generation_ratio and caption_dropout must lie in [0, 1]")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be positive")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, not {self.sharding!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 (no evaluation) or positive, not {self.eval_every}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, not {self.max_tokens}")
        if self.align_encoder is not None and not Path(self.align_encoder).is_dir():
            raise FileNotFoundError(f"align_encoder: no model directory at {self.align_encoder}")
        if isinstance(self.align_layer, bool) or not isinstance(self.align_layer, int) or self.align_layer < 1:
            raise ValueError(f"align_layer counts vision blocks from 1 (1 = the first block's output), "
                             f"not {self.align_layer!r}")
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise ValueError(f"align_weight must be a finite number >= 0, not {self.align_weight!r}")
