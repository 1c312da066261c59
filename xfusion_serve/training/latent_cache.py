"""A latent cache: a dataset's VAE latents and captions, encoded once (`xfusion-serve encode-latents`), then read
by training without running the VAE.

DIR/manifest.json    {"format": "xfusion-latent-cache", "version": 1, "vae": sha256 of the VAE's files,
                      "dataset": the source's path, "image_size": [h, w] (pixels), "latent_shape": [C, h/f, w/f],
                      "dtype": "float32" or "bfloat16", "shard_size": records per shard,
                      "shards": [{"file", "count"}, ...] (written so far), "count": records, "complete": bool}
DIR/shard-NNNNN.safetensors   tensor "latents" [count, C, h/f, w/f] (scaled, as model.latents.encode_images
                      returns them, stored in the manifest's dtype); metadata "captions": a JSON list of count strings
Records are the source's natural order (one process, training/streaming.py), shard after shard. A shard and the
manifest are written to a temporary name, then renamed (os.replace): a crash never leaves half of one, and a
rerun skips the shards the manifest lists and writes the rest, byte for byte as a straight run would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..model.config import VAEInfo, XFusionConfig, resolve_component
from ..model.latents import encode_pixels
from .streaming import CACHE_MANIFEST, Stream, pixel_loader

log = logging.getLogger(__name__)
FORMAT, VERSION = "xfusion-latent-cache", 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def vae_identity(vae_dir: str | Path) -> str:
    """sha256 over a VAE directory's config.json and weight files (names and bytes): where it lies is not part
    of it."""
    vae_dir, h = Path(vae_dir), hashlib.sha256()
    files = sorted(p for p in vae_dir.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_manifest(out: Path, manifest: dict) -> None:
    _write_atomic(out / CACHE_MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))


def _write_shard(out: Path, index: int, items: list[dict], vae, batch_size: int, dtype: str) -> dict:
    """Encodes one shard's records in batches that start at the shard's start (a rerun batches them alike)."""
    latents = torch.cat([encode_pixels(vae, torch.stack([it["pixels"] for it in items[i : i + batch_size]])).cpu()
                         for i in range(0, len(items), batch_size)])
    name = f"shard-{index:05d}.safetensors"
    metadata = {"captions": json.dumps([it["caption"] for it in items])}
    _write_atomic(out / name, lambda p: save_file({"latents": latents.to(DTYPES[dtype]).contiguous()}, p,
                                                  metadata=metadata))
    return {"file": name, "count": len(items)}


def encode_latents(checkpoint: str | Path, dataset: str | Path, out: str | Path, *,
                   image_size: tuple[int, int] | None = None, shard_size: int = 1024, batch_size: int = 32,
                   dtype: str = "float32", num_workers: int = 0, device: str = "cpu",
                   show_progress: bool = True) -> Path:
    """Writes the latent cache of `dataset` (any layout of training/streaming.py, all of it, in its natural
    order) encoded by `checkpoint`'s VAE at image_size (height, width; default the checkpoint's first trained
    size) to `out`, or finishes one a former run left. -> out. ValueError: bad sizes or dtype, a dataset with no
    records, or `out` holding a cache of another VAE, dataset, size, dtype or shard size; FileNotFoundError: no
    dataset; CheckpointError: no VAE."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, not {shard_size} and {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    checkpoint, out = Path(checkpoint), Path(out)
    config = XFusionConfig.load(checkpoint)
    vae_dir = resolve_component(checkpoint, config.vae, "VAE")
    height, width = image_size or config.image_sizes[0]
    stream = Stream(dataset, rank=0, world=1)
    head = {"format": FORMAT, "version": VERSION, "vae": vae_identity(vae_dir),
            "dataset": str(Path(dataset).resolve()), "image_size": [height, width],
            "latent_shape": list(VAEInfo.from_dir(vae_dir).latent_shape(height, width)), "dtype": dtype,
            "shard_size": shard_size}
    manifest = {**head, "shards": [], "count": 0, "complete": False}
    if (out / CACHE_MANIFEST).is_file():
        old = json.loads((out / CACHE_MANIFEST).read_text())
        differ = [k for k in head if old.get(k) != head[k]]
        if differ:
            raise ValueError(f"{out}: holds a latent cache with another {', '.join(differ)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in differ)}); write to another folder")
        manifest = old
        if manifest["complete"]:
            log.info("%s: complete already (%d records)", out, manifest["count"])
            return out
    out.mkdir(parents=True, exist_ok=True)
    shards = [s for s in manifest["shards"] if (out / s["file"]).is_file()]
    if len(shards) != len(manifest["shards"]):
        raise ValueError(f"{out}: {CACHE_MANIFEST} lists shards that are missing; write to another folder")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    start = len(shards) * shard_size
    if start:
        log.info("%s: %d shards done, resuming at record %d", out, len(shards), start)
    pending: list[dict] = []
    loader = pixel_loader(stream, height, width, start=start, epochs=1, num_workers=num_workers)
    for item in tqdm(loader, desc="encode-latents", initial=start, disable=not show_progress, mininterval=5):
        pending.append(item)
        if len(pending) == shard_size:
            shards.append(_write_shard(out, len(shards), pending, vae, batch_size, dtype))
            pending = []
            _write_manifest(out, {**manifest, "shards": shards, "count": sum(s["count"] for s in shards)})
    if pending:
        shards.append(_write_shard(out, len(shards), pending, vae, batch_size, dtype))
    if not shards:
        raise ValueError(f"{dataset}: no records")
    _write_manifest(out, {**manifest, "shards": shards, "count": sum(s["count"] for s in shards), "complete": True})
    return out


class LatentCache:
    """A complete latent cache (above), read shard by shard. FileNotFoundError: no manifest; ValueError: not a
    latent cache, or an incomplete one (rerun encode-latents)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        file = self.path / CACHE_MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing; a latent cache is written by `xfusion-serve encode-latents`")
        try:
            self.manifest = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not JSON ({e})") from e
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{file}: not a latent cache of format {FORMAT} version {VERSION}")
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.path}: an incomplete latent cache ({len(self.manifest['shards'])} shards "
                             "written); rerun encode-latents to finish it")
        self.shards, self.count = self.manifest["shards"], self.manifest["count"]

    def check(self, vae_dir: str | Path, height: int, width: int) -> None:
        """ValueError unless the cache was encoded by this VAE at height x width."""
        if list(self.manifest["image_size"]) != [height, width]:
            raise ValueError(f"{self.path}: encoded at {self.manifest['image_size'][0]}x"
                             f"{self.manifest['image_size'][1]} (height x width), training at {height}x{width}")
        if self.manifest["vae"] != vae_identity(vae_dir):
            raise ValueError(f"{self.path}: encoded by another VAE than {vae_dir}")

    def shard(self, i: int) -> tuple[torch.Tensor, list[str]]:
        """Shard i -> (latents [n, C, h, w] float32, n captions)."""
        with safe_open(self.path / self.shards[i]["file"], "pt") as f:
            return f.get_tensor("latents").float(), json.loads(f.metadata()["captions"])

    def records(self, rank: int = 0, world: int = 1) -> Iterator[dict]:
        """One pass over a rank's share in natural order, as datasets splits a stream: whole shards (i % world ==
        rank) where their number divides by world, else every world-th record. Each {"key", "latent" [C, h, w]
        float32, "caption"}."""
        whole = len(self.shards) % world == 0
        n = 0
        for i in range(rank if whole else 0, len(self.shards), world if whole else 1):
            latents, captions = self.shard(i)
            for m, (latent, caption) in enumerate(zip(latents, captions)):
                if whole or n % world == rank:
                    yield {"key": f"{self.shards[i]['file']}:{m}", "latent": latent, "caption": caption}
                n += 1
