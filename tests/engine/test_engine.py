"""The engine against the uncached paths: cached == uncached, batched == one at a time, every block freed."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from xfusion_serve import Engine, EngineConfig, ImageSegment, SamplingParams, load_checkpoint
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.engine.flow_matching import initial_noise
from xfusion_serve.engine.kv_cache import KVPool
from xfusion_serve.engine.uncached import caption_greedy_uncached, sample_images_uncached
from xfusion_serve.model import prompts
from xfusion_serve.model.checkpoint import text_tower_parameters
from xfusion_serve.model.latents import encode_images
from xfusion_serve.model.sequence import padded_forward

PROMPTS = [[2, 7, 9, 11, 5], [2, 30, 31], [2] + list(range(40, 60)), [2, 8]]


def make_engine(path, **kw) -> Engine:
    return Engine(load_checkpoint(path), EngineConfig(**({"block_size": 4} | kw)))


def run_text(engine: Engine, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Adds every prompt at once, runs them to the end -> the generated ids (stop token excluded)."""
    reqs = [engine.requests[engine.add_text(p, params)] for p in prompt_ids]
    engine.run([r.id for r in reqs])
    return [r.output for r in reqs]


def assert_all_free(engine: Engine) -> None:
    """Every block is free but the unconditional (empty) prompt's, the only one ever pinned: a block pinned or
    cached for anything else is a leak."""
    s = engine.scheduler
    empty = tuple(prompts.generation_prompt(engine.tokenizer, ""))
    assert s.pinned <= {empty} and set(s.prompt_cache) == s.pinned, (s.pinned, list(s.prompt_cache))
    for tower, pool in engine.runner.pools.items():
        held = sum(len(s.prompt_cache[k].get(tower, [])) for k in s.pinned)
        assert pool.blocks.num_free + held == pool.blocks.num_blocks, tower
        assert all(pool.blocks.refs[b] == 1 for k in s.pinned for b in s.prompt_cache[k].get(tower, []))
    assert not engine.requests and not s.has_work()


def hf_greedy(path, prompt: list[int], max_new: int) -> list[int]:
    hf = LlamaForCausalLM.from_pretrained(path / "text_tower", dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=1)[0]
    return out[len(prompt):].tolist()


# The CPU default ("cpu", the project's C++ decode) and the reference every other device and dtype uses ("torch").
BACKENDS = pytest.mark.parametrize("backend", ["cpu", "torch"])


def backend_engine(path, backend: str) -> Engine:
    """make_engine with `backend`; skips where the cpu backend's kernel cannot be built (no C++ compiler)."""
    from xfusion_kernels.cpu import cpu_paged_decode

    if backend == "cpu" and cpu_paged_decode() is None:
        pytest.skip("no C++ compiler: the engine uses the torch backend here")
    engine = make_engine(path, attention_backend=backend)
    assert engine.config.attention_backend == backend
    return engine


@BACKENDS
def test_greedy_chat_equals_transformers_batched_and_paged(random_checkpoint_dir, backend):
    engine = backend_engine(random_checkpoint_dir, backend)  # blocks of 4 tokens: every sequence crosses several
    outputs = run_text(engine, PROMPTS, SamplingParams(max_tokens=16))
    for p, out in zip(PROMPTS, outputs):
        expected = hf_greedy(random_checkpoint_dir, p, 16)
        stop = next((i for i, t in enumerate(expected) if t in (3, 4)), len(expected))
        assert out == expected[:stop]
    assert_all_free(engine)


@BACKENDS
def test_caption_tokens_equal_uncached(random_checkpoint_dir, backend):
    engine = backend_engine(random_checkpoint_dir, backend)
    images = [shape_sample(5, i)[1] for i in range(3)]
    for instruction in ("", "describe the image"):
        reqs = [engine.requests[engine.add_caption(im, instruction, SamplingParams(max_tokens=8))] for im in images]
        engine.run([r.id for r in reqs])
        latents = encode_images(engine.ckpt.vae, images, 16, 16)
        expected = caption_greedy_uncached(engine.ckpt.model, engine.tokenizer, latents, instruction, 8,
                                           set(engine.ckpt.eos_token_ids))
        assert [r.output for r in reqs] == expected
    assert_all_free(engine)


@pytest.mark.parametrize("fixture", ["random_checkpoint_dir", "xfuse_checkpoint_dir"])
def test_cached_denoising_velocity_equals_full_sequence(fixture, request):
    engine = make_engine(request.getfixturevalue(fixture))
    model, tok = engine.ckpt.model, engine.tokenizer
    if model.config.xfuse:  # image tokens then take both towers' outputs: make the text tower's count
        with torch.no_grad():
            model.vision.xfuse_alpha.fill_(0.6)
            model.vision.xfuse_beta.fill_(0.7)
    prompt = prompts.generation_prompt(tok, "a small red circle")
    table = {t: engine.runner.pools[t].blocks.allocate(4) for t in engine.runner.prompt_towers}
    engine.runner.prefill_prompts([[prompt]], [table])
    x = initial_noise((4, 8, 8), 3)[None]
    v = engine.runner.velocity(x, [0.7], [table], [len(prompt) + 1])
    seq = model.embed_sequence([prompt, ImageSegment(x[0], 0.7)])
    with torch.no_grad():
        h = padded_forward(model, seq.embeds[None], seq.positions[None], seq.image_ids[None])[0]
        expected = model.velocity(h[seq.image_slices[0]][None], 8, 8)
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-5)


def final_latents(engine: Engine, request_kwargs: list[dict]) -> list[torch.Tensor]:
    """Adds every image request at once, steps the engine until all are done -> each one's final latents."""
    reqs = [engine.requests[engine.add_image(**kw)] for kw in request_kwargs]
    finals = {}
    while len(finals) < len(reqs):
        for ev in engine.step():
            assert ev.finish_reason != "error", ev.error
        for r in reqs:
            if r.step == r.steps and r.id not in finals:
                finals[r.id] = r.latents.clone()
    return [finals[r.id] for r in reqs]


TARGET = {"prompt": "a large blue square", "seed": 11, "steps": 4, "guidance_scale": 2.5}
# Different step counts, n, guidance (1.0: no unconditional rows), negative prompts and image sizes.
OTHERS = [{"prompt": "a red circle at the top left of it all", "seed": 1, "steps": 6, "n": 2},
          {"prompt": "", "seed": 2, "steps": 2, "guidance_scale": 1.0},
          {"prompt": "triangle", "negative_prompt": "blue", "seed": 3, "steps": 3},
          {"prompt": "a wide one", "seed": 4, "steps": 3, "size": (8, 16)}]


def test_image_latents_same_alone_batched_and_uncached(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    alone = final_latents(engine, [TARGET])[0]
    batched = final_latents(engine, OTHERS[:1] + [TARGET] + OTHERS[1:])[1]
    assert (alone - batched).abs().max() < 1e-4
    uncached = sample_images_uncached(engine.ckpt.model, engine.tokenizer, [TARGET["prompt"]], [11], 4, 2.5, 1.0,
                                      16, 16)
    assert (alone - uncached).abs().max() < 1e-4
    assert_all_free(engine)


def test_the_compiled_denoising_step_gives_the_same_latents(random_checkpoint_dir):
    """`compile_denoise` on the CPU: one graph with dynamic rows and prompt length (and one for a single
    row), compiled at start-up for both image sizes; the latents are the eager engine's to float rounding."""
    eager = final_latents(make_engine(random_checkpoint_dir), [TARGET] + OTHERS)
    compiled = make_engine(random_checkpoint_dir, compile_denoise=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # every shape was compiled at start-up
        for got, expected in zip(final_latents(compiled, [TARGET] + OTHERS), eager):
            assert (got - expected).abs().max() < 1e-4
        alone = final_latents(compiled, [OTHERS[1]])[0]  # a single row
    assert (alone - eager[2]).abs().max() < 1e-4
    assert_all_free(compiled)


def test_the_compiled_decode_step_gives_the_same_tokens(random_checkpoint_dir):
    """`compile_decode` on the CPU: one graph for a single sequence and one for any batch, the table width a
    dynamic size, compiled at start-up; batches of 3, 4 and 1 whose tables grow from 2 to 8 blocks give the
    eager engine's tokens, with no compilation on a request's time."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eager = run_text(make_engine(random_checkpoint_dir), PROMPTS, params)
    compiled = make_engine(random_checkpoint_dir, compile_decode=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # every size was compiled at start-up
        assert run_text(compiled, PROMPTS[:3], params) == eager[:3]
        assert run_text(compiled, PROMPTS, params) == eager
        assert run_text(compiled, PROMPTS[2:3], params) == eager[2:3]
    assert_all_free(compiled)


def test_a_compiled_decode_step_recompiled_for_other_threads_keeps_its_sizes_dynamic(random_checkpoint_dir):
    """torch.compile guards on torch's thread count: an engine compiled on some threads and stepped on others
    (benchmarks/bench_peers.py's waves on fewer threads, a caller's set_num_threads) recompiles once, for any
    batch and table width; it does not compile a graph for every width until dynamo's recompile limit and then
    run eagerly (as with `dynamic=False`, which turns off dynamo's automatic dynamic sizes)."""
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eager = run_text(make_engine(random_checkpoint_dir), PROMPTS, params)
    compiled = make_engine(random_checkpoint_dir, compile_decode=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        assert run_text(compiled, PROMPTS, params) == eager  # tables of 2 to 8 blocks
        assert run_text(compiled, PROMPTS[2:3], params) == eager[2:3]
    finally:
        torch.set_num_threads(before)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 2  # one batch graph, one single


def test_a_compile_chosen_by_size_that_fails_leaves_the_engine_eager(random_checkpoint_dir, monkeypatch):
    """A model of compile_decode_from parameters or more (a server's: every model) compiles its decode step by
    default; where inductor cannot build (no C++ compiler), the engine serves eagerly instead of not starting.
    Asked for explicitly, the failure is raised."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eager = run_text(make_engine(random_checkpoint_dir), PROMPTS, params)

    tried = []

    def failing_compile(fn, **kw):
        def compiled(*args):
            tried.append(fn)
            raise RuntimeError("planted: no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    engine = make_engine(random_checkpoint_dir, compile_denoise=False, compile_decode_from=0)
    assert tried and engine.config.compile_decode is False and engine.runner.captured is None
    assert run_text(engine, PROMPTS, params) == eager
    with pytest.raises(RuntimeError, match="planted"):
        make_engine(random_checkpoint_dir, compile_decode=True)


def test_the_decode_step_is_compiled_by_default_from_compile_decode_from_parameters(random_checkpoint_dir):
    size = text_tower_parameters(random_checkpoint_dir)
    assert make_engine(random_checkpoint_dir, compile_decode_from=size).config.compile_decode is True
    assert make_engine(random_checkpoint_dir, compile_decode_from=size + 1).config.compile_decode is False
    assert make_engine(random_checkpoint_dir).config.compile_decode is False  # the library's default: large only
    with pytest.raises(ValueError, match="compile_decode_from"):
        EngineConfig(compile_decode_from=-1)


def test_a_request_on_blocks_another_freed_never_sees_its_prompt(random_checkpoint_dir):
    """Prompt K/V are gathered from the pool once per batch of requests and kept across steps; a later
    request reuses freed blocks for a different prompt of the same length, so they must not outlive it."""
    per_block = KVPool.bytes_per_block(layers=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    engine = make_engine(random_checkpoint_dir, kv_cache_memory=int(3 * per_block / 0.25))
    assert engine.runner.pools["vision"].blocks.num_blocks == 3  # the pinned empty prompt, then one prompt
    reqs = []
    for text, seed in (("a red circle at the top", 1), ("a blue square at the left", 2)):
        reqs.append(engine.requests[engine.add_image(text, seed=seed, steps=3, guidance_scale=2.0)])
        engine.run([reqs[-1].id])
    assert reqs[0].prompt != reqs[1].prompt and len(reqs[0].prompt) == len(reqs[1].prompt)
    expected = sample_images_uncached(engine.ckpt.model, engine.tokenizer, ["a blue square at the left"], [2], 3,
                                      2.0, 1.0, 16, 16)
    assert (reqs[1].latents - expected).abs().max() < 1e-4


def test_a_failed_prompt_prefill_fails_every_request_sharing_it_and_frees_its_blocks(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)

    def broken(phase, reqs):
        if phase == "prompts":
            raise RuntimeError("injected")

    engine.fault_hook = broken
    ids = [engine.add_image("a red circle", seed=s, steps=2) for s in (1, 2)]  # share the prompt's blocks
    done = engine.run(ids)
    assert [done[i].finish_reason for i in ids] == ["error", "error"] and "injected" in done[ids[0]].error
    assert not engine.scheduler.pinned  # the empty prompt's K/V never landed: it is not kept
    assert_all_free(engine)
    engine.fault_hook = None
    assert len(engine.generate_images(["a red circle"], seeds=[1], steps=2)) == 1


def test_seeded_sampling_is_the_same_alone_or_batched(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_text(engine, [PROMPTS[0]], params)[0]
    batched = run_text(engine, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], params)[1]
    other_seed = run_text(engine, [PROMPTS[0]], SamplingParams(**{**params.__dict__, "seed": 99}))[0]
    assert alone == batched and len(alone) == 12
    assert alone != other_seed


def test_incremental_detokenization_streams_exactly_the_full_decode():
    """A window of tokens is decoded per step; characters cut between byte-level tokens must wait, and the
    pieces add up to the whole output's decode."""
    from transformers import AutoTokenizer

    from xfusion_serve import EMBEDDED_CHECKPOINT
    from xfusion_serve.engine.detokenizer import TextState, detokenize

    tok = AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")
    for text in ("a small red circle at the top left.", "café ☕ 日本語 — naïve", "There are circles, squares"):
        ids = tok(text, add_special_tokens=False).input_ids
        req = TextState(stop=[], prompt_tokens=0)
        pieces = []
        for token in ids:
            req.output.append(token)
            before = req.decoded
            pieces.append(detokenize(tok, req)[len(before):])
            assert "\ufffd" not in req.decoded
        assert "".join(pieces) == tok.decode(ids) == text
    cut = [i for i in tok("☕ 日本語", add_special_tokens=False).input_ids if "\ufffd" in tok.decode([i])]
    assert cut  # the byte-level tokenizer does cut these characters: the waiting above was exercised


def test_preemption_recomputes_and_gives_the_same_tokens(random_checkpoint_dir):
    roomy = make_engine(random_checkpoint_dir)
    expected = run_text(roomy, PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    # 12 text blocks of 4 tokens: the four requests cannot all grow to their full length together.
    per_block = KVPool.bytes_per_block(layers=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    tight = make_engine(random_checkpoint_dir, kv_cache_memory=int(12 * per_block / 0.75))
    assert tight.runner.pools["text"].blocks.num_blocks == 12
    assert run_text(tight, PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True)) == expected
    assert tight.scheduler.preemptions > 0
    assert_all_free(tight)


def test_arrivals_while_decoding_in_a_tight_cache(random_checkpoint_dir):
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    expected = run_text(make_engine(random_checkpoint_dir), PROMPTS, params)
    per_block = KVPool.bytes_per_block(layers=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    engine = make_engine(random_checkpoint_dir, kv_cache_memory=int(11 * per_block / 0.75))
    reqs = []
    for p in PROMPTS:  # one new request every other step, joining those already decoding
        reqs.append(engine.requests[engine.add_text(p, params)])
        engine.step()
        engine.step()
    engine.run([r.id for r in reqs if r.finish_reason is None])
    assert [r.output for r in reqs] == expected
    assert engine.scheduler.preemptions > 0
    assert_all_free(engine)


def test_cancel_mid_way_frees_every_block(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    text = [engine.add_text(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS]
    caption = engine.add_caption(shape_sample(1, 0)[1], "", SamplingParams(max_tokens=30, ignore_eos=True))
    images = [engine.add_image("a red circle", seed=1, steps=8, n=2),
              engine.add_image("a blue square", negative_prompt="red", seed=2, steps=8)]
    for _ in range(3):
        engine.step()
    for rid in text[:2] + [caption] + images[:1]:
        engine.cancel(rid)
    engine.cancel("no-such-request")  # harmless
    while engine.has_work():
        engine.step()
    assert_all_free(engine)


def test_stops_and_limits(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    free = run_text(engine, [PROMPTS[0]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(free) == 10
    stop_id = free[4]
    first = free.index(stop_id)
    out = run_text(engine, [PROMPTS[0]], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]))
    assert out[0] == free[:first]
    rid = engine.add_text(PROMPTS[0], SamplingParams(max_tokens=10, ignore_eos=True))
    full = engine.run([rid])[rid].text
    word = full.split()[2] if len(full.split()) > 2 else full[-2:]
    rid = engine.add_text(PROMPTS[0], SamplingParams(max_tokens=10, ignore_eos=True, stop=[word]))
    done = engine.run([rid])[rid]
    assert done.finish_reason == "stop" and done.text == full[: full.index(word)]
    assert_all_free(engine)


def test_answers_ending_in_eos_keep_their_text(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    free = run_text(engine, [PROMPTS[0]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    rid = engine.add_text(PROMPTS[0], SamplingParams(max_tokens=10, stop_token_ids=[free[3]]))
    done = engine.run([rid])[rid]
    assert done.finish_reason == "stop"
    assert done.text == engine.tokenizer.decode(free[: free.index(free[3])], skip_special_tokens=True)


def test_two_sizes_finishing_together_and_a_request_longer_than_the_cache(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    ids = [engine.add_image("a", size=(16, 16), steps=2, seed=1), engine.add_image("b", size=(8, 16), steps=2, seed=2)]
    done = engine.run(ids)
    assert done[ids[0]].images[0].size == (16, 16) and done[ids[1]].images[0].size == (16, 8)
    per_block = KVPool.bytes_per_block(layers=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    tiny = make_engine(random_checkpoint_dir, kv_cache_memory=int(3 * per_block / 0.75))
    rid = tiny.add_text(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    done = tiny.run([rid])[rid]
    # 3 blocks hold 12 tokens: the prompt, then outputs, the newest one sampled but not yet cached.
    assert done.finish_reason == "length" and done.step == 12 - len(PROMPTS[0]) + 1
    rid = tiny.add_text(PROMPTS[2], SamplingParams(max_tokens=4))  # 21 prompt tokens never fit
    assert tiny.run([rid])[rid].error_type == "invalid_request_error"
    assert_all_free(tiny)
