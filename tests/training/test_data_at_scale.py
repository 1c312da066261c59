"""Data that does not fit in memory: streamed folders, Parquet and WebDataset, and the latent cache, all giving
the in-memory path's samples for one seed (training/order.py); resumes, ranks and clear errors."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import file_bytes
from PIL import Image

from xfusion_serve import ImageSegment, load_checkpoint
from xfusion_serve.cli import main as cli
from xfusion_serve.training import latent_cache
from xfusion_serve.training.datasets import FolderDataset, encode_dataset
from xfusion_serve.training.latent_cache import LatentCache, encode_latents
from xfusion_serve.training.order import epoch_order
from xfusion_serve.training.sources import CacheSamples, StreamSamples
from xfusion_serve.training.streaming import Stream, dataset_kind
from xfusion_serve.training.trainer import LOG_FILE, CaptionSamples, TrainConfig

CAPTIONS = ["a small red circle", "a large green square", "the small blue triangle", "a large red square",
            "the small green circle", "a large blue triangle"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)  # 20x20: resized to 16x16
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, index: str = "captions.jsonl", file_key: str = "file"):
    """The images and a JSONL naming them: ours (captions.jsonl, "file") or datasets' imagefolder
    (metadata.jsonl, "file_name")."""
    root.mkdir()
    for i in range(len(CAPTIONS)):
        (root / f"{i}.png").write_bytes(_png(i))
    (root / index).write_text("".join(json.dumps({file_key: f"{i}.png", "caption": c}) + "\n"
                                      for i, c in enumerate(CAPTIONS)))
    return root


def make_parquet(root, files: int = 2):
    root.mkdir()
    per = math.ceil(len(CAPTIONS) / files)
    for f in range(files):
        rows = range(f * per, min(len(CAPTIONS), (f + 1) * per))
        pq.write_table(pa.table({"image": [_png(i) for i in rows], "caption": [CAPTIONS[i] for i in rows]}),
                       root / f"part-{f}.parquet")
    return root


def make_imagefolder(root):
    return make_folder(root, "metadata.jsonl", "file_name")


def make_webdataset(root, files: int = 2, json_captions: bool = False):
    root.mkdir()
    per = math.ceil(len(CAPTIONS) / files)
    for f in range(files):
        with tarfile.open(root / f"shard-{f}.tar", "w") as tar:
            for i in range(f * per, min(len(CAPTIONS), (f + 1) * per)):
                caption = (f"{i:04d}.json", json.dumps({"caption": CAPTIONS[i]}).encode()) if json_captions else (
                    f"{i:04d}.txt", CAPTIONS[i].encode())
                for name, data in ((f"{i:04d}.png", _png(i)), caption):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


MAKERS = {"folder": make_folder, "parquet": make_parquet, "webdataset": make_webdataset,
          "imagefolder": make_imagefolder, "webdataset-json": lambda root: make_webdataset(root, json_captions=True)}


def _cfg(**kw) -> TrainConfig:
    # 6 records, 4 a step, a buffer of 3: 4 steps cross two epoch ends and the buffer shuffles partly.
    return TrainConfig(**{"checkpoint": "", "out": "", "batch_size": 4, "seed": 3, "shuffle_buffer": 3,
                          "num_workers": 0, "stream": True} | kw)


def _batches(source, ckpt, steps, size=(16, 16)):
    source.prepare(ckpt, *size, show_progress=False)
    return [source.batch(step, range(source.cfg.batch_size)) for step in steps]


def assert_same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for x, y in zip((s for batch in a for s in batch), (s for batch in b for s in batch), strict=True):
        assert x.keys() == y.keys() and len(x["segments"]) == len(y["segments"])
        for s, t in zip(x["segments"], y["segments"]):
            if isinstance(s, ImageSegment):
                assert s.t == t.t
                torch.testing.assert_close(s.latent, t.latent, atol=1e-6, rtol=0)
            else:
                assert s == t
        assert x.get("targets") == y.get("targets")
        if "velocity" in x:
            torch.testing.assert_close(x["velocity"], y["velocity"], atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a smaller machine
@pytest.mark.parametrize("kind,workers", [("folder", 0), ("parquet", 2), ("webdataset", 0), ("webdataset", 3)])
def test_streamed_datasets_give_the_in_memory_samples(tmp_path, checkpoint_dir, kind, workers):
    ckpt = load_checkpoint(checkpoint_dir)
    folder = make_folder(tmp_path / "memory")
    cfg = _cfg(num_workers=workers)
    expected = _batches(CaptionSamples(cfg, FolderDataset(folder)), ckpt, range(4))
    path = folder if kind == "folder" else MAKERS[kind](tmp_path / kind)
    assert dataset_kind(path) == kind
    assert_same(_batches(StreamSamples(cfg, str(path)), ckpt, range(4)), expected)
    # a resumed run's first step is the straight run's
    assert_same(_batches(StreamSamples(cfg, str(path)), ckpt, [2, 3]), expected[2:])


def test_the_order_is_a_seeded_permutation_per_epoch():
    orders = [epoch_order(3, e, 50, 10) for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert len(set(orders)) == 3 and epoch_order(3, 0, 50, 10) == orders[0]
    assert epoch_order(4, 0, 50, 10) != orders[0] and epoch_order(3, 0, 50, 0) == tuple(range(50))


def test_the_latent_cache_equals_encoding_on_the_fly(tmp_path, checkpoint_dir):
    ckpt = load_checkpoint(checkpoint_dir)
    source, cache = make_parquet(tmp_path / "parquet"), tmp_path / "cache"
    encode_latents(checkpoint_dir, source, cache, shard_size=4, batch_size=3, show_progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["complete"] and manifest["dtype"] == "float32"
    assert [s["count"] for s in manifest["shards"]] == [4, 2] and manifest["image_size"] == [16, 16]
    stored = LatentCache(cache)
    latents = torch.cat([stored.shard(i)[0] for i in range(2)])
    data = FolderDataset(make_folder(tmp_path / "memory"))
    torch.testing.assert_close(latents, encode_dataset(ckpt.vae, data, 16, 16, show_progress=False),
                               atol=1e-6, rtol=0)
    assert stored.shard(0)[1] + stored.shard(1)[1] == CAPTIONS
    encode_latents(checkpoint_dir, source, tmp_path / "bf16", shard_size=4, dtype="bfloat16", show_progress=False)
    half = LatentCache(tmp_path / "bf16")
    assert half.manifest["dtype"] == "bfloat16" and half.shard(0)[0].dtype == torch.float32  # read as float32
    torch.testing.assert_close(half.shard(0)[0], latents[:4], atol=0.02, rtol=0.01)
    expected = _batches(CaptionSamples(_cfg(), data), ckpt, range(4))
    assert_same(_batches(CacheSamples(_cfg(), str(cache)), ckpt, range(4)), expected)
    assert_same(_batches(CacheSamples(_cfg(), str(cache)), ckpt, [3]), expected[3:])
    micro = CacheSamples(_cfg(), str(cache))  # a step asked for in micro-batches (gradient accumulation)
    micro.prepare(ckpt, 16, 16, show_progress=False)
    assert_same([micro.batch(s, range(0, 2)) + micro.batch(s, range(2, 4)) for s in range(4)], expected)
    with pytest.raises(ValueError, match="16x16"):  # trained at another size than encoded
        _batches(CacheSamples(_cfg(), str(cache)), ckpt, [0], size=(8, 16))


def test_encode_latents_resumes_after_a_crash_byte_for_byte(tmp_path, checkpoint_dir, monkeypatch):
    source = make_webdataset(tmp_path / "wds")
    args = ["encode-latents", "--checkpoint", str(checkpoint_dir), "--dataset", str(source), "--shard-size", "2",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-progress", "--out"]
    assert cli(args + [str(tmp_path / "straight")]) == 0
    real, written = latent_cache._write_shard, []

    def crash_after_one(out, index, *rest):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(index)
        return real(out, index, *rest)

    monkeypatch.setattr(latent_cache, "_write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        cli(args + [str(tmp_path / "resumed")])
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    # a kill in the middle of writing shard 1 leaves at most its temporary file, never the shard
    (tmp_path / "resumed" / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")

    def count(out, index, *rest):
        written.append(index)
        return real(out, index, *rest)

    monkeypatch.setattr(latent_cache, "_write_shard", count)
    assert cli(args + [str(tmp_path / "resumed")]) == 0
    assert written == [0, 1, 2]  # the rerun wrote shards 1 and 2 only
    assert file_bytes(tmp_path / "resumed") == file_bytes(tmp_path / "straight")
    assert cli(args + [str(tmp_path / "resumed")]) == 0 and written == [0, 1, 2]  # complete: nothing to do


@pytest.mark.parametrize("kind", ["folder", "imagefolder", "parquet", "webdataset", "webdataset-json", "cache-3",
                                  "cache-2"])
def test_two_ranks_read_disjoint_shares_that_cover_the_data(tmp_path, checkpoint_dir, kind, monkeypatch):
    if kind.startswith("cache"):  # 2 shards of 3: a shard each; 3 shards of 2: every other record
        path = tmp_path / "cache"
        encode_latents(checkpoint_dir, make_parquet(tmp_path / "parquet"), path, shard_size=int(kind[-1]),
                       show_progress=False)
    else:
        path = MAKERS[kind](tmp_path / kind)
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        records = LatentCache(path).records(rank, 2) if kind.startswith("cache") else Stream(path).records()
        shares.append([r["caption"] for r in records])
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(CAPTIONS)


def test_training_from_the_latent_cache(tmp_path, checkpoint_dir):
    cache, out = tmp_path / "cache", tmp_path / "trained"
    encode_latents(checkpoint_dir, make_folder(tmp_path / "folder"), cache, shard_size=4, show_progress=False)
    assert cli(["train", "--checkpoint", str(checkpoint_dir), "--out", str(out), "--dataset", str(cache),
                "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["ar"]) and math.isfinite(r["dm"]) for r in rows)
    assert (out / "vision_tower.safetensors").is_file()


def test_two_processes_train_each_on_its_own_share(tmp_path, checkpoint_dir):
    out, data = tmp_path / "trained", make_parquet(tmp_path / "parquet")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xfusion_serve.cli", "train", "--checkpoint", str(checkpoint_dir), "--out", str(out),
           "--dataset", str(data), "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1",
           "--num-workers", "1", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(math.isfinite(r["ar"] + r["dm"]) for r in rows)


def test_bad_input_gives_clear_errors(tmp_path, checkpoint_dir, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset_kind(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        dataset_kind(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a dataset"):
        dataset_kind(tmp_path / "empty")
    mixed = make_parquet(tmp_path / "mixed")
    (mixed / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="both"):
        dataset_kind(mixed)

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"image": [b"not a png"], "caption": ["a"]}), bad / "a.parquet")
    with pytest.raises(ValueError, match="record '0': not a readable image"):
        list(_pixels(bad))
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    pq.write_table(pa.table({"image": [_png(0)], "label": ["a"]}), nocap / "a.parquet")
    with pytest.raises(ValueError, match="needs an image .* and a caption"):
        list(Stream(nocap).records())

    cache = tmp_path / "cache"
    encode_latents(checkpoint_dir, make_folder(tmp_path / "folder"), cache, shard_size=4, show_progress=False)
    with pytest.raises(ValueError, match="another shard_size"):  # never mixes two caches in one folder
        encode_latents(checkpoint_dir, tmp_path / "folder", cache, shard_size=2, show_progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(cache)
    with pytest.raises(ValueError, match="a latent cache, not a stream"):
        Stream(cache)
    assert cli(["encode-latents", "--checkpoint", str(checkpoint_dir), "--dataset", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "c2")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


def _pixels(path):
    from xfusion_serve.training.streaming import pixel_loader

    return pixel_loader(Stream(path), 16, 16, epochs=1)
