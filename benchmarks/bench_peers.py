"""xfusion-serve against vLLM (CPU build) and llama.cpp's llama-server on the same Llama, through HTTP.

    python benchmarks/bench_peers.py --preset smol-135m                 # builds the model (random weights)
    python benchmarks/bench_peers.py --checkpoint DIR --servers engine,xfusion   # ours only: in-process vs HTTP

Every server gets the same prompts (each wave its own: no prefix cache answers from an earlier wave), greedy,
`max_tokens` new tokens each with end-of-sequence ignored (random weights make texts short; each server takes
`ignore_eos`), through streaming `/v1/completions`; tokens are counted from each response's usage (or its
chunks where a server gives none). A wave of `c` requests is sent at once for each concurrency
`c`; rounds interleave the servers and the median round is kept. Prints output tok/s, time to first token,
inter-token latency p50/p99 and the server's resident memory, then our ratio to each peer: of the median rounds,
and the median (and range) of each round's own ratio, whose two waves ran closest in time. By default one server
runs at a time, started anew each round; `--together` starts them all once and interleaves every wave (pairs
seconds apart, for a machine whose speed drifts; it needs the memory of all the servers at once; each round
starts with another server). Every wave waits for the machine to be idle first (`settle`). "engine" is
xfusion-serve's engine in this process with the server's engine settings, with no HTTP: the same waves, for the
HTTP overhead ("engine-eager": its decode step not compiled; "engine-server-threads": on as many torch threads
as the served engine computes on, one on the demo on 2 cores, so that the gap splits into the core the server
keeps for HTTP and the rest); "xfusion" is
the server as it runs by default (its engine in a process of its own), "xfusion-thread" the server with its
engine on a thread of its own process (`--no-engine-process`); `--variant NAME=OPTIONS` adds a server with other
serve options to the same rounds, for settings side by side. RSS is the server's whole process tree.
Set-up of the peers (first run, minutes): see benchmarks/peers.py. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import peers

PROMPTS = [
    "The history of the city begins in the early years of the century, when",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In a small village at the edge of the forest there lived an old clockmaker who",
    "The three most important ideas in the theory of computation are",
    "Dear committee, I am writing to ask for a review of the decision made on",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n",
    "The recipe calls for two cups of flour, one egg and",
    "Once the server has started, open a terminal and type",
]


def wave_prompts(tag: str, concurrency: int) -> list[str]:
    """The prompts of one wave, each marked with the wave's tag and its index: every server gets the same ones,
    and no prompt repeats an earlier wave's or another request's, so that no server answers from a prefix cache
    (vLLM caches prefixes; llama-server gives a request the slot whose cached prompt it shares most of)."""
    return [f"({tag}.{i}) {PROMPTS[i % len(PROMPTS)]}" for i in range(concurrency)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
                      out: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, usage = [], None
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
        async for line in r.content:  # one server-sent-event line at a time
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else len(stamps)
    out["tokens"] += tokens
    out["ttft"].append(stamps[0] - start if stamps else float("nan"))
    out["itl"] += [b - a for a, b in zip(stamps, stamps[1:])]


async def http_wave(url: str, prompts: list[str], max_tokens: int) -> dict:
    """One wave through HTTP. The client is aiohttp: on this 2-core machine it shares the cores with the server,
    and it takes about a third of the CPU httpx took for the same streams (0.07-0.10 core against 0.23 at 16
    streams of the demo)."""
    out = {"tokens": 0, "ttft": [], "itl": []}
    connector = aiohttp.TCPConnector(limit=len(prompts) + 4)
    url = url.rstrip("/")
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async with session.get(url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]  # the name each server serves under
        start = time.perf_counter()
        await asyncio.gather(*(one_request(session, url, model, prompt, max_tokens, out) for prompt in prompts))
        out["seconds"] = time.perf_counter() - start
    return out


class InProcess:
    """xfusion-serve's engine with no server: the same wave, timed from the engine's events."""

    name, precision = "engine (in-process)", "float32"

    def __init__(self, checkpoint: Path, dtype: str, compile_decode: bool | None = None,
                 threads: int | None = None):
        from xfusion_serve import Engine, EngineConfig

        import torch

        self.torch_threads = threads or torch.get_num_threads()  # this process's torch is shared: set per wave
        self.threads = f"torch {self.torch_threads}"
        config = EngineConfig(dtype=dtype, compile_decode=compile_decode, compile_decode_from=0)  # as `serve`'s
        before = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)  # compiled for them: torch.compile guards on the thread count
        try:
            self.engine = Engine.from_checkpoint(checkpoint, config)
            self.engine.warm_up()
            self.engine.capture_graphs()
        finally:
            torch.set_num_threads(before)
        self.precision = dtype

    def wave(self, prompts: list[str], max_tokens: int) -> dict:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._wave(prompts, max_tokens)
        finally:
            torch.set_num_threads(before)

    def _wave(self, prompts: list[str], max_tokens: int) -> dict:
        from xfusion_serve import SamplingParams

        engine, tok = self.engine, self.engine.tokenizer
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        ids = {engine.add_text(tok(prompt).input_ids, params): start for prompt in prompts}
        out, last = {"tokens": 0, "ttft": [], "itl": []}, {}
        while len(last) < len(ids) or engine.has_work():
            events = engine.step()
            now = time.perf_counter()
            for ev in events:
                if ev.request_id not in ids or not ev.token_ids:
                    continue
                out["tokens"] += len(ev.token_ids)
                if ev.request_id in last:
                    out["itl"].append(now - last[ev.request_id])
                else:
                    out["ttft"].append(now - start)
                last[ev.request_id] = now
        out["seconds"] = time.perf_counter() - start
        return out


def served_threads(checkpoint: Path) -> int:
    """The torch threads `xfusion-serve serve` gives its engine on this machine, by default."""
    import torch
    from xfusion_serve.model.checkpoint import text_tower_parameters
    from xfusion_serve.server.state import ServerConfig, compute_threads

    return compute_threads(ServerConfig(checkpoint=str(checkpoint)), text_tower_parameters(checkpoint)) \
        or torch.get_num_threads()


def summarize(waves: list[dict]) -> dict:
    """The median wave by throughput, with its latencies."""
    best = sorted(waves, key=lambda w: w["tokens"] / w["seconds"])[len(waves) // 2]
    return {"tok_s": best["tokens"] / best["seconds"], "ttft_ms": 1000 * statistics.median(best["ttft"]),
            "itl_p50_ms": 1000 * percentile(best["itl"], 0.5), "itl_p99_ms": 1000 * percentile(best["itl"], 0.99),
            "tokens": best["tokens"]}


def cpu_busy() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    ticks = [int(t) for t in open("/proc/stat").readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


SETTLE_LIMIT_S = 15.0


def settle(busy_below: float = 0.10, window: float = 0.25, limit: float = SETTLE_LIMIT_S) -> float:
    """Waits until the machine's CPUs are at least 90% idle over `window` seconds (at most `limit`) -> the
    seconds waited. A server that keeps its cores busy for a while after a wave (vLLM's CPU workers did, for
    about a second) would otherwise slow the next server's wave: llama-server's first token took a second so."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        b0, t0 = cpu_busy()
        time.sleep(window)
        b1, t1 = cpu_busy()
        if (b1 - b0) <= busy_below * max(1, t1 - t0):
            break
    return time.perf_counter() - start


def round_ratios(ours: list[dict], peer: list[dict]) -> list[float]:
    """Our tok/s over the peer's, round by round (the waves of a round ran closest in time)."""
    return [(a["tokens"] / a["seconds"]) / (b["tokens"] / b["seconds"]) for a, b in zip(ours, peer)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="an X-Fusion checkpoint (its text tower serves the peers)")
    src.add_argument("--preset", help="build one with benchmarks/make_checkpoint.py (cached), e.g. smol-135m")
    p.add_argument("--servers", default="engine,xfusion,vllm,llama.cpp")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="ours (the peers run float32 / f32 GGUF)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "xfusion-serve" / "peers")
    p.add_argument("--xfusion-args", default="", help="extra `xfusion-serve serve` options")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                   help="one more xfusion-serve server in the same rounds, named NAME, with these extra serve "
                        "options (e.g. unpinned=--no-pin-engine); repeatable")
    p.add_argument("--together", action="store_true",
                   help="all servers up at once, every wave interleaved (default: one at a time, each round)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if bad := [v for v in args.variant if "=" not in v]:
        p.error(f"--variant takes NAME=OPTIONS, got {bad[0]!r}")
    variants = dict(v.split("=", 1) for v in args.variant)
    args.cache.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.servers.split(",") + list(variants)

    checkpoint = args.checkpoint
    if checkpoint is None:
        import make_checkpoint

        checkpoint = args.cache / "checkpoints" / args.preset
        if not (checkpoint / "xfusion_config.json").exists():
            make_checkpoint.build(args.preset, "tiny", (64, 64), checkpoint)
    text_dir = checkpoint / "text_tower"
    print(f"model {checkpoint}; {args.max_tokens} new tokens per request, greedy; waves of {levels}; "
          f"median of {args.rounds} rounds", flush=True)

    servers, port = {}, 18500
    for name in names:
        port += 1
        if name == "engine":
            servers[name] = InProcess(checkpoint, args.dtype)
        elif name == "engine-eager":
            servers[name] = InProcess(checkpoint, args.dtype, compile_decode=False)
        elif name == "engine-server-threads":
            servers[name] = InProcess(checkpoint, args.dtype, threads=served_threads(checkpoint))
        elif name == "xfusion":
            servers[name] = peers.xfusion(checkpoint, port, args.dtype, args.xfusion_args.split())
        elif name == "xfusion-thread":  # the engine on a thread of the server's process, sharing its GIL
            servers[name] = peers.xfusion(checkpoint, port, args.dtype, args.xfusion_args.split()
                                          + ["--no-engine-process"])
        elif name in variants:
            servers[name] = peers.xfusion(checkpoint, port, args.dtype, args.xfusion_args.split()
                                          + variants[name].split(), name=name)
        elif name == "vllm":
            servers[name] = peers.vllm(args.cache, text_dir, port, max(levels))
        elif name == "llama.cpp":
            servers[name] = peers.llama_cpp(args.cache, text_dir, port, max(levels))
        else:
            raise SystemExit(f"unknown server {name!r}")

    results: dict[str, dict[int, list]] = {n: {c: [] for c in levels} for n in names}
    rss: dict[str, int] = {}
    logs = args.cache / "logs"
    http = {name: server for name, server in servers.items() if isinstance(server, peers.Server)}

    def start(name: str) -> None:
        http[name].start(logs)
        asyncio.run(http_wave(http[name].url, wave_prompts("warm-up", 1), 8))

    def stop(name: str) -> None:
        rss[name] = max(rss.get(name, 0), http[name].rss())
        http[name].stop()

    def measure(r: int, name: str, c: int) -> None:
        server = servers[name]
        prompts = wave_prompts(f"{r + 1}.{c}", c)  # each server gets this wave's prompts once
        if (waited := settle()) >= SETTLE_LIMIT_S:
            print(f"the machine did not settle in {waited:.0f} s before {name}'s wave", flush=True)
        w = server.wave(prompts, args.max_tokens) if isinstance(server, InProcess) else asyncio.run(
            http_wave(server.url, prompts, args.max_tokens))
        results[name][c].append(w)
        print(f"round {r + 1} {name:>20} c={c:<3} {w['tokens'] / w['seconds']:8.1f} tok/s", flush=True)

    try:
        for name in http if args.together else ():
            start(name)
        for r in range(args.rounds):
            if args.together:
                order = names[r % len(names):] + names[: r % len(names)]  # each server first in some rounds
                for c in levels:
                    for name in order:
                        measure(r, name, c)
                continue
            for name in names:
                if name in http:
                    start(name)
                for c in levels:
                    measure(r, name, c)
                if name in http:
                    stop(name)
        for name in http if args.together else ():
            stop(name)
    finally:
        for server in http.values():
            server.stop()

    figures = {n: {c: summarize(results[n][c]) for c in levels} for n in names}
    print("\nserver               precision  threads                          c   tok/s  TTFT ms  ITL p50  ITL p99"
          "  RSS MiB")
    for name, server in servers.items():
        for c in levels:
            f = figures[name][c]
            mem = f"{rss[name] / 2**20:8.0f}" if name in rss else "       -"
            print(f"{name:<20} {server.precision:<10} {server.threads[:30]:<30} {c:>3} {f['tok_s']:7.1f} "
                  f"{f['ttft_ms']:8.1f} {f['itl_p50_ms']:8.1f} {f['itl_p99_ms']:8.1f} {mem}")
    ours = "xfusion" if "xfusion" in names else "engine"
    paired = {}
    for peer in [n for n in names if n != ours]:
        ratios = "  ".join(f"c={c}: {figures[ours][c]['tok_s'] / figures[peer][c]['tok_s']:.2f}x" for c in levels)
        print(f"{ours} / {peer} (tok/s): {ratios}")
        paired[peer] = {c: round_ratios(results[ours][c], results[peer][c]) for c in levels}
        print(f"{ours} / {peer}, median of each round's ratio (range): " + "  ".join(
            f"c={c}: {statistics.median(x):.2f}x ({min(x):.2f}-{max(x):.2f})" for c, x in paired[peer].items()))
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "rss": rss, "round_ratios": paired}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
