"""The `xfusion-serve` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return (int(h or w), int(w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r}: use WIDTHxHEIGHT or one number") from None


def _init(args: argparse.Namespace) -> None:
    from .model.checkpoint import init_checkpoint
    from .model.config import ImageAnswer

    out = init_checkpoint(
        args.text_tower, args.vae, args.out,
        image_sizes=args.image_size, xfuse=args.xfuse, link_text_tower=args.link_text_tower, seed=args.seed,
        image_answer=ImageAnswer(text_first=args.text_first),
    )
    print(f"wrote an untrained X-Fusion checkpoint to {out}")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, so every knob of the recipe is on the command line."""
    import dataclasses
    import types
    import typing

    from .training.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))  # X | None: an X, or unset
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kw: dict = {"default": default, "required": required, "help": f"default: {default}" if not required else None}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kw.update(nargs="*", type=str)
        elif "tuple" in str(hint):
            kw.update(nargs=2, type=int if "int" in str(hint) else float)
        else:
            kw["type"] = hint if hint in (int, float, str) else str
        p.add_argument(flag, **kw)


def _train(args: argparse.Namespace) -> None:
    import dataclasses

    from .demo.data import open_dataset
    from .training.trainer import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for name in ("betas", "image_size"):
        values[name] = tuple(values[name]) if values[name] is not None else None
    cfg = TrainConfig(**values)
    evaluator = _drawing_evaluator(cfg) if cfg.eval_every else None
    if cfg.dataset == "shapes-tasks":  # the embedded default's recipe: the world's conversation tasks
        from .demo.recipe import task_samples

        out = train(cfg, samples=task_samples(cfg), evaluator=evaluator)
    else:
        from .training.sources import source_for  # Parquet, WebDataset, a latent cache, or --stream: streamed

        source = None if cfg.dataset == "shapes" else source_for(cfg)
        data = None if source else open_dataset(cfg.dataset, cfg.shapes_size, cfg.data_seed)
        out = train(cfg, data, samples=source, evaluator=evaluator)
    print(f"wrote {out}")


def _encode_latents(args: argparse.Namespace) -> None:
    import torch

    from .training.latent_cache import encode_latents

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = encode_latents(args.checkpoint, args.dataset, args.out, image_size=args.image_size,
                         shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                         num_workers=args.num_workers, device=device, show_progress=args.progress)
    print(f"wrote {out}")


def _drawing_evaluator(cfg):
    """train's evaluator (training/evaluation.py): each of cfg.eval_prompts drawn (the checkpoint's sampler
    defaults, seed cfg.seed + i, the engine's uncached sampler), then captioned greedily by the same model."""
    from .engine.uncached import caption_greedy_uncached, sample_images_uncached
    from .model.checkpoint import load_checkpoint
    from .model.latents import decode_latents

    if not cfg.eval_prompts:
        raise ValueError("--eval-every needs --eval-prompts: the prompts to draw at each evaluation")
    parts = load_checkpoint(cfg.checkpoint, load_weights=False)  # tokenizer, VAE and stop ids; no weights
    height, width = cfg.image_size or parts.config.image_sizes[0]
    s, seeds = parts.config.sampler, [cfg.seed + i for i in range(len(cfg.eval_prompts))]

    def evaluate(model, step: int) -> dict:
        latents = sample_images_uncached(model, parts.tokenizer, cfg.eval_prompts, seeds, s.steps,
                                         s.guidance_scale, s.shift, height, width)
        # All 32 tokens on every process, cut at the stop token after: under FSDP2 each forward is collective,
        # so no process may stop early on an answer another computed a hair differently.
        ids = caption_greedy_uncached(model, parts.tokenizer, latents, None, 32, set())
        stops = set(parts.eos_token_ids)
        cut = [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in ids]
        return {"images": decode_latents(parts.vae, latents.cpu()), "prompts": cfg.eval_prompts,
                "captions": parts.tokenizer.batch_decode(cut)}

    return evaluate


def _eval(args: argparse.Namespace) -> None:
    from .demo.evaluate import OverHTTP, caption_accuracy, evaluate_in_process, generation_accuracy, report

    if args.base_url:
        client = OverHTTP(args.base_url, concurrency=args.concurrency, api_key=args.api_key)
        results = {}
        if args.captions:
            results["captioning"] = caption_accuracy(client.caption, args.captions)
        if args.images:
            results["generation"] = generation_accuracy(client.generate, args.images)
    else:
        from .model.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        results = evaluate_in_process(ckpt, args.captions, args.images, steps=args.steps)
    for name, acc in results.items():
        print(report(name, acc))
    if args.base_url and args.tasks:
        from .demo.evaluate_tasks import task_accuracy, task_report

        results["tasks"] = task_accuracy(client, args.tasks, text_first=not args.draw_directly)
        print(task_report(results["tasks"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _env(name: str, default, kind=str):
    """A setting's default from XFUSION_<NAME>, so every `serve` option can come from the environment."""
    value = os.environ.get("XFUSION_" + name)
    return default if value is None else kind(value)


def _flag(value: str) -> bool | None:
    if not value.strip():  # set but empty: as if unset, the default
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _serve(args: argparse.Namespace) -> None:
    from .engine.config import EngineConfig
    from .server.app import serve
    from .server.state import ServerConfig

    kv_bytes = None if args.kv_cache_memory is None else int(args.kv_cache_memory * (1 << 20))
    engine = EngineConfig(device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
                          kv_cache_memory=kv_bytes, kv_cache_fraction=args.kv_cache_fraction, block_size=args.block_size,
                          compile_decode=args.compile_decode, compile_denoise=args.compile_denoise,
                          cpu_kernels=args.cpu_kernels, compile_decode_from=0)  # a server compiles every model
    serve(ServerConfig(checkpoint=args.checkpoint, host=args.host, port=args.port, engine=engine,
                       max_queue=args.max_queue, served_model_name=args.served_model_name,
                       api_keys=args.api_key or [], drain_timeout=args.drain_timeout,
                       access_log=args.access_log is not False, allowed_image_domains=args.allowed_image_domains or [],
                       compute_threads=args.threads, engine_process=args.engine_process,
                       pin_engine=args.pin_engine))


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
    p.add_argument("--text-first", action="store_true",
                   help="image answers open with the assistant's text, then draw after it (trained so by "
                        "`train --dataset shapes-tasks`; every image route then decodes that text first)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init)

    p = sub.add_parser("train", help="train the vision tower of a checkpoint (the paper's recipe)")
    _add_train_options(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("encode-latents", help="encode a dataset's images once into a latent cache for train",
                       description="Writes DIR/manifest.json and DIR/shard-NNNNN.safetensors (latents, captions); "
                                   "a rerun finishes what a former run left. Train on it with --dataset DIR.")
    p.add_argument("--checkpoint", required=True, help="the checkpoint whose VAE encodes")
    p.add_argument("--dataset", required=True, help="a captions.jsonl or imagefolder folder, Parquet or WebDataset")
    p.add_argument("--out", required=True, help="the cache directory")
    p.add_argument("--image-size", type=_size, default=None,
                   help="WIDTHxHEIGHT or one number (default: the checkpoint's first trained size)")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored latents' dtype")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding images (0: in process)")
    p.add_argument("--device", default="auto", help="where the VAE runs (auto: cuda if there is one)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=_encode_latents)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (default: the embedded shapes demo)",
                       description="Every option also reads XFUSION_<OPTION> from the environment, e.g. "
                                   "XFUSION_PORT=9000 or XFUSION_API_KEY='key1,key2'.")
    p.add_argument("--checkpoint", default=_env("CHECKPOINT", None), help="a checkpoint directory (default: the demo)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("PORT", 8000, int))
    p.add_argument("--device", default=_env("DEVICE", "cpu"))
    p.add_argument("--dtype", default=_env("DTYPE", "float32"), choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default=_env("ATTENTION_BACKEND", None),
                   choices=["torch", "cpu", "triton", "flash-attn"],
                   help="default: cpu (the project's C++ decode kernel) for float32 on the CPU, else torch")
    p.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", 256, int), help="waiting requests before 429")
    p.add_argument("--kv-cache-memory", type=float, default=_env("KV_CACHE_MEMORY", None, float),
                   help="MiB for the KV cache of both towers (default: --kv-cache-fraction of the free memory)")
    p.add_argument("--kv-cache-fraction", type=float, default=_env("KV_CACHE_FRACTION", None, float),
                   help="with no --kv-cache-memory: the share of the memory left free by the weights that the KV "
                        "cache takes, at most what 64 running requests at full context can fill "
                        "(default: 0.25 on the CPU, 0.85 on CUDA)")
    p.add_argument("--block-size", type=int, default=_env("BLOCK_SIZE", 16, int),
                   help="tokens per KV-cache block (flash-attn: 256)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction,
                   default=_env("COMPILE_DECODE", None, _flag),
                   help="torch.compile the decode step at start-up, CUDA graphs on GPU (default: on; on the CPU where "
                        "the compile fails, e.g. no C++ compiler, the server decodes eagerly and says so)")
    p.add_argument("--compile-denoise", action=argparse.BooleanOptionalAction,
                   default=_env("COMPILE_DENOISE", None, _flag),
                   help="torch.compile the denoising step at start-up (default: on CUDA only)")
    p.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=_env("CPU_KERNELS", None, _flag),
                   help="the project's float32 CPU matrix multiply for decode steps, built at start-up (default: on "
                        "the CPU in float32 for text towers of 50M parameters or more)")
    p.add_argument("--threads", type=int, default=_env("THREADS", None, int),
                   help="torch's compute threads on the CPU (default: every usable core but one, which serves the "
                        "API; OMP_NUM_THREADS, when set, is kept)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                   default=_env("ENGINE_PROCESS", True, _flag),
                   help="the engine in a process of its own, so that it and the API server do not share one GIL "
                        "(default); --no-engine-process: on a thread of the server's process")
    p.add_argument("--pin-engine", action=argparse.BooleanOptionalAction, default=_env("PIN_ENGINE", True, _flag),
                   help="the engine process on CPU cores of its own, those its threads leave the API server, and the "
                        "API server on the rest (default; only where they leave one); --no-pin-engine: both "
                        "wherever the OS puts them")
    p.add_argument("--api-key", action="append", default=_env("API_KEY", None, lambda v: v.split(",")),
                   help="accepted Bearer key (repeatable; none: no key needed)")
    p.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME", None))
    p.add_argument("--allowed-image-domains", action="append",
                   default=_env("ALLOWED_IMAGE_DOMAINS", None, lambda v: v.split(",")),
                   help="domains whose http(s) image URLs /v1/chat/completions may fetch (none by default)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=_env("ACCESS_LOG", True, _flag),
                   help="a log line per request (uvicorn's access log)")
    p.add_argument("--drain-timeout", type=float, default=_env("DRAIN_TIMEOUT", 30.0, float),
                   help="seconds SIGTERM waits for running requests")
    p.set_defaults(func=_serve)

    p = sub.add_parser("eval", help="per-attribute accuracy on the shapes world")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="evaluate a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--checkpoint", help="evaluate this checkpoint in process")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (with --base-url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--captions", type=int, default=300, help="fresh images to caption")
    p.add_argument("--images", type=int, default=300, help="fresh prompts to draw")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    p.add_argument("--tasks", type=int, default=100,
                   help="with --base-url: also this many conversation tasks of each kind (drawing from full and "
                        "partial prompts, questions, caption requests, edits, two-picture questions; demo/tasks.py)")
    p.add_argument("--draw-directly", action="store_true",
                   help="ask for drawings and edits with modalities [\"image\"] instead of [\"text\", \"image\"]: "
                        "straight after the user's words on a checkpoint trained so (the first demo); one that says "
                        "what it draws first (image_answer.text_first) still says it")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per eval request is noise
    from .model.config import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
