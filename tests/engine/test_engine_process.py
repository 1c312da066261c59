"""The engine in a process of its own (engine/engine_process.py): the same answers as the engine stepped here,
a client that leaves frees its request there, bad input and unpicklable requests refused clearly, and a dead
or failing engine process fails every request instead of leaving it waiting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
from PIL import Image
from test_engine import make_engine

from xfusion_serve import Engine, EngineConfig, SamplingParams
from xfusion_serve.engine.async_engine import EngineFailed
from xfusion_serve.engine.engine_process import EngineProcess, EngineSpec

PROMPT = [2, 7, 9, 11]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def started(checkpoint) -> EngineProcess:
    engine = EngineProcess(EngineSpec(str(checkpoint), EngineConfig(block_size=4), threads=1))
    engine.start()
    return engine


async def collect(engine, add) -> list:
    return await drain(engine.submit(add))


async def drain(stream) -> list:
    return [ev async for ev in stream]


def live_requests(engine: Engine, observer) -> int:
    return len(engine.requests)


def fail_batches(engine: Engine, observer) -> None:
    engine.fault_hook = _raise_in_batches


def fail_steps(engine: Engine, observer) -> None:
    engine.fault_hook = _raise_in


def slow_decodes(engine: Engine, observer) -> None:
    engine.fault_hook = _sleep_in_decode


def _sleep_in_decode(phase: str, requests: list) -> None:
    if phase == "decode":
        time.sleep(0.05)


def heal(engine: Engine, observer) -> None:
    engine.fault_hook = None


def _raise_in_batches(phase: str, requests: list) -> None:
    if phase != "schedule":
        _raise_in(phase, requests)


def _raise_in(phase: str, requests: list) -> None:
    raise RuntimeError(f"planted {phase} failure")


@pytest.fixture
def engine_process(random_checkpoint_dir):
    engine = started(random_checkpoint_dir)
    yield engine
    engine.shutdown()


def test_text_images_and_captions_are_those_of_the_engine_stepped_here(random_checkpoint_dir, engine_process):
    picture = Image.new("RGB", (16, 16), (200, 30, 30))
    adds = [partial(Engine.add_text, prompt=PROMPT, params=GREEDY),
            partial(Engine.add_caption, image=picture, instruction=None, params=GREEDY),
            partial(Engine.add_image, prompt="a red circle", steps=3, seed=5)]

    async def all_of():
        return await asyncio.gather(*(collect(engine_process, add) for add in adds))

    remote = asyncio.run(all_of())
    local = make_engine(random_checkpoint_dir)
    ids = [add(local) for add in adds]
    here: dict[str, list] = {}
    while local.has_work():
        for ev in local.step():
            here.setdefault(ev.request_id, []).append(ev)
    for events, rid in zip(remote, ids):  # token events may come joined (a consumer behind): compare the sums
        assert summary(events) == summary(here[rid])
    assert len([t for ev in remote[0] for t in ev.token_ids]) == 12
    images, expected = remote[2][-1].images, here[ids[2]][-1].images
    assert len(images) == 1 and [im.tobytes() for im in images] == [im.tobytes() for im in expected]
    assert [ev.step for ev in remote[2] if ev.kind == "step"] == [1, 2, 3]
    assert engine_process.load() == (0, 0)


def summary(events: list) -> tuple:
    return ([t for ev in events for t in ev.token_ids], "".join(ev.text for ev in events if ev.kind == "token"),
            [(ev.kind, ev.step, ev.finish_reason, ev.text) for ev in events if ev.kind != "token"])


def count_encodes(engine: Engine, observer) -> None:
    encode, engine.encodes = engine.encode_image, 0

    def counted(*args, **kw):
        engine.encodes += 1
        return encode(*args, **kw)

    engine.encode_image = counted


def encodes(engine: Engine, observer) -> int:
    return engine.encodes


def test_the_choices_of_one_request_cross_together_and_share_their_pictures(random_checkpoint_dir,
                                                                            engine_process):
    from xfusion_serve.server.conversation import Conversation, add_conversation

    pictures = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    conv = Conversation.of_user("what is this", pictures)
    adds = [partial(add_conversation, conv=conv, params=GREEDY) for _ in range(3)]
    queued = []

    async def choices():
        await engine_process.call(count_encodes)
        held = asyncio.ensure_future(engine_process.call(hold))
        await asyncio.sleep(0.2)  # the engine process sleeps in the hold: nothing is added or stepped
        streams = engine_process.submit_all(adds)
        queued.append(engine_process.load())
        await held
        answers = await asyncio.gather(*(drain(s) for s in streams))
        return answers, await engine_process.call(encodes)

    remote, encoded = asyncio.run(choices())
    assert queued == [(0, 3)]  # counted as waiting as soon as submit_all returns (admission reads it)
    assert encoded == 2  # each picture once, for the three choices (pickled apart: six)
    local = make_engine(random_checkpoint_dir)
    here = Conversation.of_user("what is this", pictures)
    ids = [partial(add_conversation, conv=here, params=GREEDY)(local) for _ in range(3)]
    events: dict[str, list] = {}
    while local.has_work():
        for ev in local.step():
            events.setdefault(ev.request_id, []).append(ev)
    assert [summary(r) for r in remote] == [summary(events[i]) for i in ids]
    assert engine_process.load() == (0, 0)


def test_a_client_that_leaves_frees_its_request_in_the_engine_process(engine_process):
    async def leave_after_two() -> int:
        await engine_process.call(slow_decodes)  # 50 ms a step: the ~250 tokens left would take 12 s
        n = 0
        async for ev in engine_process.submit(partial(Engine.add_text, prompt=PROMPT,
                                                      params=SamplingParams(max_tokens=500, ignore_eos=True))):
            n += len(ev.token_ids)
            if n >= 2:
                break
        for _ in range(30):  # the cancel crosses the pipe and is handled between two steps
            if await engine_process.call(live_requests) == 0:
                return n
            await asyncio.sleep(0.05)
        return -1

    assert asyncio.run(leave_after_two()) >= 2
    assert engine_process.load() == (0, 0)


def test_a_stream_closed_before_it_was_read_frees_its_request(engine_process):
    async def scenario() -> int:
        await engine_process.call(slow_decodes)
        (stream,) = engine_process.submit_all([partial(Engine.add_text, prompt=PROMPT,
                                                       params=SamplingParams(max_tokens=500, ignore_eos=True))])
        await stream.aclose()  # never read: its add and then its cancel cross the pipe, in that order
        for _ in range(30):
            await asyncio.sleep(0.05)
            if await engine_process.call(live_requests) == 0 and engine_process.load() == (0, 0):
                return True
        return False

    assert asyncio.run(scenario())


def test_bad_input_is_refused_to_its_caller_and_the_engine_serves_on(engine_process):
    async def bad_then_good():
        with pytest.raises(ValueError, match="size"):
            await collect(engine_process, partial(Engine.add_image, prompt="x", size=(40, 40)))
        return await collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY))

    assert asyncio.run(bad_then_good())[-1].finish_reason == "length"
    assert engine_process.alive


def test_a_request_that_cannot_cross_to_the_engine_process_is_a_clear_type_error(engine_process):
    with pytest.raises(TypeError, match="picklable"):
        asyncio.run(collect(engine_process, lambda e: e.add_text(PROMPT, GREEDY)))
    assert engine_process.load() == (0, 0) and engine_process.alive


def test_a_failed_batch_fails_its_request_and_the_engine_serves_on(engine_process):
    async def scenario():
        await engine_process.call(fail_batches)
        failed = await collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY))
        await engine_process.call(heal)
        return failed[-1], await collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY))

    failed, served = asyncio.run(scenario())
    assert failed.finish_reason == "error" and "planted prefill failure" in failed.error
    assert served[-1].finish_reason == "length" and engine_process.alive


def test_a_failure_that_escapes_a_step_fails_the_requests_and_refuses_new_ones(engine_process):
    async def scenario():
        stream = engine_process.submit(partial(Engine.add_text, prompt=PROMPT,
                                               params=SamplingParams(max_tokens=100000, ignore_eos=True)))
        first = await anext(stream)
        await engine_process.call(fail_steps)
        return first, [ev async for ev in stream]

    first, rest = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert first.kind == "token"
    assert rest[-1].finish_reason == "error" and "planted schedule failure" in rest[-1].error
    assert not engine_process.alive and "planted schedule failure" in engine_process.failure
    with pytest.raises(EngineFailed, match="planted schedule failure"):
        asyncio.run(collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY)))


def test_a_killed_engine_process_ends_every_stream_with_an_error(engine_process):
    async def scenario():
        stream = engine_process.submit(partial(Engine.add_text, prompt=PROMPT,
                                               params=SamplingParams(max_tokens=100000, ignore_eos=True)))
        first = await anext(stream)
        os.kill(engine_process._proc.pid, signal.SIGKILL)
        return first, [ev async for ev in stream]

    first, rest = asyncio.run(asyncio.wait_for(scenario(), 60))  # a stream left waiting fails, not hangs
    assert first.kind == "token"
    assert rest[-1].finish_reason == "error" and "exit code -9" in rest[-1].error
    assert not engine_process.alive and "exit code -9" in engine_process.failure


def test_an_engine_process_that_cannot_load_says_why(tmp_path):
    engine = EngineProcess(EngineSpec(str(tmp_path / "missing"), EngineConfig()))
    with pytest.raises(EngineFailed, match="failed to start: .*missing"):
        engine.start()


def hold(engine: Engine, observer) -> None:
    time.sleep(1.0)  # the engine process reads nothing meanwhile


def test_a_request_on_its_way_to_the_engine_process_counts_as_waiting(engine_process):
    async def scenario():
        held = asyncio.ensure_future(engine_process.call(hold))
        await asyncio.sleep(0.2)  # the hold has reached the engine process, which is sleeping in it
        stream = engine_process.submit(partial(Engine.add_text, prompt=PROMPT, params=GREEDY))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        on_its_way = engine_process.load()
        await held
        await first
        rest = [ev async for ev in stream]
        return on_its_way, rest[-1] if rest else None

    on_its_way, done = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert on_its_way == (0, 1)  # not yet added there: a place in the queue all the same (admission reads it)
    assert done.kind == "done" and engine_process.load() == (0, 0)


def test_a_step_that_fails_right_after_adding_a_request_ends_it_with_an_error(engine_process):
    """The acknowledgement and the failure can reach the API process together: the request must end either
    way, never wait."""
    async def scenario():
        await engine_process.call(fail_steps)  # the next step raises: the one right after the add
        try:
            events = await collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY))
        except EngineFailed as e:
            return str(e)
        return events[-1].error

    said = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "planted schedule failure" in said and not engine_process.alive


EXIT_WITHOUT_SHUTDOWN = """
import sys
from xfusion_serve import EngineConfig
from xfusion_serve.engine.engine_process import EngineProcess, EngineSpec
EngineProcess(EngineSpec(sys.argv[1], EngineConfig(block_size=4), threads=1)).start()
print("started", flush=True)
"""


def test_a_process_that_exits_without_shutting_the_engine_down_still_exits(random_checkpoint_dir):
    """The engine process ignores SIGTERM (the server drains first, then stops it), so an exit that skips the
    server's shutdown (a second Ctrl-C) must stop it, not wait on it forever."""
    run = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_SHUTDOWN, str(random_checkpoint_dir)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "started" in run.stdout, run.stderr[-2000:]


def test_a_caller_that_gave_up_on_its_call_leaves_the_engine_serving(engine_process):
    """The answer to a call whose event loop has closed (a timeout, a test's asyncio.run) is dropped, not fatal."""
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(engine_process.call(hold), 0.1))
    time.sleep(1.5)  # the answer arrives for a loop that is gone
    events = asyncio.run(collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=GREEDY)))
    assert events[-1].finish_reason == "length" and engine_process.alive


def affinity(engine: Engine, observer) -> tuple[set[int], int]:
    import torch

    return os.sched_getaffinity(0), torch.get_num_threads()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning is seen only with two usable cores or more")
def test_an_engine_process_given_cores_computes_on_those_alone(random_checkpoint_dir, engine_process):
    last = max(os.sched_getaffinity(0))
    pinned = EngineProcess(EngineSpec(str(random_checkpoint_dir), EngineConfig(block_size=4), threads=1,
                                      cores=(last,)))
    pinned.start()
    try:
        assert asyncio.run(pinned.call(affinity)) == ({last}, 1)
        answer = asyncio.run(collect(pinned, partial(Engine.add_text, prompt=PROMPT, params=GREEDY)))
        assert answer[-1].kind == "done" and answer[-1].finish_reason == "length"
    finally:
        pinned.shutdown()
    assert asyncio.run(engine_process.call(affinity))[0] == os.sched_getaffinity(0)  # not given: the parent's


def test_a_group_whose_add_escapes_in_the_engine_process_ends_every_stream_of_it(engine_process):
    """As on the engine thread: one add of a group raising a BaseException ends the engine process, and every
    request of the group, before it and after it, ends with an error instead of waiting."""
    from test_async_engine import add_then_exit, outcome

    ok = partial(Engine.add_text, prompt=PROMPT, params=SamplingParams(max_tokens=50, ignore_eos=True))

    async def scenario():
        streams = engine_process.submit_all([ok, add_then_exit, ok])
        return await asyncio.wait_for(asyncio.gather(*(outcome(s) for s in streams)), 30)

    ends = asyncio.run(scenario())
    assert ends[1:] == ["refused", "refused"] and ends[0] in ("error", "refused")
    assert "PlantedExit" in engine_process.failure and engine_process.load() == (0, 0)


def test_load_is_nothing_from_the_moment_of_a_failure():
    """The reader thread wakes the failed requests' consumers before it empties its books: a consumer that asks
    for the load at once (admission, the metrics) must hear (0, 0), not the requests that never reached the engine
    (this raced in the test above: 1 run in 5 read (0, 3))."""
    engine = EngineProcess(spec=None)
    engine._load, engine._unacked = (2, 1), {7, 8, 9}  # what the books held when the engine process died
    assert engine.load() == (2, 4)
    engine.failure = "PlantedExit: planted"
    assert engine.load() == (0, 0)


def test_a_stop_string_found_in_the_api_process_ends_the_request_there_and_in_the_engine(random_checkpoint_dir,
                                                                                         engine_process):
    """The engine process sends token ids; the API process makes the text, and a stop string it finds ends the
    stream as the engine stepped here ends it, and finishes the request in the engine process at once rather
    than at its max_tokens (50 ms a step here: the ~400 tokens left would take 20 s)."""
    local = make_engine(random_checkpoint_dir)
    full = local.run([local.add_text(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True))]).popitem()[1].text
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if full.find(full[i : i + 2]) == i)
    params = SamplingParams(max_tokens=400, ignore_eos=True, stop=[stop])
    rid = local.add_text(PROMPT, params)
    here: list = []
    while local.has_work():
        here += [ev for ev in local.step() if ev.request_id == rid]
    assert (here[-1].finish_reason, here[-1].text) == ("stop", full[: full.find(stop)])

    async def stopped():
        await engine_process.call(slow_decodes)
        events = await collect(engine_process, partial(Engine.add_text, prompt=PROMPT, params=params))
        for _ in range(30):  # the finish crosses the pipe and is handled between two steps
            if await engine_process.call(live_requests) == 0:
                return events, True
            await asyncio.sleep(0.05)
        return events, False

    events, freed = asyncio.run(stopped())
    assert summary(events) == summary(here)
    assert freed and engine_process.load() == (0, 0)
    assert engine_process._outputs.states == {}  # nothing kept in the API process for it either
