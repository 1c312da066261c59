"""xfusion-serve: an inference server for X-Fusion checkpoints (arXiv 2504.20996).

Layers, imports running one way: model <- engine <- server; model <- training; demo and cli on top.
The public API is re-exported here: `from xfusion_serve import Engine` etc.
"""

from .engine.async_engine import AsyncEngine
from .engine.config import EngineConfig
from .engine.engine import Engine
from .engine.request import Event
from .engine.text_sampling import SamplingParams
from .model.checkpoint import EMBEDDED_CHECKPOINT, Checkpoint, init_checkpoint, load_checkpoint
from .model.config import CheckpointError, XFusionConfig
from .model.sequence import ImageSegment
from .model.xfusion import XFusionModel

__all__ = ["EMBEDDED_CHECKPOINT", "AsyncEngine", "Checkpoint", "CheckpointError", "Engine", "EngineConfig", "Event",
           "ImageSegment", "SamplingParams", "ServerConfig", "TrainConfig", "XFusionConfig", "XFusionModel",
           "create_app", "init_checkpoint", "load_checkpoint", "train"]
__version__ = "0.1.0"

# The server (FastAPI, uvicorn) and the trainer load on first use: the engine alone needs neither.
_LAZY = {"ServerConfig": "server.state", "create_app": "server.app", "TrainConfig": "training.trainer",
         "train": "training.trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
