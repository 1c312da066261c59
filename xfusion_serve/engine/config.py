"""The engine's configuration: device and precision, attention backend, KV-cache budget, batch limits,
compilation. Bad values raise ValueError when the config is built."""

from __future__ import annotations

from dataclasses import dataclass

# benchmarks/bench_peers.py on the CPU: compiled, a 135M-parameter model decodes 1.4x (one sequence) to 1.7x
# (16) faster than eagerly, after a compile of about two minutes (20 s once inductor's disk cache holds it).
COMPILE_DECODE_ON_CPU_FROM = 50_000_000


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"
    # model/attention.py's BACKENDS. None: "cpu" (the project's C++ decode kernel) for float32 on the CPU where
    # it can be built and the head size is a multiple of 16, else "torch".
    attention_backend: str | None = None
    # Bytes for both towers' KV pools; None: kv_cache_fraction of the memory free once the weights are loaded
    # (at most what max_running requests at full context can fill).
    kv_cache_memory: int | None = None
    kv_cache_fraction: float | None = None  # None: 0.25 on the CPU (a process shares its RAM), 0.85 on CUDA
    vision_cache_fraction: float = 0.25  # of the KV budget, for image prompts
    block_size: int = 16
    max_running: int = 64  # text requests decoding at once
    max_image_rows: int = 64  # image rows (CFG counts twice) denoising at once
    max_prompt_images: int = 8  # pictures in one prompt (a conversation's, an edit's); more is a 400
    max_prompt_image_tokens: int = 4096  # their tokens together
    # torch.compile the decode step (as CUDA graphs on GPU) and the denoising step at start-up. None: on CUDA;
    # on the CPU the decode step for a text tower of compile_decode_from parameters or more, the denoising step
    # not. A compile chosen so that fails (no C++ compiler) leaves the engine eager, with a warning.
    compile_decode: bool | None = None
    compile_denoise: bool | None = None
    # By default COMPILE_DECODE_ON_CPU_FROM: an engine built for a few requests (tests, scripts) does not wait
    # for a compile that a long run pays back. `xfusion-serve serve` sets 0: a server compiles every model
    # (the demo: 8 s at start-up, 33-40 s with an empty inductor cache, for 1.2x-1.7x its eager tok/s).
    compile_decode_from: int = COMPILE_DECODE_ON_CPU_FROM
    # The project's float32 matrix multiply for few rows (kernels/xfusion_kernels/cpu_linear.cpp), built for
    # this CPU at start-up with the cpu attention backend's kernel (20-40 s; cached by torch after the first
    # time). None: on for float32 on the CPU, every model size (the demo at 1 to 64 requests: 1.05x-1.23x its
    # tok/s with MKL on one thread, 1.00x-1.23x on two; README, thirteenth session); where it cannot be built
    # (no C++ compiler) the engine uses torch's linear.
    cpu_kernels: bool | None = None

    def __post_init__(self):
        on_cuda = self.device.startswith("cuda")
        if self.kv_cache_fraction is None:
            self.kv_cache_fraction = 0.85 if on_cuda else 0.25
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError("kv_cache_fraction must lie in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive (or None: sized from free memory)")
        if self.cpu_kernels is None:
            self.cpu_kernels = self.device == "cpu" and self.dtype == "float32"
        if self.cpu_kernels and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError("cpu_kernels needs device cpu and dtype float32")
        if on_cuda and self.compile_decode is None:
            self.compile_decode = True  # on the CPU the engine decides from the model's size
        self.compile_denoise = on_cuda if self.compile_denoise is None else self.compile_denoise
        if self.compile_decode_from < 0:
            raise ValueError("compile_decode_from must be 0 or more (text-tower parameters)")
        if not 0.0 < self.vision_cache_fraction < 1.0:
            raise ValueError("vision_cache_fraction must lie strictly between 0 and 1")
        if self.block_size < 1 or self.max_running < 1 or self.max_image_rows < 1:
            raise ValueError("block_size, max_running and max_image_rows must be positive")
        if self.max_prompt_images < 0 or self.max_prompt_image_tokens < 0:
            raise ValueError("max_prompt_images and max_prompt_image_tokens must be 0 or more")
        if self.attention_backend is None and (self.device != "cpu" or self.dtype != "float32"):
            self.attention_backend = "torch"  # on the CPU in float32 the engine decides from the model
        if self.attention_backend == "cpu" and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError("attention_backend cpu needs device cpu and dtype float32")
        if self.attention_backend == "flash-attn" and (self.block_size % 256 or self.dtype == "float32"):
            raise ValueError("the flash-attn backend needs block_size a multiple of 256 and dtype bfloat16 or float16")
