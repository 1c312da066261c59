"""Tiny dummy components built from a config, as diffusers' tests do: 2 layers, width 32-64."""

from __future__ import annotations

import os

# Triton picks interpreter or compiler once, at its first import (transformers imports it through torch);
# on CPU the project's kernels can only run under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from xfusion_serve import init_checkpoint

WORDS = "a the small large red green blue circle square triangle at top left right center bottom".split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<eot>"]
VOCAB = 96  # larger than the tokenizer: ids past it still exist in the model, as in real checkpoints


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_text_tower(path: Path, *, tie: bool = True, kv_heads: int = 2, llama3_rope: bool = True,
                    eos_ids: list[int] = (3, 4), seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32} if llama3_rope else None
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=tie, rope_scaling=rope, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # widen the weights so greedy decoding is not a string of ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=2, eos_token_id=list(eos_ids)).save_pretrained(path)
    make_tokenizer(path)
    return path


def make_vae(path: Path, sample_size: int = 16) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=sample_size, scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(path)
    return path


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def text_tower(tmp_path) -> Path:
    return make_text_tower(tmp_path / "llama")


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    return make_vae(tmp_path / "vae")


@pytest.fixture
def checkpoint_dir(tmp_path, text_tower, vae_dir) -> Path:
    return init_checkpoint(text_tower, vae_dir, tmp_path / "ckpt", image_sizes=[(16, 16), (8, 16)])


@pytest.fixture
def xfuse_checkpoint_dir(tmp_path, text_tower, vae_dir) -> Path:
    out = init_checkpoint(text_tower, vae_dir, tmp_path / "ckpt-xfuse", image_sizes=[(16, 16)], xfuse=True)
    return out


def set_config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "xfusion_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def random_checkpoint_dir(checkpoint_dir) -> Path:
    """A checkpoint whose vision tower differs from the text tower and predicts non-zero velocities."""
    from xfusion_serve import load_checkpoint
    from xfusion_serve.model.checkpoint import save_vision_tower

    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_vision_tower(model, checkpoint_dir)
    return checkpoint_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_live(checkpoint, config, engine_config=None):
    """uvicorn serving the app on a free local port, in a thread. -> (server, thread, url, engine, app)"""
    import uvicorn

    from xfusion_serve import load_checkpoint
    from xfusion_serve import Engine, EngineConfig
    from xfusion_serve.server.app import create_app

    engine = Engine(load_checkpoint(checkpoint), engine_config or EngineConfig(block_size=4))
    port = free_port()
    app = create_app(config, engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", engine, app


@pytest.fixture(scope="module")
def app_client():
    """The app without its lifespan: nothing is loaded, but every route answers (/ready with 503)."""
    from fastapi.testclient import TestClient

    from xfusion_serve.server.app import create_app
    from xfusion_serve.server.state import ServerConfig

    return TestClient(create_app(ServerConfig()))


def reference_greedy(model, segments: list, max_new: int, eos: set[int]) -> list[int]:
    """Greedy text after `segments` (text ids and images) by the reference forward, no cache: the oracle."""
    from xfusion_serve.model.reference import reference_forward

    out: list[int] = []
    for _ in range(max_new):
        logits, _ = reference_forward(model, segments + [out])  # a text segment after another is the same
        token = int(logits[-1].argmax())
        if token in eos:
            break
        out.append(token)
    return out
