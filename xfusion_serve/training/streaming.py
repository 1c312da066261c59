"""Datasets that need not fit in memory: streamed with Hugging Face `datasets` from local paths, decoded by a
torch DataLoader's workers.

Three layouts, told apart by what the path holds (`dataset_kind`):
  folder       a folder with captions.jsonl ({"file", "caption"} lines, as FolderDataset), or with datasets'
               "imagefolder" metadata.jsonl ({"file_name", "caption" or "text"})
  parquet      a .parquet file or a folder of them: an image column ("image": datasets' Image struct or raw
               bytes) and a "caption" (or "text") column; files in name order
  webdataset   a .tar file or a folder of them: xxx.png / xxx.jpg / ... with xxx.txt or xxx.json ("caption"
               or "text"); tars in name order
A folder holding manifest.json is a latent cache (training/latent_cache.py), not a stream.

Each process reads its own share (datasets.distributed.split_dataset_by_node with RANK / WORLD_SIZE): whole
files where their number divides by WORLD_SIZE, else every WORLD_SIZE-th record. Records come in the order of
training/order.py; every DataLoader worker reads the (raw, undecoded) stream and decodes only the positions
that fall to it, one in num_workers, so the DataLoader's round robin gives the same order for any
num_workers (reading is repeated per worker, decoding is not).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError

from ..model.latents import images_to_tensor
from .order import ordered
from .parallel import rank_and_world

CACHE_MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
CAPTION_COLUMNS = ("caption", "text")
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


def dataset_kind(path: str | Path) -> str:
    """-> "folder", "imagefolder", "parquet", "webdataset" or "latent-cache" by what `path` holds.
    FileNotFoundError: nothing at `path`; ValueError: none of these (or Parquet and tar files together)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (a dataset: folder, Parquet, WebDataset tar "
                                "or latent cache)")
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.suffix == ".tar":
            return "webdataset"
        raise ValueError(f"{path}: not a dataset: a file must be .parquet or a WebDataset .tar")
    if (path / CACHE_MANIFEST).is_file():
        return "latent-cache"
    if (path / "captions.jsonl").is_file():
        return "folder"
    if (path / "metadata.jsonl").is_file():
        return "imagefolder"
    parquet, tars = _files(path, ".parquet"), _files(path, ".tar")
    if parquet and tars:
        raise ValueError(f"{path}: holds both .parquet and .tar files; one dataset is one format")
    if parquet:
        return "parquet"
    if tars:
        return "webdataset"
    raise ValueError(f"{path}: not a dataset: no captions.jsonl, metadata.jsonl, {CACHE_MANIFEST}, "
                     "*.parquet or *.tar in it")


class Stream:
    """One process's share of a streamed dataset. `records()` -> one pass in natural order, each record a dict
    {"key": str, "image": bytes or a file path (str), "caption": str}, nothing decoded."""

    def __init__(self, path: str | Path, rank: int | None = None, world: int | None = None):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.path = Path(path)
        self.kind = dataset_kind(self.path)
        env_rank, env_world = rank_and_world()
        self.rank, self.world = env_rank if rank is None else rank, env_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")
        if self.kind == "latent-cache":
            raise ValueError(f"{self.path}: a latent cache, not a stream of images (read it with "
                             "training.latent_cache.LatentCache)")
        load = dict(split="train", streaming=True)
        if self.kind == "folder":
            ds = datasets.load_dataset("json", data_files=[str(self.path / "captions.jsonl")], **load)
        elif self.kind == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=str(self.path), **load)
        else:
            files = [self.path] if self.path.is_file() else _files(self.path, SUFFIX[self.kind])
            ds = datasets.load_dataset(self.kind, data_files=[str(f) for f in files], **load)
        for name, feature in (ds.features or {}).items():  # raw bytes: decoding is the workers' job
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
        self.dataset = split_dataset_by_node(ds, rank=self.rank, world_size=self.world) if self.world > 1 else ds

    def records(self) -> Iterator[dict]:
        n = 0
        for batch in self.dataset.iter(batch_size=64):
            columns = list(batch)
            for i in range(len(batch[columns[0]]) if columns else 0):
                yield self._record({c: batch[c][i] for c in columns}, n)
                n += 1

    def _record(self, row: dict, n: int) -> dict:
        where = f"{self.path}: record {n} of rank {self.rank}"
        if self.kind == "folder":
            if not isinstance(row.get("file"), str) or row.get("caption") is None:
                raise ValueError(f"{where}: expected {{\"file\": ..., \"caption\": ...}}, got {sorted(row)}")
            return {"key": row["file"], "image": str(self.path / row["file"]), "caption": str(row["caption"])}
        if self.kind == "webdataset":
            key = str(row.get("__key__", n))
            image = next((row[e] for e in IMAGE_EXTENSIONS if row.get(e) is not None), None)
            caption = row.get("txt")
            if caption is None and isinstance(row.get("json"), dict):
                caption = next((row["json"][c] for c in CAPTION_COLUMNS if row["json"].get(c) is not None), None)
            where = f"{self.path}: sample {key!r}"
        else:
            key = str(n)
            image = row.get("image")
            caption = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
        if isinstance(image, dict):  # datasets' Image struct, undecoded
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, (bytes, str)) or caption is None:
            wds = self.kind == "webdataset"
            needs = (f"an image ({'/'.join(IMAGE_EXTENSIONS) if wds else 'column image'}) and a caption "
                     f"({'txt, or json with caption or text' if wds else 'column caption or text'})")
            raise ValueError(f"{where}: needs {needs}; it has {sorted(row)}")
        return {"key": key, "image": image, "caption": str(caption)}


def decode(record: dict, where: Path | str = "") -> Image.Image:
    """A record's image as RGB. ValueError (naming the record) where it is not an image."""
    source = io.BytesIO(record["image"]) if isinstance(record["image"], bytes) else record["image"]
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: record {record['key']!r}: not a readable image ({e})") from e


class PixelStream(torch.utils.data.IterableDataset):
    """Records of `stream` from position `start` on, in the order of training/order.py (seed, shuffle buffer),
    for `epochs` epochs or forever, each as {"position": int, "key": str, "caption": str,
    "pixels": [3, height, width] float32 in [-1, 1]} (images_to_tensor)."""

    def __init__(self, stream: Stream, height: int, width: int, *, seed: int = 0, buffer: int = 0, start: int = 0,
                 epochs: int | None = None):
        super().__init__()
        self.stream, self.size, self.seed, self.buffer = stream, (height, width), seed, buffer
        self.start, self.epochs = start, epochs

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (1, 0)
        for k, record in ordered(self.stream.records, self.seed, self.buffer, self.start, self.epochs):
            if (k - self.start) % workers == me:
                pixels = images_to_tensor([decode(record, self.stream.path)], *self.size)[0]
                yield {"position": k, "key": record["key"], "caption": record["caption"], "pixels": pixels}


def _worker_init(_: int) -> None:
    import fsspec.asyn

    fsspec.asyn.reset_lock()  # as datasets does in its own workers: a lock inherited through fork can hang


def pixel_loader(stream: Stream, height: int, width: int, *, seed: int = 0, buffer: int = 0, start: int = 0,
                 epochs: int | None = None, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over PixelStream(...) yielding its dicts one by one, in PixelStream's order whatever
    num_workers (0: decoded in this process). ValueError: num_workers < 0."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, not {num_workers}")
    data = PixelStream(stream, height, width, seed=seed, buffer=buffer, start=start, epochs=epochs)
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers,
                                       worker_init_fn=_worker_init if num_workers else None,
                                       prefetch_factor=4 if num_workers else None)
