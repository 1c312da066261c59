"""The engine: a queue of requests, and a step loop of three lines (schedule, run, postprocess).

nano-vllm's shape: the scheduler picks the step's work, the runner runs it in batched model calls, and the
postprocessing samples, appends, checks stop tokens and lengths and frees. Its events carry token ids; text and
stop strings are an OutputProcessor's (detokenizer.py), run by `step()` here or in the server's API process. It
is also the offline API (offline.py): `Engine.from_checkpoint(path)` then `chat`, `complete`, `caption` and
`generate_images`, with no server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..model.attention import default_backend
from ..model.checkpoint import Checkpoint, load_checkpoint
from ..model.latents import decode_latents
from .config import EngineConfig
from .detokenizer import OutputProcessor
from .flow_matching import guided
from .inputs import RequestInputs
from .offline import OfflineAPI
from .request import Event, ImageRequest, TextRequest
from .runner import ModelRunner, head_shape
from .scheduler import Plan, Scheduler
from .text_sampling import sample_next, token_logprobs

log = logging.getLogger(__name__)


def is_fatal(err: BaseException) -> bool:
    """A device error leaves the device unusable for every later step: no request can be served any more."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(err, accelerator_error) or "CUDA error" in str(err)


def by_size(reqs: list[ImageRequest]) -> list[list[ImageRequest]]:
    groups: dict[tuple, list[ImageRequest]] = {}
    for r in reqs:
        groups.setdefault(tuple(r.latents.shape[1:]), []).append(r)
    return list(groups.values())


class Engine(RequestInputs, OfflineAPI):
    """Requests in (`add_text`, `add_caption`, `add_image`: inputs.py), `step()` until done, `Event`s out.
    Not thread-safe: one thread steps it (the server's AsyncEngine, or the offline API's `run`)."""

    def __init__(self, ckpt: Checkpoint, config: EngineConfig | None = None):
        c = config or EngineConfig()
        compile_asked = c.compile_decode is not None
        # What the config leaves to the model's size: a large model pays a start-up compile back quickly.
        size = sum(p.numel() for p in ckpt.model.text.parameters())
        compile_decode = size >= c.compile_decode_from if c.compile_decode is None else c.compile_decode
        c = replace(c, compile_decode=compile_decode,
                    attention_backend=c.attention_backend or default_backend(
                        torch.device(c.device), getattr(torch, c.dtype), head_shape(ckpt.model.text_config)[1]))
        self.runner = ModelRunner(ckpt, c)
        if c.compile_decode:
            try:
                self.runner.compile_decode(ckpt.model.text_config.max_position_embeddings)
            except Exception as e:
                if compile_asked:
                    raise  # asked for: a failure is the caller's to see
                # chosen by size (no C++ compiler, an inductor bug): the model still serves, eagerly
                log.warning("compiling the decode step failed (%s: %s); decoding eagerly", type(e).__name__, e)
                self.runner.drop_compiled_decode()
                c = replace(c, compile_decode=False)
        self.ckpt, self.config = ckpt, c
        if c.compile_denoise:
            self.runner.compile_denoise()
        self.scheduler = Scheduler(self.runner.pools, self.runner.prompt_towers, c.max_running, c.max_image_rows,
                                   ckpt.model.text_config.max_position_embeddings)
        self.tokenizer = ckpt.tokenizer
        self.outputs = OutputProcessor(self.tokenizer)  # step()'s: text for callers in this process
        self.requests: dict[str, TextRequest | ImageRequest] = {}
        # Test-only fault injection: called as fault_hook(phase, requests) before each batch ("prefill",
        # "decode", "prompts", "denoise", "vae") and with ("schedule", []) before scheduling.
        self.fault_hook: Callable[[str, list], None] | None = None

    def capture_graphs(self) -> None:
        """CUDA graphs belong to the thread that records them: one that steps this engine from a thread of its
        own (the server) calls this there first. Nothing to do off CUDA or with no compiled decode step."""
        if self.runner.device.type == "cuda":
            self.runner.capture_graphs()

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        return cls(load_checkpoint(path, dtype=config.dtype, device=config.device), config)

    # ---- requests ----------------------------------------------------------------------------------------
    def _add(self, req) -> str:
        self.requests[req.id] = req
        self.scheduler.add(req)
        return req.id

    def cancel(self, request_id: str) -> None:
        """Frees everything the request holds, at once; it ends with finish_reason "cancelled", with no event."""
        self.finish(request_id, "cancelled")

    def finish(self, request_id: str, reason: str) -> None:
        """Ends a request at once, with no event, as `reason`: "cancelled", or "stop" when an OutputProcessor
        found a stop string in its text. Nothing if it has already ended."""
        req = self.requests.pop(request_id, None)
        self.outputs.drop(request_id)
        if req is not None:
            self.scheduler.finish(req, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ----------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One step -> its events with text (`step_tokens`, then this engine's OutputProcessor); a request whose
        text reaches a stop string ends here, its done event cut before it."""
        requests = self.requests.copy()  # those that end in the step leave it
        events = self.step_tokens()
        for ev in events:
            req = requests.get(ev.request_id)
            if isinstance(req, TextRequest) and req.id not in self.outputs.states:  # its first event
                self.outputs.add(req.id, req.params.stop, req.prompt_len)
        texts, stopped = self.outputs.process([(ev.request_id, ev) for ev in events])
        for rid in stopped:
            self.finish(rid, "stop")
        return [ev for _, ev in texts]

    def step_tokens(self) -> list[Event]:
        """One step -> its events with token ids and no text (the server's engine process sends these). A batch
        that raises fails its own requests only; an exception that escapes (the scheduler's state, a device
        error) means the engine cannot go on."""
        if self.fault_hook:
            self.fault_hook("schedule", [])
        plan = self.scheduler.schedule()
        results = self._run(plan)
        return self._postprocess(plan, results)

    def _batch(self, results: dict, phase: str, reqs: list, fn: Callable[[], object]):
        """fn() -> its result, or None when it raised: then reqs end with a server error."""
        try:
            if self.fault_hook:
                self.fault_hook(phase, reqs)
            return fn()
        except Exception as e:
            if is_fatal(e):
                raise
            log.exception("%s batch of %d requests failed", phase, len(reqs))
            results["failed"].append((list(reqs), f"{type(e).__name__}: {e}"))
            return None

    def _run(self, plan: Plan) -> dict:
        out: dict = {"failed": []}
        if plan.prefill:
            out["prefill"] = self._batch(out, "prefill", plan.prefill, lambda: self._sample(
                plan.prefill, self.runner.prefill([r.segments() for r in plan.prefill], [r.blocks for r in plan.prefill])))
        if plan.decode:
            out["decode"] = self._batch(out, "decode", plan.decode, lambda: self._sample(plan.decode, self.runner.decode(
                [r.output[-1] for r in plan.decode], [r.length for r in plan.decode], [r.blocks for r in plan.decode])))
        if plan.prompts:  # a prompt whose K/V never landed fails every request that shares it
            fresh = {r.keys[role] for r, role in plan.prompts}
            users = [r for r in plan.denoise if any(r.keys[role] in fresh for role in r.tables)]
            if self._batch(out, "prompts", users, lambda: self.runner.prefill_prompts(
                    [r.prompt_of(role) for r, role in plan.prompts], [r.tables[role] for r, role in plan.prompts])):
                self.scheduler.pinned.update(plan.pin)  # pinned only once its K/V are really there
        failed = {id(r) for reqs, _ in out["failed"] for r in reqs}
        plan.denoise = [r for r in plan.denoise if id(r) not in failed]
        out["denoise"] = {}
        for group in by_size(plan.denoise):
            previews = self._batch(out, "denoise", group, lambda: self._denoise(group))
            if previews is None:
                plan.denoise = [r for r in plan.denoise if r not in group]
            else:
                out["denoise"].update(previews)
        return out

    def _sample(self, reqs: list[TextRequest], logits: torch.Tensor) -> list[int]:
        tokens = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs])
        asked = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if asked:  # kept on the request until its event is made
            rows = torch.tensor(asked, device=logits.device)
            for i, lp in zip(asked, token_logprobs(logits[rows], [tokens[i] for i in asked],
                                                   [reqs[i].params.logprobs for i in asked])):
                reqs[i].logprobs = lp
        return tokens

    def _denoise(self, group: list[ImageRequest]) -> dict[str, torch.Tensor]:
        """One Euler step for image requests of one size, cond and uncond rows in one batch."""
        previews: dict[str, torch.Tensor] = {}
        latents, sigmas, tables, lens = [], [], [], []
        for r in group:
            sigma = r.sigmas[r.step]
            for role in ("cond", "uncond") if r.guided else ("cond",):
                latents.append(r.latents)
                sigmas += [sigma] * len(r.seeds)
                tables += [r.tables[role]] * len(r.seeds)
                lens += [r.prompt_len(role)] * len(r.seeds)
        v = self.runner.velocity(torch.cat(latents), sigmas, tables, lens, batch=tuple(r.id for r in group))
        start, updated = 0, []
        for r in group:
            n = len(r.seeds)
            v_r = v[start : start + n]
            if r.guided:
                v_r = guided(v_r, v[start + n : start + 2 * n], r.guidance_scale)
            start += 2 * n if r.guided else n
            sigma, sigma_next = r.sigmas[r.step], r.sigmas[r.step + 1]
            if r.preview_every and (r.step + 1) % r.preview_every == 0:
                previews[r.id] = r.latents - sigma * v_r  # x0 = x_sigma - sigma * v
            updated.append(r.latents + (sigma_next - sigma) * v_r)
        for r, x in zip(group, updated):  # only once the whole group has succeeded
            r.latents = x
        return previews

    def _postprocess(self, plan: Plan, results: dict) -> list[Event]:
        events = [Event(r.id, "done", finish_reason="error", error=msg, error_type="invalid_request_error")
                  for r, msg in plan.failed]
        for r, _ in plan.failed:
            self.requests.pop(r.id, None)
        for reqs, msg in results["failed"]:
            events += self._fail(reqs, msg)
        for r in plan.out_of_room:  # alone and still longer than the whole cache: it ends here
            events.append(self._finish_text(r, "length"))
        for key in ("prefill", "decode"):
            for req, token in zip(getattr(plan, key), results.get(key) or []):
                events += self._append(req, token)
        finished = []
        for r in plan.denoise:
            r.step += 1
            events.append(Event(r.id, "step", step=r.step, steps=r.steps, preview=results["denoise"].get(r.id)))
            if r.step == r.steps:
                finished.append(r)
        for group in by_size(finished):  # one batched VAE decode per size for the images done this step
            images = self._batch(results, "vae", group, lambda: decode_latents(
                self.ckpt.vae, torch.cat([r.latents for r in group])))
            if images is None:
                events += self._fail(group, results["failed"][-1][1])
                continue
            for r in group:
                events.append(Event(r.id, "done", images=images[: len(r.seeds)], seeds=r.seeds, finish_reason="stop",
                                    prompt_tokens=r.prompt_len("cond") - 1))
                images = images[len(r.seeds):]
                self._end(r, "stop")
        return events

    def _fail(self, reqs: list, message: str) -> list[Event]:
        for r in reqs:
            self._end(r, "error")
        return [Event(r.id, "done", finish_reason="error", error=f"internal error: {message}",
                      error_type="server_error") for r in reqs]

    def _append(self, req: TextRequest, token: int) -> list[Event]:
        """A sampled token -> its event: the request's end on a stop token (not part of the answer) or on its
        length, else a token event. Text and stop strings are the OutputProcessor's."""
        if token in req.stop_ids:
            return [self._finish_text(req, "stop")]
        req.output.append(token)
        if len(req.output) >= req.params.max_tokens or req.length >= self.scheduler.max_model_len:
            return [self._finish_text(req, "length", [token])]
        return [Event(req.id, "token", token_ids=[token], logprobs=self._logprobs(req))]

    @staticmethod
    def _logprobs(req: TextRequest) -> list | None:
        """The last sampled token's log-probabilities, once (None when the request asked for none)."""
        lp, req.logprobs = req.logprobs, None
        return None if lp is None else [lp]

    def _finish_text(self, req: TextRequest, reason: str, new_tokens: list[int] | None = None) -> Event:
        """A text request's done event: the token generated in this step, if it ended on one, and the output's
        length in `step` (the OutputProcessor adds the text)."""
        self._end(req, reason)
        logprobs = self._logprobs(req) if new_tokens else None  # a stop token is not part of the answer
        return Event(req.id, "done", token_ids=new_tokens or [], finish_reason=reason, step=len(req.output),
                     prompt_tokens=req.prompt_len, logprobs=logprobs)

    def _end(self, req, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self.requests.pop(req.id, None)

    # ---- offline API -------------------------------------------------------------------------------------
    def run(self, request_ids: list[str]) -> dict[str, Event]:
        """Steps until every given request is done -> its done event (cancelled ones are left out)."""
        pending, done = set(request_ids), {}
        while pending:
            for ev in self.step():
                if ev.kind == "done" and ev.request_id in pending:
                    done[ev.request_id] = ev
                    pending.discard(ev.request_id)
            pending &= set(self.requests)  # a request cancelled meanwhile will never be done
        return done
