"""Synthetic X-Fusion checkpoints of real shapes, with no download: the benchmarks' model builder.

    python benchmarks/make_checkpoint.py --preset smol-135m --vae sd --image-size 256x256 --out /tmp/smol

1. a Llama directory of the preset's published configuration (vocabulary, layers, heads, GQA, RoPE and its
   llama3 scaling, tied head), random weights (transformers' own initialisation, seeded), saved in bfloat16
   as the published checkpoints are, with a byte-level BPE tokenizer trained on this machine's Python sources
   to the preset's vocabulary size and a ChatML chat template;
2. a random diffusers AutoencoderKL of the SD (4 latent channels, scaling 0.18215) or SD3 (16 channels,
   scaling 1.5305, shift 0.0609) configuration, or a tiny one;
3. `xfusion-serve init` on the two.
Random weights give the real shapes' speed and memory, not sensible text or images. The special tokens sit
at the start of the vocabulary (bos, eos, ...), not at the published ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    rope_theta: float
    rope_scaling: dict | None = None
    head_dim: int | None = None


# The published config.json of each model (HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B and -3B).
PRESETS = {
    "smol-135m": Preset(576, 1536, 30, 9, 3, 49152, 8192, 100000.0),
    "llama-3.2-1b": Preset(2048, 8192, 16, 32, 8, 128256, 131072, 500000.0, LLAMA3_ROPE, 64),
    "llama-3.2-3b": Preset(3072, 8192, 28, 24, 8, 128256, 131072, 500000.0, LLAMA3_ROPE, 128),
    "tiny": Preset(64, 128, 2, 4, 2, 1024, 2048, 10000.0),
}

VAES = {
    # The SD 1/2 VAE (stabilityai/sd-vae-ft-mse) and SD3's, shapes and factors as their config.json give them.
    "sd": dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, scaling_factor=0.18215, shift_factor=None,
               layers_per_block=2, norm_num_groups=32),
    "sd3": dict(block_out_channels=(128, 256, 512, 512), latent_channels=16, scaling_factor=1.5305,
                shift_factor=0.0609, layers_per_block=2, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False),
    "tiny": dict(block_out_channels=(8, 16), latent_channels=4, scaling_factor=0.5, shift_factor=0.1,
                 layers_per_block=1, norm_num_groups=4),
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus(max_bytes: int = 48 << 20) -> list[str]:
    """This machine's Python standard library sources, in a fixed order: text to train a tokenizer on."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def make_tokenizer(out: Path, vocab: int, cache: Path):
    """A byte-level BPE tokenizer of at most `vocab` tokens (cached per size: training takes a minute)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cached = cache / f"bpe-{vocab}"
    if not (cached / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus(min(48 << 20, vocab << 11)), trainer)  # ~2 KB of text per token
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                       pad_token=SPECIALS[3], unk_token=None,
                                       additional_special_tokens=[SPECIALS[0]])
        fast.chat_template = CHATML
        fast.save_pretrained(cached)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cached)
    tokenizer.save_pretrained(out)
    return tokenizer


def make_text_tower(preset: str, out: Path, cache: Path, seed: int = 0) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    tokenizer = make_tokenizer(out, p.vocab, cache)
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_theta": p.rope_theta} | (p.rope_scaling or {"rope_type": "default"})
    cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                      head_dim=p.head_dim or p.hidden // p.heads, max_position_embeddings=p.max_positions,
                      rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=ids(SPECIALS[1]), eos_token_id=ids(SPECIALS[2]), pad_token_id=ids(SPECIALS[3]))
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=[ids(SPECIALS[2]), ids(SPECIALS[0])],
                     pad_token_id=cfg.pad_token_id, do_sample=False).save_pretrained(out)
    return out


def make_vae(kind: str, out: Path, sample_size: int, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    cfg = dict(VAES[kind])
    blocks = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        sample_size=sample_size, **cfg)
    vae.save_pretrained(out)
    return out


def build(preset: str, vae: str, image_size: tuple[int, int], out: Path, cache: Path | None = None,
          seed: int = 0) -> Path:
    """-> `out`, a servable checkpoint (text tower, VAE and an initialised vision tower)."""
    from xfusion_serve import init_checkpoint

    cache = cache or Path.home() / ".cache" / "xfusion-serve" / "tokenizers"
    work = out.with_name(out.name + ".parts")
    text = make_text_tower(preset, work / "text_tower", cache, seed)
    vae_dir = make_vae(vae, work / "vae", max(image_size), seed)
    init_checkpoint(text, vae_dir, out, image_sizes=[image_size], seed=seed)
    import shutil

    shutil.rmtree(work)
    (out / "preset.json").write_text(json.dumps({"preset": preset, "vae": vae, "image_size": image_size,
                                                 "seed": seed}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--vae", choices=sorted(VAES), default="sd")
    p.add_argument("--image-size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-cache", type=Path, default=None,
                   help="where trained tokenizers are kept, one per vocabulary size (default: "
                        "~/.cache/xfusion-serve/tokenizers)")
    args = p.parse_args(argv)
    w, h = map(int, args.image_size.lower().split("x"))
    print(build(args.preset, args.vae, (h, w), args.out, cache=args.tokenizer_cache, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
