"""SampleSources (trainer.py) for data that does not fit in memory: a streamed image dataset, encoded with the
checkpoint's VAE as it goes, and a latent cache, read without the VAE. Both build samples with
trainer.sample_from, as CaptionSamples does, and visit records in the order of training/order.py.

For one process, the k-th sample of the run (k = step * batch_size + j) is the same record, with the same
noise, t and caption dropout, from a folder in memory (CaptionSamples), the same data streamed, or its latent
cache, whether a step's batch is asked for at once or in micro-batches. Under torchrun each process reads only
its own share of the data (streaming.py), in that share's order: its m-th place of the global batch of step s
(place rank + m * world) takes the share's record at position s * (its places per step) + m.
"""

from __future__ import annotations

import torch

from ..model.checkpoint import Checkpoint
from ..model.latents import encode_pixels
from .latent_cache import LatentCache
from .order import ordered
from .parallel import rank_and_world
from .streaming import Stream, dataset_kind, pixel_loader
from .trainer import SampleSource, TrainConfig, sample_from


class _Sequential:
    """Records of a process's share taken in order: the iterator `open_at(position)` opens is reopened
    (skipping) only where a call asks for another position than the next, as at a resumed run's first step."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, open_at):
        self.share = range(rank, cfg.batch_size, world)  # this process's places in every global batch
        self.open_at, self.it, self.position = open_at, None, None

    def take(self, step: int, indices: range) -> list[dict]:
        """The records for places `indices` of the global batch of `step`: a contiguous part of this process's
        share (all of it, or one micro-batch), at positions step * len(share) + their rank in the share.
        ValueError: places that are not."""
        first = indices[0] - self.share.start
        if first < 0 or first % self.share.step or \
                list(indices) != list(self.share[first // self.share.step:][:len(indices)]):
            raise ValueError(f"places {list(indices)} of the batch are not a run of this process's "
                             f"{list(self.share)}")
        start = step * len(self.share) + first // self.share.step
        if self.it is None or self.position != start:
            self.it, self.position = iter(self.open_at(start)), start
        items = [next(self.it) for _ in indices]
        self.position += len(indices)
        return items


class StreamSamples:
    """The paper's recipe (sample_from) on a streamed dataset (streaming.py; default: cfg.dataset), decoded by
    cfg.num_workers DataLoader workers and encoded with the checkpoint's VAE, one batch at a time."""

    def __init__(self, cfg: TrainConfig, path: str | None = None):
        self.cfg, self.stream = cfg, Stream(path or cfg.dataset)

    def prepare(self, ckpt: Checkpoint, height: int, width: int, show_progress: bool) -> None:
        if ckpt.vae is None:
            raise ValueError("a streamed dataset of images needs the checkpoint's VAE: load it with load_vae=True")
        self.vae, self.tokenizer = ckpt.vae, ckpt.tokenizer
        self.records = _Sequential(self.cfg, self.stream.rank, self.stream.world, lambda start: pixel_loader(
            self.stream, height, width, seed=self.cfg.seed, buffer=self.cfg.shuffle_buffer_for(None), start=start,
            num_workers=self.cfg.num_workers))

    def batch(self, step: int, indices: range) -> list[dict]:
        if not len(indices):
            return []
        items = self.records.take(step, indices)
        latents = encode_pixels(self.vae, torch.stack([it["pixels"] for it in items])).cpu()
        return [sample_from(self.cfg, step, j, latents[m], items[m]["caption"], self.tokenizer)
                for m, j in enumerate(indices)]


class CacheSamples:
    """The paper's recipe (sample_from) on a latent cache (latent_cache.py; default: cfg.dataset): no VAE runs.
    `prepare` raises ValueError where the cache was encoded by another VAE or at another size."""

    def __init__(self, cfg: TrainConfig, path: str | None = None):
        self.cfg, self.cache = cfg, LatentCache(path or cfg.dataset)
        self.rank, self.world = rank_and_world()

    def prepare(self, ckpt: Checkpoint, height: int, width: int, show_progress: bool) -> None:
        self.cache.check(ckpt.vae_dir, height, width)
        self.tokenizer = ckpt.tokenizer
        buffer = self.cfg.shuffle_buffer_for(None)
        self.records = _Sequential(self.cfg, self.rank, self.world, lambda start: (record for _, record in ordered(
            lambda: self.cache.records(self.rank, self.world), self.cfg.seed, buffer, start)))

    def batch(self, step: int, indices: range) -> list[dict]:
        if not len(indices):
            return []
        items = self.records.take(step, indices)
        return [sample_from(self.cfg, step, j, items[m]["latent"], items[m]["caption"], self.tokenizer)
                for m, j in enumerate(indices)]


def source_for(cfg: TrainConfig) -> SampleSource | None:
    """The source `xfusion-serve train` reads cfg.dataset with: CacheSamples for a latent cache, StreamSamples
    for Parquet, WebDataset and imagefolder data (and a captions.jsonl folder with cfg.stream); None where the
    trainer's in-memory CaptionSamples reads it (a captions.jsonl folder). FileNotFoundError / ValueError: no
    dataset there (streaming.dataset_kind)."""
    kind = dataset_kind(cfg.dataset)
    if kind == "latent-cache":
        return CacheSamples(cfg)
    if kind == "folder" and not cfg.stream:
        return None
    return StreamSamples(cfg)
