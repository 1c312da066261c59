"""The GPU paths against their references, on the device XFUSION_TEST_DEVICE names (default: cuda; skipped
where there is none). benchmarks/gpu_check.sh runs them on a GPU machine; its CPU dry run (tests/gpu/
test_gpu_check.py) runs them on the CPU, so that they cannot rot between the sessions that have a GPU.

- the Triton attention kernels, compiled (interpreted on the CPU), against their torch references;
- the compiled decode step (CUDA graphs on CUDA) against the eager engine: the same greedy tokens;
- the compiled denoising step against the eager engine: the same latents to float rounding;
- the engine's text in bfloat16 against transformers' `generate` in bfloat16 on the same device.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_inputs import make_paged, make_prefill
from test_engine import OTHERS, PROMPTS, TARGET, assert_all_free, final_latents, run_text
from transformers import LlamaForCausalLM

from xfusion_serve import Engine, EngineConfig, SamplingParams, load_checkpoint

DEVICE = os.environ.get("XFUSION_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="no CUDA device (XFUSION_TEST_DEVICE)")]


def engine(path, dtype: str = "float32", **kw) -> Engine:
    return Engine(load_checkpoint(path, dtype=dtype, device=DEVICE),
                  EngineConfig(**{"device": DEVICE, "dtype": dtype, "block_size": 4, "compile_decode": False,
                                  "compile_denoise": False} | kw))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_the_triton_kernels_match_their_references(dtype, atol):
    pytest.importorskip("triton")
    from xfusion_kernels import (paged_decode_attention, paged_decode_attention_reference, prefill_attention,
                                 prefill_attention_reference)

    # text, an image, text, an image, text; and a sequence that is one image
    layout = [[(-1, 3), (0, 20), (-1, 2), (1, 5), (-1, 3)], [(4, 17)]]
    args = [a.to(DEVICE) for a in make_prefill(layout, 8, 2, 64, dtype=dtype)]
    torch.testing.assert_close(prefill_attention(*args).float(), prefill_attention_reference(*args).float(),
                               atol=atol, rtol=atol)
    q, k_cache, v_cache, tables, lens, _, _ = make_paged([3, 16, 17, 70, 1], 16, 8, 2, 64, dtype=dtype)
    paged = [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, lens)]
    got = paged_decode_attention(*paged)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), paged_decode_attention_reference(*paged).float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_compiled_decode_step_gives_the_eager_tokens(random_checkpoint_dir, backend):
    """On CUDA the compiled step is replayed as CUDA graphs (batches padded to 1, 2, 4, ..., tables to the
    whole context), with each attention backend the GPU image may use."""
    if backend == "triton" and not DEVICE.startswith("cuda"):
        pytest.skip("the Triton kernels inside a compiled step need a GPU (on the CPU they are interpreted)")
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    eager = run_text(engine(random_checkpoint_dir), PROMPTS, params)
    compiled = engine(random_checkpoint_dir, compile_decode=True, attention_backend=backend)
    compiled.capture_graphs()  # the server does this on its engine thread before it is ready
    assert run_text(compiled, PROMPTS[:3], params) == eager[:3]
    assert run_text(compiled, PROMPTS, params) == eager
    assert run_text(compiled, PROMPTS[2:3], params) == eager[2:3]
    assert_all_free(compiled)


def test_the_compiled_denoising_step_gives_the_eager_latents(random_checkpoint_dir):
    eager = final_latents(engine(random_checkpoint_dir), [TARGET] + OTHERS)
    compiled = engine(random_checkpoint_dir, compile_denoise=True)
    for got, expected in zip(final_latents(compiled, [TARGET] + OTHERS), eager):
        assert (got - expected).abs().max() < 1e-3
    assert_all_free(compiled)


@torch.no_grad()
def transformers_greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[dict[int, float]]]:
    """n greedy tokens of transformers' own forward and cache (no stop token), and each step's 5 likeliest
    tokens with their log-probabilities."""
    out = hf(torch.tensor([ids], device=DEVICE), use_cache=True)
    tokens, tops = [], []
    for _ in range(n):
        logits = out.logits[0, -1].float().log_softmax(-1)
        tokens.append(int(logits.argmax()))
        tops.append(dict(zip(*(t.tolist() for t in reversed(logits.topk(5))))))
        out = hf(torch.tensor([tokens[-1:]], device=DEVICE), past_key_values=out.past_key_values, use_cache=True)
    return tokens, tops


def test_bfloat16_text_is_transformers_in_bfloat16(random_checkpoint_dir):
    """Compared as vLLM compares low precision with transformers (its check_logprobs_close): the greedy tokens
    are transformers' until the two first differ; there each side's token is among the other's 5 likeliest (a
    near tie that rounding breaks one way or the other), and after it the two continue different texts. Where
    they agree, so do the tokens' log-probabilities, to bfloat16's rounding; most tokens must agree before any
    tie."""
    n = 12
    e = engine(random_checkpoint_dir, dtype="bfloat16")
    hf = LlamaForCausalLM.from_pretrained(e.ckpt.text_tower_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=5)
    ids = [e.add_text(p, params) for p in PROMPTS]
    ours = {rid: [] for rid in ids}
    while e.has_work():
        for ev in e.step():
            ours[ev.request_id] += ev.logprobs or []
    agreed = 0
    for rid, prompt in zip(ids, PROMPTS):
        theirs, their_tops = transformers_greedy(hf, prompt, n)
        assert len(ours[rid]) == n
        for mine, their, their_top in zip(ours[rid], theirs, their_tops):
            if mine.token != their:
                assert mine.token in their_top and their in {t for t, _ in mine.top}, (rid, agreed)
                break
            assert abs(mine.logprob - their_top[their]) < 0.1, (rid, agreed)  # bfloat16's rounding: < 0.03 seen
            agreed += 1
    assert agreed >= len(PROMPTS) * n // 2, agreed
