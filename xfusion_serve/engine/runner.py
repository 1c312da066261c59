"""The model runner: turns scheduled work into flat tensors, runs one batched model call, returns logits
or velocities. It owns the KV pools; what goes into them is decided by the scheduler."""

from __future__ import annotations

import logging

import torch
from xfusion_kernels.cpu import cpu_linear

from ..model.attention import make_backend
from ..model.checkpoint import Checkpoint
from ..model.sequence import Segment
from ..model.xfusion import vision_block_config
from .config import EngineConfig
from .kv_cache import KVPool, available_memory, kv_cache_budget
from .paged_attention import DecodeAttention, PrefillAttention, PrefixAttention

log = logging.getLogger(__name__)

# Batch sizes a decode step is recorded for as CUDA graphs; a larger batch runs eagerly.
CUDA_GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def head_shape(cfg) -> tuple[int, int]:
    return cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class ModelRunner:
    def __init__(self, ckpt: Checkpoint, config: EngineConfig):
        # One matrix multiply for q/k/v, one for gate/up; in float32 on the CPU, for torch's (MKL's) multiply,
        # every block weight stored [in, out] (the project's kernel reads them [out, in]; in bfloat16 oneDNN was
        # slower so, 0.80x-0.88x at 1 to 64 rows of the 135M shape on 2 threads, a session script).
        p = next(ckpt.model.parameters())
        op = cpu_linear() if config.cpu_kernels else None  # None where it cannot be built: torch's multiply
        self.model = ckpt.model.fuse_projections(
            transposed=op is None and p.device.type == "cpu" and p.dtype == torch.float32)
        if op is not None:
            self.model.use_matmul(op)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        text_cfg = self.model.text_config
        self.backend = make_backend(config.attention_backend, self.device, self.dtype, head_shape(text_cfg)[1])
        vision_cfg = vision_block_config(text_cfg, self.model.config)
        layers, vision_share = text_cfg.num_hidden_layers, config.vision_cache_fraction
        per_token = {tower: KVPool.bytes_per_block(layers, *head_shape(cfg), 1, self.dtype)
                     for tower, cfg in (("text", text_cfg), ("vision", vision_cfg))}
        # No more than every running request at full context can fill, split as the towers' shares are.
        useful = config.max_running * text_cfg.max_position_embeddings * per_token["text"] / (1 - vision_share)
        budget = kv_cache_budget(config.kv_cache_memory, config.kv_cache_fraction, int(useful),
                                 available_memory(self.device) if config.kv_cache_memory is None else 0)
        self.pools: dict[str, KVPool] = {}
        for tower, share in (("text", 1 - vision_share), ("vision", vision_share)):
            blocks = int(budget * share) // (per_token[tower] * config.block_size)
            heads, dim = head_shape(text_cfg if tower == "text" else vision_cfg)
            self.pools[tower] = KVPool(layers, heads, dim, blocks, config.block_size, self.dtype, self.device)
        log.info("KV cache: %s", ", ".join(f"{tower} {pool.capacity:,} tokens ({pool.nbytes / 2**20:,.0f} MiB)"
                                            for tower, pool in self.pools.items()))
        # An image prompt's K/V: the vision tower's, and with X-Fuse the text tower's too (its queries then
        # read image tokens as well).
        self.prompt_towers = ("vision", "text") if self.model.config.xfuse else ("vision",)
        self._prefix: tuple | None = None  # (request ids, prompts' K/V, mask) of the last denoising step
        self.captured = None  # the compiled decode step, once compile_decode() is called
        self.captured_batches: tuple[int, ...] = ()
        self.captured_denoise = None  # the compiled denoising step, once compile_denoise() is called
        self.table_width = 0

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _tables(self, tables: list[list[int]], width: int = 0) -> torch.Tensor:
        """Padded with block 0 to `width` (default: the longest): past a sequence's length nothing is read
        unmasked."""
        width = width or max(map(len, tables))
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    @torch.no_grad()
    def prefill(self, sequences: list[list[Segment]], block_tables: list[list[int]]) -> torch.Tensor:
        """Whole sequences (text and images), packed; the text tower's K/V land in the cache.
        -> logits [B, V] at each sequence's last token."""
        embeds, positions, image_ids, slots, cu = [], [], [], [], [0]
        images_before = 0
        for segments, table in zip(sequences, block_tables):
            seq = self.model.embed_sequence(segments)
            n = len(seq.positions)
            embeds.append(seq.embeds)
            positions.append(seq.positions)
            # Image ids only need to differ within one sequence; offsetting keeps them unique anyway.
            image_ids.append(torch.where(seq.image_ids >= 0, seq.image_ids + images_before, seq.image_ids))
            images_before += len(seq.image_slices)
            slots += self.pools["text"].slots(table, 0, n)
            cu.append(cu[-1] + n)
        ids = torch.cat(image_ids)
        attn = PrefillAttention(self.backend, self.pools, {"text": self._tensor(slots)}, cu, ids)
        h = self.model(torch.cat(embeds), torch.cat(positions), ids, attn)
        return self.model.text.logits(h[self._tensor(cu[1:]) - 1])

    @torch.no_grad()
    def decode(self, last_tokens: list[int], lengths: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One new token per sequence at position length - 1 -> logits [B, V]. Its K/V are written to the
        cache after the step (or by the step, for a backend that reads them from the cache)."""
        pool = self.pools["text"]
        slots = [pool.slots(t, n - 1, n)[0] for t, n in zip(block_tables, lengths)]
        B = len(lengths)
        if self.captured is not None and self.captured_batches and B <= self.captured_batches[-1]:
            # CUDA graphs replay fixed shapes: the batch padded to the next recorded size (padded rows write to
            # the scratch slot, their logits are dropped), every table to the longest a sequence can have.
            pad = next(b for b in self.captured_batches if b >= B) - B
            logits = self._step(self.captured, last_tokens + [0] * pad, lengths + [1] * pad,
                                slots + [pool.scratch_slot] * pad, block_tables + [[]] * pad, self.table_width)
            return logits[:B]
        step = self.captured if self.captured is not None and not self.captured_batches else self._decode_step
        return self._step(step, last_tokens, lengths, slots, block_tables)

    def _step(self, step, last_tokens, lengths, slots, block_tables, width: int = 0,
              compiling: bool = False) -> torch.Tensor:
        """Runs a decode step (eager or compiled) and writes the new K/V it returns. `compiling`: the CPU graph's
        first call (capture_graphs), whose rows and table width are marked dynamic sizes; later calls need no
        mark (the compiled graph's guards take any size; 2 us a tensor, six a step)."""
        # One host-to-device copy for everything per token (a decode step is mostly such overhead).
        tokens, seq_lens, slots, positions = self._tensor([last_tokens, lengths, slots, [n - 1 for n in lengths]])
        tables = self._tables(block_tables, width or max(2, max(map(len, block_tables))))
        if compiling and step is self.captured and not self.captured_batches:  # sizes of one CPU graph
            for x in (tokens, seq_lens, slots, positions, tables) if len(lengths) > 1 else ():
                torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(tables, 1)
        logits, new_kv = step(tokens, seq_lens, slots, positions, tables)
        if new_kv is not None:
            self.pools["text"].write_all_layers(slots, new_kv)
        return logits

    def _decode_step(self, tokens, seq_lens, slots, positions, tables) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> logits [B, V] and the new K/V of every layer still to be written (None if written already)."""
        attn = DecodeAttention(self.backend, self.pools["text"], slots, tables, seq_lens)
        h = self.model.text_forward(self.model.text.model.embed_tokens(tokens), positions, attn)
        return self.model.text.logits(h), attn.pending()

    def compile_decode(self, max_model_len: int) -> None:
        """torch.compile the decode step. On CUDA in "reduce-overhead" mode, i.e. replayed as CUDA graphs: one
        per batch size of CUDA_GRAPH_BATCHES (a batch is padded to the next; padded rows write to the scratch
        slot), every table padded to the longest a sequence can have. On the CPU two graphs, one for a single
        sequence and one for any batch, with the table width a dynamic size (tables padded to at least two
        blocks, so that it never specialises as 1). Compiled here, not on a request's time."""
        pool = self.pools["text"]
        if self.device.type == "cuda":
            torch._dynamo.mark_static_address(pool.kv)  # written in place by every replay: a fixed address
            self.table_width = pool.blocks_needed(max_model_len)
            self.captured = torch.compile(self._decode_step, mode="reduce-overhead", dynamic=False)
            self.captured_batches = CUDA_GRAPH_BATCHES
        else:
            # Guards on the model's parameters cost about a millisecond a step; they never change after load.
            # dynamic=None, not False: a recompile for another guard (torch's thread count) keeps the sizes
            # dynamic, where False would compile one graph per table width up to the recompile limit, then eager.
            # cpp_wrapper: the graph's kernels called from C++, not from a Python wrapper: the demo's step 1.13x
            # faster at 1 and at 16 rows on one thread, 1.25x and 1.15x on two (README, twelfth session).
            self.captured = torch.compile(self._decode_step, dynamic=None, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True})
        self.capture_graphs()

    def drop_compiled_decode(self) -> None:
        """Back to the eager decode step (a compile that failed)."""
        self.captured, self.captured_batches, self.table_width = None, (), 0

    @torch.no_grad()
    def capture_graphs(self) -> None:
        """Runs the compiled decode step at every shape it is compiled for, on rows of padding (they write to the
        scratch slot). CUDA graphs belong to the thread that records them, at a shape's second run: whoever
        steps the engine from another thread (the server) calls this there before the first request."""
        scratch = self.pools["text"].scratch_slot
        for b in self.captured_batches or (1, 2):
            for _ in range(2 if self.device.type == "cuda" else 1):
                self._step(self.captured, [0] * b, [1] * b, [scratch] * b, [[]] * b, self.table_width, compiling=True)

    @torch.no_grad()
    def prefill_prompts(self, prompts: list[list[Segment]], block_tables: list[dict[str, list[int]]]) -> int:
        """Image prompts (text and clean images, then the begin-of-image embedding): only their K/V are kept,
        in the prompt towers' pools, for every denoising step. -> how many were prefilled."""
        seqs = [self.model.embed_sequence(p) for p in prompts]
        boi = self.model.vision.boi[None]
        embeds = [torch.cat([s.embeds, boi.to(s.embeds.dtype)]) for s in seqs]
        lengths = [len(e) for e in embeds]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        slots = {tower: self._tensor([s for t, n in zip(block_tables, lengths) for s in self.pools[tower].slots(
            t[tower], 0, n)]) for tower in self.prompt_towers}
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        ids, images_before = [], 0
        for s in seqs:  # image ids differ between sequences (as in prefill), -1 for text and the boi
            ids.append(torch.where(s.image_ids >= 0, s.image_ids + images_before, s.image_ids))
            ids.append(torch.full((1,), -1, dtype=s.image_ids.dtype, device=s.image_ids.device))
            images_before += len(s.image_slices)
        ids = torch.cat(ids)
        self.model(torch.cat(embeds), positions, ids, PrefillAttention(self.backend, self.pools, slots, cu, ids))
        return len(prompts)

    @torch.no_grad()
    def velocity(self, latents: torch.Tensor, sigmas: list[float], block_tables: list[dict[str, list[int]]],
                 prefix_lengths: list[int], batch: tuple = ()) -> torch.Tensor:
        """Image tokens only, over their cached prompts: latents [R, C, h, w] at noise sigmas -> velocity.
        `batch` names the requests behind the rows (their tables, prompts and image size are fixed for life):
        while it stays the same, so do the prompts' K/V, gathered once. Blocks are reused by later requests,
        so equal tables alone would not say that."""
        lens, sigmas = self._tensor(prefix_lengths), self._tensor(sigmas, torch.float32)
        if not batch or self._prefix is None or self._prefix[0] != batch:  # a new batch: gather its prompts
            tables = {tower: self._tables([t[tower] for t in block_tables]) for tower in self.prompt_towers}
            num_tokens = latents.shape[-2] * latents.shape[-1] // self.model.config.patch_size ** 2
            self._prefix = batch, *PrefixAttention.gather(self.backend, self.pools, tables, lens, num_tokens)
        latents, (prompts, mask) = latents.to(self.device), self._prefix[1:]
        if self.captured_denoise is None:
            return self._denoise_step(latents, sigmas, lens, prompts, mask)
        # Rows and prompt length are dynamic sizes of the one compiled graph (else each new value recompiles).
        for x, dims in [(latents, (0,)), (sigmas, (0,)), (lens, (0,)), (mask, (0, 3))] + [
                (x, (0, 2)) for layers in prompts.values() for kv in layers for x in kv]:
            torch._dynamo.mark_dynamic(x, dims)
        return self.captured_denoise(latents, sigmas, lens, prompts, mask)

    def _denoise_step(self, latents, sigmas, prefix_lens, prompts, mask) -> torch.Tensor:
        tokens = self.model.embed_image(latents.to(self.dtype), sigmas)
        positions = prefix_lens[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        h = self.model.image_forward(tokens, positions, PrefixAttention(self.backend, prompts, mask))
        return self.model.velocity(h, *latents.shape[-2:]).float()

    def compile_denoise(self) -> None:
        """torch.compile the denoising step with the rows and the prompts' length as dynamic sizes: one graph
        serves every batch. Compiled here for each image size, for one row and for several (torch specialises
        a size of 1), so that no request waits for it. No CUDA graphs: they would be recorded anew for every
        batch shape, and a denoising step of a real model is long enough for its launches not to matter."""
        self.captured_denoise = torch.compile(self._denoise_step)
        two_blocks = 2 * self.pools["vision"].block_size
        for rows in (2, 1):
            for height, width in self.model.config.image_sizes:
                latents = torch.zeros(rows, *self.model.vae_info.latent_shape(height, width))
                self.velocity(latents, [1.0] * rows, [{tower: [0, 0] for tower in self.prompt_towers}] * rows,
                              [two_blocks] * rows)
        self._prefix = None
