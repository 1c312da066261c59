"""The server's configuration and state: what `serve` is given, and what every route reads through
app.state.server (no module-level globals): the engine, the tokenizer, the trained sizes, the metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from ..engine.async_engine import AsyncEngine
from ..engine.config import COMPILE_DECODE_ON_CPU_FROM, EngineConfig
from ..engine.engine import Engine
from ..engine.engine_process import EngineProcess, EngineSpec
from ..engine.streams import EngineFailed
from ..model.checkpoint import EMBEDDED_CHECKPOINT, load_checkpoint
from ..model.config import ImageAnswer
from ..model.latents import decode_latents
from .metrics import Metrics, render_metrics
from .schemas import image_to_base64
from .serving import APIError

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    checkpoint: str | None = None  # None: the embedded default
    host: str = "127.0.0.1"
    port: int = 8000
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queue: int = 256
    served_model_name: str | None = None
    api_keys: list[str] = field(default_factory=list)  # empty: no key needed
    max_body_bytes: int = 32 << 20
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running requests before exiting
    access_log: bool = True  # uvicorn's line per request
    allowed_image_domains: list[str] = field(default_factory=list)  # http(s) image_url hosts; none by default
    # torch's intra-op threads on the CPU; None: every usable core but one (see compute_threads)
    compute_threads: int | None = None
    # The engine in a process of its own (engine/engine_process.py), so that the API server and the engine
    # do not share one GIL; False: on a thread of the server's process (an Engine given to create_app always is).
    engine_process: bool = True
    # The engine process on cores of its own (see engine_cores); False: wherever the OS puts it.
    pin_engine: bool = True

    def __post_init__(self):
        if self.compute_threads is not None and self.compute_threads < 1:
            raise ValueError(f"compute_threads must be at least 1, got {self.compute_threads}")


def compute_threads(config: ServerConfig, text_parameters: int, environ=os.environ) -> int | None:
    """torch's intra-op threads for a serving process -> a count, or None to leave torch's own (every core).

    On the CPU a step's parallel regions wait for their slowest thread, so a compute thread that shares its core
    with the API server (its event loop: sockets, JSON) and the clients slows every step. For a small model, whose step
    is mostly Python and small multiplies, one usable core is kept for the API server, as vLLM's CPU backend
    keeps one for its scheduler (vllm/utils/ompmultiprocessing.py); a model of COMPILE_DECODE_ON_CPU_FROM
    text-tower parameters or more computes on every core, where its large batches need them.
    `benchmarks/bench_peers.py` side by side on 2 cores (HTTP tok/s at 1/16/64 requests, 1 thread vs 2): the demo
    617/3175/4771 vs 263/1955/4002; a 135M-parameter Llama 25.9/174.7/272.9 vs 25.6/187.2/351.5.
    `compute_threads` set, or OMP_NUM_THREADS set by the operator, wins; on a GPU torch's choice stays."""
    if config.compute_threads is not None:
        return config.compute_threads
    if not config.engine.device.startswith("cpu") or environ.get("OMP_NUM_THREADS"):
        return None
    if text_parameters >= COMPILE_DECODE_ON_CPU_FROM:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


def engine_cores(config: ServerConfig, threads: int) -> tuple[int, ...] | None:
    """The CPU cores the engine process computes on -> the last `threads` of the usable cores, or None (not
    pinned). Pinned only where the engine runs in a process of its own on the CPU and its threads leave a core
    to the API server (compute_threads' policy): the engine's one thread then never shares a core, nor moves
    between them, when the event loop, the sockets or the clients wake; the API process's threads go on the
    cores it leaves (`pin_threads`). vLLM's CPU backend binds its OpenMP threads likewise
    (VLLM_CPU_OMP_THREADS_BIND=auto). `benchmarks/bench_peers.py --variant` side by side (README, "Speed")."""
    if not (config.pin_engine and config.engine_process and config.engine.device.startswith("cpu")):
        return None
    if not hasattr(os, "sched_getaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    return tuple(usable[-threads:]) if 0 < threads < len(usable) else None


def pin_threads(cores: set[int]) -> None:
    """Every thread of this process onto `cores`, as `taskset -a` does: os.sched_setaffinity binds one thread,
    and a thread made later inherits its creator's cores. Linux only (where engine_cores pins)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, FileNotFoundError):  # a thread that ended meanwhile
            pass


class ServerState:
    """Everything the routes need, passed through app.state (no module-level globals)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.checkpoint = Path(config.checkpoint) if config.checkpoint else EMBEDDED_CHECKPOINT
        self.model_name = config.served_model_name or self.checkpoint.name
        self.engine: AsyncEngine | None = None
        self.metrics = Metrics()
        self.tokenizer = None
        self._cores_before: set[int] | None = None  # this process's cores before it left the engine's
        self.trained_sizes: list[tuple[int, int]] = []
        self.default_steps = 0
        self.image_answer = ImageAnswer()  # how the checkpoint answers with an image (text first or not)
        self.started = int(time.time())
        self.vae = None
        self._vae_lock = threading.Lock()
        self._api_registry = CollectorRegistry()  # this process's memory and CPU, beside the engine process's
        ProcessCollector(namespace="xfusion_api_server", registry=self._api_registry)
        self.ready = False
        self.admitting = 0  # queue places promised to requests whose bodies are still being read

    def check_size(self, size: str | None) -> tuple[int, int] | None:
        """'WxH' -> (height, width), only for a size the checkpoint was trained on; None or 'auto': the default."""
        if not size or size == "auto":
            return None
        w, h = map(int, size.split("x"))
        if (h, w) not in self.trained_sizes:
            trained = ", ".join(f"{w}x{h}" for h, w in self.trained_sizes)
            raise APIError(400, f"size {size} is not a trained size; use one of: {trained}", param="size")
        return h, w

    def check_model(self, model: str | None) -> None:
        """A request naming a model must name the one served (OpenAI's 404 otherwise); none: the served one."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves {self.model_name!r}",
                           param="model")

    def preview_b64(self, latents) -> list[str]:
        """Scaled latents [n, C, h, w] -> PNGs as base64. The engine process keeps its VAE to itself: this
        process loads one (on the engine's device, in its precision, as the engine's own) at the first preview
        asked for."""
        with self._vae_lock:
            if self.vae is None:
                e = self.config.engine
                self.vae = load_checkpoint(self.checkpoint, dtype=e.dtype, device=e.device, load_weights=False).vae
        return [image_to_base64(im) for im in decode_latents(self.vae, latents)]

    def load(self, engine: Engine | None = None) -> None:
        """Loads the model: `engine` given (tests, embedders) or engine_process False: on a thread of this
        process; else in an engine process, this one keeping only the tokenizer and the configuration."""
        if engine is None and self.config.engine_process:
            ckpt = load_checkpoint(self.checkpoint, load_vae=False, load_weights=False)
            self._describe(ckpt)
            threads = torch.get_num_threads()
            cores = engine_cores(self.config, threads)
            self.engine = EngineProcess(EngineSpec(str(self.checkpoint), self.config.engine, threads, Metrics,
                                                   cores), tokenizer=ckpt.tokenizer)
        else:
            engine = engine or Engine.from_checkpoint(self.checkpoint, self.config.engine)
            self._describe(engine.ckpt)
            self.vae = engine.ckpt.vae
            engine.warm_up()
            self.engine = AsyncEngine(engine, self.metrics)
        self.engine.start()
        if isinstance(self.engine, EngineProcess) and self.engine.spec.cores is not None:
            # off the engine's cores once it has started (it sets its own): the event loop and the reader and
            # sender threads never take the core of the engine's thread (close() gives them back)
            self._cores_before = os.sched_getaffinity(0)
            pin_threads(self._cores_before - set(self.engine.spec.cores))
            log.info("the API server runs on CPU cores %s", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        self.ready = True

    def _describe(self, ckpt) -> None:
        self.tokenizer = ckpt.tokenizer
        self.trained_sizes = [tuple(s) for s in ckpt.config.image_sizes]
        self.default_steps = ckpt.config.sampler.steps
        self.image_answer = ckpt.config.image_answer

    async def render_metrics(self) -> bytes:
        """Prometheus' text: the engine's metrics (where it runs), and this process's own memory and CPU when
        the engine runs in a process of its own."""
        if self.engine is None or not self.engine.alive:
            return self.metrics.render()
        try:
            body = await self.engine.call(render_metrics)
        except EngineFailed:  # it failed since: as if it had before
            return self.metrics.render()
        if isinstance(self.engine, EngineProcess):
            body += generate_latest(self._api_registry)
        return body

    def close(self) -> None:
        self.ready = False
        if self.engine is not None:
            self.engine.shutdown()
        if self._cores_before is not None:
            pin_threads(self._cores_before)
            self._cores_before = None
