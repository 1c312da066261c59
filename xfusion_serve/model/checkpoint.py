"""Loading, saving and initialising X-Fusion checkpoints.

The text tower is read in place, never rewritten: its safetensors load straight into the model under their
transformers names. Everything trainable lives in one file, vision_tower.safetensors.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from .config import (
    CONFIG_FILE,
    VISION_TOWER_FILE,
    CheckpointError,
    VAEInfo,
    XFusionConfig,
    parse_dtype,
    resolve_component,
)
from .llama import TextTower
from .xfusion import XFusionModel

log = logging.getLogger(__name__)

# The embedded default checkpoint, shipped inside the package (what `xfusion-serve serve` serves with none).
EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-demo"


@dataclass
class Checkpoint:
    path: Path
    config: XFusionConfig
    model: XFusionModel
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]  # every stop id of the text tower's generation_config.json
    vae: torch.nn.Module | None  # diffusers AutoencoderKL
    text_tower_dir: Path
    vae_dir: Path


def load_text_config(text_dir: Path) -> LlamaConfig:
    path = text_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the text tower must be a transformers Llama directory")
    cfg = AutoConfig.from_pretrained(text_dir)
    if cfg.model_type != "llama":
        raise CheckpointError(f"{path}: model_type is {cfg.model_type!r}; X-Fusion here needs a Llama text tower")
    return cfg


def eos_token_ids(text_dir: Path, text_cfg: LlamaConfig) -> list[int]:
    ids = None
    if (text_dir / "generation_config.json").is_file():
        ids = GenerationConfig.from_pretrained(text_dir).eos_token_id
    if ids is None:
        ids = text_cfg.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def weight_files(ckpt: Checkpoint) -> dict[str, list[Path]]:
    """The safetensors files holding a checkpoint's weights, by the model's submodule they fill:
    {"text": the text tower's (shards too), "vision": [vision_tower.safetensors]}."""
    return {"text": _safetensors_files(ckpt.text_tower_dir), "vision": [ckpt.path / VISION_TOWER_FILE]}


def _safetensors_files(text_dir: Path) -> list[Path]:
    index = text_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [text_dir / s for s in shards]
    single = text_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{text_dir}: no model.safetensors (or sharded index); the text tower must use safetensors")


def _read(files: list[Path]) -> dict[str, tuple[Path, torch.Tensor]]:
    out = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        try:
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    out[key] = (f, fh.get_tensor(key))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
    return out


def _check_and_assign(module: torch.nn.Module, tensors: dict[str, tuple[Path, torch.Tensor]], what: Path,
                      dtype: torch.dtype, ignore: set[str] = frozenset()) -> None:
    """Match a file's tensors to a (meta) module by name and shape; name the file and parameter on mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{what}: missing parameter {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; does this file belong to this text tower?"
        )
    unexpected = sorted(set(tensors) - set(expected) - ignore)
    if unexpected:
        raise CheckpointError(
            f"{tensors[unexpected[0]][0]}: unexpected parameter {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; does this file belong to this text tower?"
        )
    state = {}
    for name, ref in expected.items():
        file, tensor = tensors[name]
        if tensor.shape != ref.shape:
            raise CheckpointError(
                f"{file}: parameter {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(ref.shape)} from the text tower's config.json and {CONFIG_FILE}"
            )
        state[name] = tensor.to(dtype)
    module.load_state_dict(state, assign=True)


def load_checkpoint(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                    load_vae: bool = True, load_weights: bool = True) -> Checkpoint:
    """A checkpoint directory -> its model (on `device`, in `dtype`), tokenizer, stop ids and VAE. Raises
    CheckpointError naming the file and parameter for anything missing or mis-shaped. load_weights False: the
    model's parameters stay on the meta device (shapes only), for a caller that places them itself (sharded
    training reads each process's rows: training/parallel.py's load_shards)."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    cfg = XFusionConfig.load(path)
    text_dir = resolve_component(path, cfg.text_tower, "text tower")
    vae_dir = resolve_component(path, cfg.vae, "VAE")
    text_cfg = load_text_config(text_dir)
    vae_info = VAEInfo.from_dir(vae_dir)
    check_image_sizes(cfg, vae_info, path / CONFIG_FILE)

    with torch.device("meta"):
        model = XFusionModel(text_cfg, cfg, vae_info)
    if load_weights:
        text_tensors = _read(_safetensors_files(text_dir))
        ignore = {"lm_head.weight"} if model.text.tied else set()  # some tied checkpoints still store the head
        _check_and_assign(model.text, text_tensors, text_dir, torch_dtype, ignore)
        vision_file = path / VISION_TOWER_FILE
        _check_and_assign(model.vision, _read([vision_file]), vision_file, torch_dtype)
        model.to(device).tables_to(device)
    model.requires_grad_vision_only().eval()

    vae = None
    if load_vae:
        from diffusers import AutoencoderKL

        # float16 VAEs overflow in their decoder; they run in float32 as diffusers' force_upcast does.
        vae_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=vae_dtype, low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
    return Checkpoint(
        path=path,
        config=cfg,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(text_dir),
        eos_token_ids=eos_token_ids(text_dir, text_cfg),
        vae=vae,
        text_tower_dir=text_dir,
        vae_dir=vae_dir,
    )


def text_tower_parameters(path: str | Path) -> int:
    """Parameters of a checkpoint's text tower (a tied head counted once), from its config alone: nothing is
    read but JSON. Raises CheckpointError as load_checkpoint does for a missing part."""
    path = Path(path)
    text_cfg = load_text_config(resolve_component(path, XFusionConfig.load(path).text_tower, "text tower"))
    with torch.device("meta"):
        return sum(p.numel() for p in TextTower(text_cfg).parameters())


def check_image_sizes(cfg: XFusionConfig, vae: VAEInfo, where: Path) -> None:
    step = vae.downsample * cfg.patch_size
    for h, w in cfg.image_sizes:
        if h % step or w % step:
            raise CheckpointError(
                f"{where}: image size {h}x{w} is not a multiple of {step} (VAE downsample x patch size)"
            )


def save_vision_tower(model: XFusionModel, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.vision.state_dict().items()}
    save_file(state, str(Path(path) / VISION_TOWER_FILE), metadata={"format": "pt"})


@torch.no_grad()
def init_vision_tower(model: XFusionModel, seed: int = 0) -> None:
    """The paper's initialisation: each vision block a copy of its text block; new parts freshly drawn."""
    gen = torch.Generator().manual_seed(seed)
    v = model.vision
    for text_block, vision_block in zip(model.text.model.layers, v.layers):
        src, dst = text_block.state_dict(), vision_block.state_dict()
        if all(src[k].shape == dst[k].shape for k in dst):
            vision_block.load_state_dict({k: t.clone() for k, t in src.items()})
        else:  # a vision tower shaped unlike the text tower cannot copy it; it starts from a fresh draw
            for name, p in vision_block.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    std = float(model.text.model.embed_tokens.weight.float().std())
    for p in (v.pos_embed, v.boi, v.eoi):
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    for lin in (v.patch_embed, v.time_embed[0], v.time_embed[2]):
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
        lin.bias.zero_()
    # A zero output head starts the flow-matching loss from a zero velocity, as DiT does.
    v.proj_out.weight.zero_()
    v.proj_out.bias.zero_()


def init_checkpoint(text_tower: str | Path, vae: str | Path, out: str | Path, *,
                    image_sizes: list[tuple[int, int]] | None = None, xfuse: bool = False,
                    link_text_tower: bool = False, seed: int = 0, **config_overrides) -> Path:
    """Build a new, untrained checkpoint from a local Llama directory and a diffusers AutoencoderKL directory."""
    text_tower, vae, out = Path(text_tower).resolve(), Path(vae).resolve(), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; init writes a new checkpoint")
    text_cfg = load_text_config(text_tower)
    _safetensors_files(text_tower)
    vae_info = VAEInfo.from_dir(vae)
    if image_sizes is None:
        image_sizes = [(int(json.loads((vae / "config.json").read_text()).get("sample_size", 256)),) * 2]
    cfg = XFusionConfig(
        text_tower=str(text_tower) if link_text_tower else "text_tower",
        vae="vae",
        image_sizes=image_sizes,
        xfuse=xfuse,
        **config_overrides,
    )
    check_image_sizes(cfg, vae_info, Path(CONFIG_FILE))

    model = XFusionModel(text_cfg, cfg, vae_info)
    _check_and_assign(model.text, _read(_safetensors_files(text_tower)), text_tower, torch.float32,
                      {"lm_head.weight"} if model.text.tied else set())
    init_vision_tower(model, seed)

    out.mkdir(parents=True, exist_ok=True)
    if not link_text_tower:
        shutil.copytree(text_tower, out / "text_tower")  # copy2: bytes and timestamps kept as they are
    shutil.copytree(vae, out / "vae")
    save_vision_tower(model, out)
    cfg.save(out)
    log.info("initialised %s from %s and %s", out, text_tower, vae)
    return out
