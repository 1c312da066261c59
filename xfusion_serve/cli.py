"""The `xfusion-serve` command."""

from __future__ import annotations

import argparse
import logging
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return (int(h or w), int(w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r}: use WIDTHxHEIGHT or one number") from None


def _init(args: argparse.Namespace) -> None:
    from .checkpoint import init_checkpoint

    out = init_checkpoint(
        args.text_tower, args.vae, args.out,
        image_sizes=args.image_size, xfuse=args.xfuse, link_text_tower=args.link_text_tower, seed=args.seed,
    )
    print(f"wrote an untrained X-Fusion checkpoint to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xfusion-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="build an untrained checkpoint from a Llama directory and a diffusers VAE")
    p.add_argument("--text-tower", required=True, help="a local transformers Llama directory (safetensors)")
    p.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL directory")
    p.add_argument("--out", required=True, help="the new checkpoint directory (must not exist or be empty)")
    p.add_argument("--image-size", type=_size, action="append",
                   help="a trained image size, WIDTHxHEIGHT (repeatable; default: the VAE's sample_size)")
    p.add_argument("--xfuse", action="store_true", help="turn on the paper's X-Fuse feature mixing")
    p.add_argument("--link-text-tower", action="store_true",
                   help="point at the text tower where it is instead of copying it into the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .config import CheckpointError

    try:
        args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
