"""Load generator: a mix of chat, caption and image requests at a set concurrency for a set time, against a
running server (not a test: it prints figures).

    python benchmarks/load.py --serve --concurrency 32 --duration 300 --check 200   # starts its own server
    python benchmarks/load.py --url http://host:8000 ...                             # or load a running one

Prints throughput, latency percentiles (p50/p95/p99) per kind, time to first token (streamed chat), errors
by status, and the server's memory (resident set, from /metrics) at start, peak and end, with KV-cache use.
Every request carries a marker (its own prompt words, image and seed); `--check N` re-sends N of them, one at
a time, after the load and counts answers that differ from what the request got under load (mixed up).
`--soak` prints memory and cache use at every interval, and the growth over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from xfusion_serve.demo.shapes import sample as shape_sample

QUESTIONS = ["What shapes are there?", "What colors are there?", "Where can a shape be?", "What can you do?"]


@dataclass
class Record:
    kind: str
    path: str
    body: dict
    status: int = 0
    latency: float = 0.0
    ttft: float | None = None
    answer: object = None
    tokens: int = 0


@dataclass
class Monitor:
    """The server's resident memory and KV-cache use, sampled from /metrics."""

    samples: list[tuple[float, float, dict]] = field(default_factory=list)

    async def sample(self, client: httpx.AsyncClient, t0: float) -> None:
        text = (await client.get("/metrics")).text
        rss, cache = 0.0, {}
        for line in text.splitlines():
            if line.startswith("process_resident_memory_bytes "):
                rss = float(line.split()[-1])
            elif line.startswith("xfusion_kv_cache_usage_perc{"):
                cache[line.split('tower="')[1].split('"')[0]] = float(line.split()[-1])
        self.samples.append((time.monotonic() - t0, rss, cache))


def make_request(kind: str, n: int, rng: random.Random, image_steps: int | None) -> Record:
    if kind == "chat":
        shape = shape_sample(50_000 + n, 0)[0]
        content = f"there is {shape.caption}. it is a" if n % 2 else QUESTIONS[n % len(QUESTIONS)] + f" ({n})"
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 32, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        return Record(kind, "/v1/chat/completions", body)
    if kind == "caption":
        buf = io.BytesIO()
        shape_sample(60_000 + n, 0)[1].save(buf, format="PNG")
        return Record(kind, "/v1/caption", {"image": base64.b64encode(buf.getvalue()).decode(), "max_tokens": 32})
    shape = shape_sample(70_000 + n, 0)[0]
    body = {"prompt": shape.caption, "seed": n, "n": rng.choice([1, 1, 2])} | ({"steps": image_steps} if image_steps else {})
    return Record(kind, "/v1/generate-image", body)


async def send(client: httpx.AsyncClient, rec: Record, stream: bool) -> Record:
    start = time.monotonic()
    try:
        if stream:
            text = ""
            async with client.stream("POST", rec.path, json=rec.body) as r:
                rec.status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec.status = chunk["error"].get("code") or 500
                        break
                    for choice in chunk.get("choices", []):
                        if choice["delta"].get("content"):
                            rec.ttft = rec.ttft or time.monotonic() - start
                            text += choice["delta"]["content"]
                    if chunk.get("usage"):
                        rec.tokens = chunk["usage"]["completion_tokens"]
            rec.answer = text
        else:
            r = await client.post(rec.path, json=rec.body)
            rec.status = r.status_code
            if r.status_code == 200:
                data = r.json()
                rec.answer = data.get("caption") if "caption" in data else [d["b64_json"] for d in data["data"]]
                rec.tokens = data.get("usage", {}).get("completion_tokens", 0)
    except httpx.HTTPError as e:
        rec.status = -1
        rec.answer = type(e).__name__
    rec.latency = time.monotonic() - start
    return rec


def same(a, b) -> bool:
    """Text must be identical; images equal up to rounding (batched and alone differ by float noise)."""
    if isinstance(a, list) and isinstance(b, list):
        def pixels(s):
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))), dtype=np.int16)
        return len(a) == len(b) and all(np.abs(pixels(x) - pixels(y)).mean() < 1.0 for x, y in zip(a, b))
    return a == b


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(args) -> None:
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        (await client.get("/ready")).raise_for_status()
        weights = dict(kv.split("=") for kv in args.mix.split(","))
        kinds, w = list(weights), [float(v) for v in weights.values()]
        records: list[Record] = []
        monitor, t0 = Monitor(), time.monotonic()
        await monitor.sample(client, t0)
        deadline, counter = t0 + args.duration, iter(range(10**9))

        async def worker(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() < deadline:
                rec = make_request(rng.choices(kinds, w)[0], next(counter), rng, args.image_steps)
                records.append(await send(client, rec, stream=rec.kind == "chat"))

        async def sampler() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(args.interval)
                await monitor.sample(client, t0)
                if args.soak:
                    _, rss, cache = monitor.samples[-1]
                    print(f"  t={monitor.samples[-1][0]:6.0f}s  rss {rss / 2**20:7.1f} MiB  cache {cache}", flush=True)

        await asyncio.gather(sampler(), *(worker(i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.0)  # one step for cancelled and finished requests to hand back their blocks
        await monitor.sample(client, t0)
        report(records, monitor, elapsed, args)
        if args.check:
            await check(client, records, args)


def report(records: list[Record], monitor: Monitor, elapsed: float, args) -> None:
    ok = [r for r in records if r.status == 200]
    print(f"\n{len(records)} requests in {elapsed:.0f} s at concurrency {args.concurrency}: "
          f"{len(ok) / elapsed:.2f} req/s ok, errors by status {dict(Counter(r.status for r in records if r.status != 200))}")
    print(f"  5xx: {sum(1 for r in records if r.status >= 500 or r.status < 0)}")
    by_kind = defaultdict(list)
    for r in ok:
        by_kind[r.kind].append(r)
    for kind, recs in sorted(by_kind.items()):
        lat = [r.latency for r in recs]
        extra = ""
        if kind == "chat":
            ttft = [r.ttft for r in recs if r.ttft is not None]
            extra = (f"  ttft p50 {pct(ttft, 50) * 1e3:.0f} ms p99 {pct(ttft, 99) * 1e3:.0f} ms"
                     f"  {sum(r.tokens for r in recs) / elapsed:.1f} tok/s")
        if kind == "image":
            extra = f"  {sum(len(r.answer) for r in recs) / elapsed:.2f} images/s"
        print(f"  {kind:8s} {len(recs):6d} ok  latency p50 {pct(lat, 50):6.2f} s  p95 {pct(lat, 95):6.2f} s  "
              f"p99 {pct(lat, 99):6.2f} s{extra}")
    rss = [s[1] for s in monitor.samples]
    first, last = monitor.samples[0], monitor.samples[-1]
    print(f"  server memory (RSS): start {rss[0] / 2**20:.1f} MiB, peak {max(rss) / 2**20:.1f} MiB, "
          f"end {rss[-1] / 2**20:.1f} MiB")
    print(f"  KV cache use: start {first[2]}, end {last[2]}")
    if args.soak and len(monitor.samples) > 4:
        half = len(monitor.samples) // 2
        growth = statistics.mean(rss[half:]) - statistics.mean(rss[1:half])
        print(f"  soak: mean RSS second half - first half = {growth / 2**20:+.1f} MiB")


async def check(client: httpx.AsyncClient, records: list[Record], args) -> None:
    """Each checked request again, alone: greedy text and seeded images must come back the same."""
    ok = [r for r in records if r.status == 200]
    picked = random.Random(args.seed).sample(ok, min(args.check, len(ok)))
    mixed = 0
    for rec in picked:
        again = await send(client, Record(rec.kind, rec.path, rec.body), stream=rec.kind == "chat")
        if again.status != 200 or not same(rec.answer, again.answer):
            mixed += 1
            print(f"  MISMATCH {rec.kind} {rec.path}: under load {str(rec.answer)[:60]!r} alone {str(again.answer)[:60]!r}")
    print(f"  mixed-up responses: {mixed} of {len(picked)} checked against the same request run alone")


def start_server(port: int) -> subprocess.Popen:
    """`xfusion-serve serve` on the embedded default, as a user starts it; -> once /ready answers."""
    log = open(f"load-server-{port}.log", "w")  # its access log would drown the figures
    print(f"server log: {log.name}")
    proc = subprocess.Popen([sys.executable, "-m", "xfusion_serve.cli", "serve", "--port", str(port)],
                            env=os.environ | {"XFUSION_MAX_QUEUE": "1024"}, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not get ready in 5 minutes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--mix", default="chat=5,caption=3,image=2", help="relative weights of the request kinds")
    p.add_argument("--image-steps", type=int, default=None, help="denoising steps (default: the server's)")
    p.add_argument("--check", type=int, default=0, help="re-send this many requests alone and compare")
    p.add_argument("--soak", action="store_true", help="print memory and cache use at every interval")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between /metrics samples")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="start `xfusion-serve serve` (embedded default) on --port")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    server = None
    if args.serve:
        server = start_server(args.port)
        args.url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(run(args))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            print(f"server exit code after SIGTERM: {server.wait(60)}")


if __name__ == "__main__":
    main()
