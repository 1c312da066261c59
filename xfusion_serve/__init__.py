"""xfusion-serve: an inference server for X-Fusion checkpoints (arXiv 2504.20996)."""

from .checkpoint import Checkpoint, init_checkpoint, load_checkpoint
from .config import CheckpointError, XFusionConfig
from .model import ImageSegment, XFusionModel

__all__ = ["Checkpoint", "CheckpointError", "ImageSegment", "XFusionConfig", "XFusionModel",
           "init_checkpoint", "load_checkpoint"]
__version__ = "0.1.0"
