"""Prometheus metrics in vLLM's naming, with an `xfusion` prefix and a `task` label (text, caption, image).

Updated where the engine steps (its thread, or its own process): counters and histograms after every step from
its events, gauges from the scheduler's state when scraped. Gauges keep vLLM's types and meaning because
autoscalers read them.
"""

from __future__ import annotations

import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..engine.engine import Engine
from ..engine.request import Event, TextRequest

TASKS = ("text", "caption", "image")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def task_of(req) -> str:
    if isinstance(req, TextRequest):
        return "caption" if req.has_images else "text"  # caption: a text answer about pictures
    return "image"


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends: memory growth shows up here
        p = "xfusion_"
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch", ["task"], registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting to be admitted", ["task"], registry=r)
        self.cache_usage = Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use", ["tower"],
                                 registry=r)
        # What memory the server holds by design, beside process_resident_memory_bytes
        self.cache_bytes = Gauge(p + "kv_cache_capacity_bytes", "Bytes of the KV-cache pool", ["tower"], registry=r)
        self.weight_bytes = Gauge(p + "model_weight_bytes", "Bytes of the model's parameters (VAE included)",
                                  registry=r)
        self.compute_threads = Gauge(p + "compute_threads", "torch's intra-op threads (torch.get_num_threads)",
                                     registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prefilled prompt tokens", ["task"], registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens", ["task"], registry=r)
        self.images = Counter(p + "images", "Images generated", registry=r)
        self.denoising_steps = Counter(p + "denoising_steps", "Denoising steps run (per request)", registry=r)
        self.request_success = Counter(p + "request_success", "Finished requests", ["task", "finished_reason"],
                                       registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Text requests preempted for recompute", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", ["task"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between two tokens of a request", ["task"],
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to end", ["task"], buckets=_LATENCY,
                             registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Arrival to admission", ["task"],
                                    buckets=_LATENCY, registry=r)
        self.image_seconds = Histogram(p + "image_generation_seconds", "Arrival to images, per request",
                                       buckets=_LATENCY, registry=r)
        # The labelled series a step touches, looked up once: with the demo's decode step compiled, observing
        # each step cost 11% of its tok/s at one request with labels() per token, 5% so.
        self._generated, self._ttft, self._itl, self._e2e, self._queue, self._prompt, self._running, self._waiting = (
            {t: m.labels(t) for t in TASKS} for m in (self.generation_tokens, self.ttft, self.itl, self.e2e,
                                                      self.queue_time, self.prompt_tokens, self.running, self.waiting))
        self._usage: dict[str, Gauge] = {}
        self._last_token: dict[str, float] = {}
        self._seen_preemptions = 0

    def observe(self, engine: Engine, events: list[Event], requests: dict[str, object]) -> None:
        """`requests`: every request named by an event, as it was before the step (done ones are gone)."""
        now = time.monotonic()
        for ev in events:
            req = requests.get(ev.request_id)
            if req is None:
                continue
            task = task_of(req)
            if ev.token_ids:  # a token event, or a done event that ended on a new token
                self._generated[task].inc()
                last = self._last_token.get(ev.request_id)
                if last is None:
                    self._ttft[task].observe(now - req.arrival)
                    self._queue[task].observe((req.admitted_at or now) - req.arrival)
                else:
                    self._itl[task].observe(now - last)
                self._last_token[ev.request_id] = now
            if ev.kind == "step":
                self.denoising_steps.inc()
                if ev.step == 1:
                    self._queue[task].observe((req.admitted_at or now) - req.arrival)
            elif ev.kind == "done":
                self._ended(req, task, ev.finish_reason or "unknown", now)
                if ev.images:
                    self.images.inc(len(ev.images))
                    self.image_seconds.observe(now - req.arrival)

    def refresh(self, engine: Engine) -> None:
        """The gauges (requests running and waiting, KV-cache use) and the preemptions, read from the engine's
        state when Prometheus scrapes (render_metrics), not after every step: a step's events are all that
        observe() needs, and the engine's loop is the server's narrowest path (py-spy put observe() at 3% of the
        engine process's samples at one demo request, most of it these gauges)."""
        s = engine.scheduler
        running, waiting = dict.fromkeys(TASKS, 0), dict.fromkeys(TASKS, 0)
        # Run between two steps (AsyncEngine.call and EngineProcess.call): the queues hold still meanwhile.
        for r in s.text + s.images:
            running[task_of(r)] += 1
        for r in s.waiting:
            waiting[task_of(r)] += 1
        for task in TASKS:
            self._running[task].set(running[task])
            self._waiting[task].set(waiting[task])
        if not self._usage:  # once: the pools, their sizes and the weights do not change
            for tower, pool in engine.runner.pools.items():
                self._usage[tower] = self.cache_usage.labels(tower)
                self.cache_bytes.labels(tower).set(pool.nbytes)
            modules = [engine.ckpt.model] + ([engine.ckpt.vae] if engine.ckpt.vae is not None else [])
            self.weight_bytes.set(sum(p.numel() * p.element_size() for m in modules for p in m.parameters()))
            self.compute_threads.set(torch.get_num_threads())
        for tower, pool in engine.runner.pools.items():
            self._usage[tower].set(pool.blocks.usage())
        self.preemptions.inc(s.preemptions - self._seen_preemptions)
        self._seen_preemptions = s.preemptions

    def finished(self, req, reason: str) -> None:
        """A request ended with no event: "cancelled" (its client left) counts, as vLLM does, as finished
        "abort"; "stop" (a stop string the API process found) as a done event's stop would."""
        self._ended(req, task_of(req), "abort" if reason == "cancelled" else reason, time.monotonic())

    def _ended(self, req, task: str, reason: str, now: float) -> None:
        self._last_token.pop(req.id, None)
        self.request_success.labels(task, reason).inc()
        self._e2e[task].observe(now - req.arrival)
        if isinstance(req, TextRequest) and reason != "abort":
            self._prompt[task].inc(req.prompt_len)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_metrics(engine: Engine, metrics: Metrics | None) -> bytes:
    """What /metrics asks of the engine (AsyncEngine.call / EngineProcess.call, between two steps): its
    observer's text, the gauges read from the engine now."""
    if metrics is None:
        return b""
    metrics.refresh(engine)
    return metrics.render()
