"""Two engine settings of one checkpoint side by side, in process, no HTTP: each side is an engine in a process of
its own (its own torch threads and compiled graphs), and their waves alternate (A B, then B A, ...) so that a
machine whose speed drifts by the minute moves both alike. Prints each side's tok/s (or images/s) per concurrency
(median of the rounds) and the median of each round's own ratio B/A with its range; and whether both made the same
tokens (or pixels).

    python benchmarks/ab_engine.py --checkpoint DIR --a cpu_kernels=false --b cpu_kernels=true
        [--threads 1] [--a-threads N] [--b-threads N] [--concurrency 1,4,16,64] [--max-tokens 64] [--rounds 9]
        [--images]

`--a` / `--b`: EngineConfig fields as `name=value` (comma separated; true/false/none, numbers, else text), over
the server's engine settings (every model's decode step compiled). Each wave sends `c` requests of the same
prompts as benchmarks/bench_peers.py at once, greedy, `max_tokens` new tokens each (end of sequence ignored),
and steps the engine as the server's engine process does (`step_tokens`: token ids, no text) until all are
done. tok/s = tokens made / the wave's seconds. `--images`: each wave asks for `c` images instead (IMAGE_PROMPTS,
seeds 0 to c - 1, the checkpoint's first size, steps and guidance), as `step_tokens` makes them; images/s =
images / the wave's seconds, and "same" compares their pixels. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from bench_peers import PROMPTS

IMAGE_PROMPTS = ["a large red circle at the center", "a small blue square at the top left",
                 "a green triangle at the bottom right", "two yellow circles side by side"]


def parse_overrides(text: str) -> dict:
    """"a=1,b=true,c=none,d=cpu" -> {"a": 1, "b": True, "c": None, "d": "cpu"}. Raises SystemExit naming a
    field EngineConfig does not have."""
    from xfusion_serve import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or name not in fields:
            sys.exit(f"not an EngineConfig field=value: {item!r} (fields: {', '.join(sorted(fields))})")
        literal = {"true": True, "false": False, "none": None}
        if raw.lower() in literal:
            out[name] = literal[raw.lower()]
            continue
        for kind in (int, float):
            try:
                out[name] = kind(raw)
                break
            except ValueError:
                pass
        else:
            out[name] = raw
    return out


def side(conn: Connection, checkpoint: str, overrides: dict, threads: int | None) -> None:
    """One side's process: builds the engine as `xfusion-serve serve` would (then `overrides`), says ready
    (or why not), then runs each (kind, concurrency, max_tokens) wave it is sent and answers its figures."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        from xfusion_serve import Engine, EngineConfig

        engine = Engine.from_checkpoint(checkpoint, EngineConfig(**{"compile_decode_from": 0, **overrides}))
        engine.warm_up()
        engine.capture_graphs()
    except Exception as e:  # noqa: BLE001 - the parent says why and stops
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", torch.get_num_threads()))
    while (job := conn.recv()) is not None:
        try:
            conn.send(image_wave(engine, job[1]) if job[0] == "images" else text_wave(engine, *job[1:]))
        except Exception as e:  # noqa: BLE001 - the parent says why and stops
            conn.send({"failed": f"{type(e).__name__}: {e}"})
            return


def events_until_done(engine):
    """Steps the engine as its server process does (`step_tokens`) until it has no work -> every event. Raises
    RuntimeError for a request that failed: a side that drops outputs must not be timed as if it made them."""
    while engine.has_work():
        for ev in engine.step_tokens():
            if ev.kind == "done" and ev.error:
                raise RuntimeError(f"a request failed: {ev.error}")
            yield ev


def text_wave(engine, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` requests of `max_tokens` tokens -> {"seconds", "count": tokens, "outputs": their ids}."""
    from xfusion_serve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    ids = [engine.add_text(engine.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, params) for i in range(concurrency)]
    made = {rid: [] for rid in ids}
    for ev in events_until_done(engine):
        made[ev.request_id] += ev.token_ids
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "count": sum(map(len, made.values())), "outputs": [made[rid] for rid in ids]}


def image_wave(engine, concurrency: int) -> dict:
    """`concurrency` image requests -> {"seconds", "count": images, "outputs": their pixels (bytes)}."""
    start = time.perf_counter()
    ids = [engine.add_image(IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], seed=i) for i in range(concurrency)]
    made = {ev.request_id: [image.tobytes() for image in ev.images]
            for ev in events_until_done(engine) if ev.kind == "done"}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "count": sum(map(len, made.values())), "outputs": [made.get(rid) for rid in ids]}


def start(name: str, checkpoint: str, overrides: dict, threads: int | None):
    parent, child = multiprocessing.get_context("spawn").Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=side, args=(child, checkpoint, overrides, threads),
                                                        name=f"ab-{name}", daemon=True)
    proc.start()
    kind, detail = parent.recv()
    if kind != "ready":
        sys.exit(f"side {name} did not start: {detail}")
    return proc, parent, detail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(Path(__file__).parents[1] / "xfusion_serve/checkpoints/shapes-demo"))
    p.add_argument("--a", default="", help="EngineConfig overrides of side A, name=value,...")
    p.add_argument("--b", default="", help="EngineConfig overrides of side B")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both sides (default: torch's)")
    p.add_argument("--a-threads", type=int, default=None)
    p.add_argument("--b-threads", type=int, default=None)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--images", action="store_true", help="image requests instead of text (max-tokens unused)")
    args = p.parse_args()
    overrides = {"A": parse_overrides(args.a), "B": parse_overrides(args.b)}
    threads = {"A": args.a_threads or args.threads, "B": args.b_threads or args.threads}
    sides = {name: start(name, args.checkpoint, overrides[name], threads[name]) for name in ("A", "B")}
    for name, (_, _, n) in sides.items():
        print(f"{name}: {overrides[name] or 'defaults'}, torch threads {n}")

    kind, unit = ("images", "images/s") if args.images else ("text", "tok/s")

    def wave(name: str, concurrency: int, max_tokens: int) -> dict:
        conn = sides[name][1]
        conn.send((kind, concurrency, max_tokens))
        got = conn.recv()
        if "failed" in got:
            sys.exit(f"side {name} failed: {got['failed']}")
        return got

    for name in sides:  # the first waves pay for one-off work (allocator, caches): not counted
        wave(name, 2 if args.images else 4, 16)
    what = "images" if args.images else f"{args.max_tokens} new tokens per request"
    print(f"{what}, {args.rounds} rounds, B/A > 1: B makes more {'images' if args.images else 'tokens'} a second")
    for c in map(int, args.concurrency.split(",")):
        rates = {"A": [], "B": []}
        same = True
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            got = {name: wave(name, c, args.max_tokens) for name in order}
            for name, w in got.items():
                rates[name].append(w["count"] / w["seconds"])
            same &= got["A"]["outputs"] == got["B"]["outputs"]
        ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
        print(f"c={c:<3d} A {statistics.median(rates['A']):9.2f} {unit}   B {statistics.median(rates['B']):9.2f} {unit}"
              f"   B/A {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
              f"   same {'pixels' if args.images else 'tokens'}: {'yes' if same else 'no'}", flush=True)
    for proc, conn, _ in sides.values():
        conn.send(None)
        proc.join(30)


if __name__ == "__main__":
    main()
