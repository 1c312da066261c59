"""The scheduler: the policy that picks each step's work, and the KV blocks it gives each request.

Text requests (chat, completion, caption) share one continuously batched decode loop: they join after their
prefill and leave when they stop. Image requests denoise one step per engine step, all of them batched
together; a request joins at its first step and leaves after its last. Blocks are taken at admission and at
block boundaries while decoding; when none is left the newest text request is preempted (its blocks freed,
recomputed later). Nothing crashes the others: a request that can never fit fails alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVPool
from .request import ImageRequest, TextRequest


@dataclass
class Plan:
    prefill: list[TextRequest] = field(default_factory=list)
    decode: list[TextRequest] = field(default_factory=list)
    prompts: list[tuple[ImageRequest, str]] = field(default_factory=list)  # (request, "cond"/"uncond") to prefill
    denoise: list[ImageRequest] = field(default_factory=list)
    failed: list[tuple[object, str]] = field(default_factory=list)
    out_of_room: list[TextRequest] = field(default_factory=list)  # alone, and the whole cache is too small
    pin: list[tuple[int, ...]] = field(default_factory=list)  # prompt-cache keys to pin once prefilled


class Scheduler:
    def __init__(self, pools: dict[str, KVPool], prompt_towers: tuple[str, ...], max_running: int,
                 max_image_rows: int, max_model_len: int):
        self.pools, self.prompt_towers = pools, prompt_towers
        self.max_running, self.max_image_rows, self.max_model_len = max_running, max_image_rows, max_model_len
        self.waiting: deque = deque()
        self.text: list[TextRequest] = []
        self.images: list[ImageRequest] = []
        # Image prompts' cached K/V by token ids; each entry holds one reference of its own. The empty
        # (unconditional) prompt stays cached for the engine's lifetime: every guided request shares it.
        self.prompt_cache: dict[tuple[int, ...], dict[str, list[int]]] = {}
        self.pinned: set[tuple[int, ...]] = set()
        self.preemptions = 0

    # ---- admission ---------------------------------------------------------------------------------------
    def add(self, req) -> None:
        self.waiting.append(req)

    def capacity(self, tower: str) -> int:
        """Blocks a request can ever get: the pool less what stays pinned."""
        pinned = sum(len(self.prompt_cache[k].get(tower, [])) for k in self.pinned)
        return self.pools[tower].blocks.num_blocks - pinned

    def _admit_text(self, req: TextRequest, plan: Plan) -> bool:
        pool = self.pools["text"]
        need = pool.blocks_needed(req.length)
        if req.length >= self.max_model_len or need > self.capacity("text"):
            plan.failed.append((req, f"the prompt ({req.length} tokens) does not fit the model or the KV cache"))
            return True
        if len(self.text) >= self.max_running or need > pool.blocks.num_free:
            return False
        req.blocks = pool.blocks.allocate(need)
        req.admitted_at = req.admitted_at or time.monotonic()
        self.text.append(req)
        plan.prefill.append(req)
        return True

    def _admit_image(self, req: ImageRequest, plan: Plan) -> bool:
        roles = ["cond", "uncond"] if req.guided else ["cond"]
        needs = {t: 0 for t in self.prompt_towers}
        for key, role in {req.keys[role]: role for role in roles}.items():  # cond == uncond: one prompt
            if key not in self.prompt_cache:
                for t in self.prompt_towers:
                    needs[t] += self.pools[t].blocks_needed(req.prompt_len(role))
        length = max(req.prompt_len(role) for role in roles) + req.image_tokens + 1  # <boi> prompt, image, <eoi>
        if length > self.max_model_len:
            plan.failed.append((req, f"the prompt and the image ({length} tokens) are longer than the model's "
                                     f"context ({self.max_model_len})"))
            return True
        if any(n > self.capacity(t) for t, n in needs.items()):
            plan.failed.append((req, "the prompt does not fit the KV cache"))
            return True
        rows = sum(len(r.seeds) * (2 if r.guided else 1) for r in self.images)
        if (self.images and rows + len(req.seeds) * (2 if req.guided else 1) > self.max_image_rows) or any(
                n > self.pools[t].blocks.num_free for t, n in needs.items()):
            return False
        for role in roles:
            key = req.keys[role]
            if key not in self.prompt_cache:
                self.prompt_cache[key] = {t: self.pools[t].blocks.allocate(self.pools[t].blocks_needed(
                    req.prompt_len(role))) for t in self.prompt_towers}
                plan.prompts.append((req, role))
                if role == "uncond" and req.shared_negative:  # the empty prompt: every request shares it
                    plan.pin.append(key)
            req.tables[role] = {t: self.pools[t].blocks.share(b) for t, b in self.prompt_cache[key].items()}
        req.admitted_at = time.monotonic()
        self.images.append(req)
        return True

    # ---- each step -----------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        plan = Plan()
        while self.waiting:
            req = self.waiting[0]
            admitted = self._admit_text(req, plan) if isinstance(req, TextRequest) else self._admit_image(req, plan)
            if not admitted:
                break
            self.waiting.popleft()
        for req, _ in plan.failed:
            req.finish_reason = "error"
        fresh = set(plan.prefill)
        for req in list(self.text):
            if req in fresh or req not in self.text:
                continue
            if self._ensure_block(req, fresh):
                plan.decode.append(req)
            elif req.blocks == [] and not self.text and req in self.waiting:
                # It was alone and preempted itself: no cache can ever hold it. It ends, not errs.
                self.waiting.remove(req)
                plan.out_of_room.append(req)
        plan.denoise = list(self.images)
        return plan

    def _ensure_block(self, req: TextRequest, fresh: set) -> bool:
        """Room for the K/V of req's newest token; preempts the newest decoding requests if need be
        (never one prefilled in this very step: its blocks are in use by this step's plan)."""
        pool = self.pools["text"]
        while pool.blocks_needed(req.length) > len(req.blocks):
            if pool.blocks.num_free:
                req.blocks += pool.blocks.allocate(1)
                continue
            victim = next(r for r in reversed(self.text) if r not in fresh)  # req itself at the latest
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: TextRequest) -> None:
        self.pools["text"].blocks.release(req.blocks)
        req.blocks = []
        self.text.remove(req)
        self.waiting.appendleft(req)  # recomputed first, from its prompt and what it has said so far
        self.preemptions += 1

    # ---- leaving -----------------------------------------------------------------------------------------
    def finish(self, req, reason: str) -> None:
        """Ends a request wherever it is (waiting, running) and frees everything it holds."""
        req.finish_reason = req.finish_reason or reason
        if req in self.waiting:
            self.waiting.remove(req)
        if isinstance(req, TextRequest):
            if req in self.text:
                self.text.remove(req)
            if req.blocks:
                self.pools["text"].blocks.release(req.blocks)
                req.blocks = []
            return
        if req in self.images:
            self.images.remove(req)
        for role, tables in list(req.tables.items()):
            key = req.keys[role]
            for t, blocks in tables.items():
                self.pools[t].blocks.release(blocks)
            entry = self.prompt_cache.get(key)
            first = next(iter(entry.items())) if entry else None
            if entry and key not in self.pinned and self.pools[first[0]].blocks.refs[first[1][0]] == 1:
                for t, blocks in self.prompt_cache.pop(key).items():
                    self.pools[t].blocks.release(blocks)
        req.tables = {}

    def has_work(self) -> bool:
        return bool(self.waiting or self.text or self.images)

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests, as admission and the metrics count them."""
        return len(self.text) + len(self.images), len(self.waiting)
