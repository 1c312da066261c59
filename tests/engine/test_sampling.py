"""Next-token sampling at ordinary settings, every draw seeded, and stop strings while streaming."""

from __future__ import annotations

import math

import pytest
import torch

from xfusion_serve import EMBEDDED_CHECKPOINT, Engine, EngineConfig, SamplingParams, load_checkpoint
from xfusion_serve.engine.text_sampling import sample_next

PROBS = [0.5, 0.3, 0.2]


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    logits = torch.tensor([[math.log(p) for p in PROBS]])
    g = params.generator()
    return [sample_next(logits, [params], [g])[0] for _ in range(n)]


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=1.0, top_p=0.6, seed=1), {0, 1}),  # 0.5 < 0.6: the second token is needed
    (SamplingParams(temperature=1.0, top_p=0.5, seed=2), {0}),  # exactly reached by the first
    (SamplingParams(temperature=1.0, top_p=0.81, seed=3), {0, 1, 2}),
    (SamplingParams(temperature=1.0, top_k=2, seed=4), {0, 1}),
    (SamplingParams(temperature=1.0, top_k=1, seed=5), {0}),
    (SamplingParams(temperature=1.0, seed=6), {0, 1, 2}),
])
def test_top_p_and_top_k_keep_exactly_the_right_tokens(params, allowed):
    got = draws(params)
    assert set(got) == allowed
    if len(allowed) > 1:  # and in the renormalised proportions: 0.5 : 0.3 (: 0.2)
        mass = sum(PROBS[t] for t in allowed)
        assert got.count(0) / len(got) == pytest.approx(PROBS[0] / mass, abs=0.08)


def test_extreme_sampling_settings_still_give_the_greedy_token():
    """Found by schemathesis: a top_p of 5e-324 is 0 in float32 and dropped every token; a temperature of
    1e-300 overflows the logits. Both are greedy decoding in the limit, and that is what they give."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, -2.0, 0.0, 0.9]])
    greedy = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=1.0, top_p=5e-324, seed=0), SamplingParams(temperature=1e-300, seed=0),
              SamplingParams(temperature=2.0, top_k=1, seed=0)):
        assert sample_next(logits, [p, p], [p.generator(), p.generator()]) == greedy


@pytest.fixture(scope="module")
def demo_engine():
    """The embedded checkpoint: a real byte-level BPE tokenizer, whose words span several tokens."""
    return Engine(load_checkpoint(EMBEDDED_CHECKPOINT), EngineConfig())


def streamed(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list[str], str]:
    """-> (the text of every token event, in order; the done event's text), checking at every event that
    what has been streamed is a prefix of the final text."""
    rid = engine.add_text(engine.tokenizer(prompt).input_ids, params)
    deltas, final = [], None
    while final is None:
        for ev in engine.step():
            if ev.request_id == rid and ev.kind == "token":
                deltas.append(ev.text)
            elif ev.request_id == rid and ev.kind == "done":
                final = ev.text
    assert final.startswith("".join(deltas)), (deltas, final)
    return deltas, final


def test_streamed_text_never_passes_a_stop_string_that_spans_tokens(demo_engine):
    prompt = "there is a large blue"
    _, whole = streamed(demo_engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    ids = demo_engine.tokenizer(whole, add_special_tokens=False).input_ids
    pieces = [demo_engine.tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    # A stop string from the middle of one token to the middle of the next, and one that starts the same way
    # but never completes: the first ends the text before it, the second must be released in the end.
    cut = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    stop = whole[len(pieces[cut]) - 2 : len(pieces[cut]) + 2]
    deltas, text = streamed(demo_engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))
    assert text == whole[: whole.index(stop)] and stop not in "".join(deltas)
    false_start = stop + "\x00never"
    deltas, text = streamed(demo_engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=[false_start]))
    assert text == whole


def test_logprobs_are_the_models_own_log_softmax(random_checkpoint_dir):
    """Each generated token's log-probability and the k likeliest, against transformers' logits of the text
    tower over the same tokens; sampled at temperature 2 (they stay those of the model, not of the sampler)."""
    from transformers import LlamaForCausalLM

    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    prompt = [2, 7, 9, 11]
    rid = engine.add_text(prompt, SamplingParams(max_tokens=6, ignore_eos=True, temperature=2.0, seed=3, logprobs=3))
    events = []
    while engine.requests:
        events += [e for e in engine.step() if e.request_id == rid]
    tokens = [t for e in events for t in e.token_ids]
    logprobs = [lp for e in events for lp in e.logprobs or []]
    assert len(tokens) == len(logprobs) == 6 and [lp.token for lp in logprobs] == tokens
    hf = LlamaForCausalLM.from_pretrained(engine.ckpt.text_tower_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    for lp, row, token in zip(logprobs, expected, tokens):
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, ids = row.topk(3)
        assert [i for i, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    quiet = engine.add_text(prompt, SamplingParams(max_tokens=2))  # none asked: none given
    assert all(e.logprobs is None for e in engine.run([quiet]).values())
