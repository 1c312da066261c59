"""The KV cache's default size: a share of the memory the weights leave free, at most what the running requests
can fill; an explicit budget wins; the start-up log says how many tokens each pool holds."""

from __future__ import annotations

import logging

import pytest

import xfusion_serve.engine.runner as runner_module
from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.engine.kv_cache import KVPool, available_memory, kv_cache_budget


def pool_bytes(engine: Engine) -> int:
    """Bytes of both pools without their scratch blocks: what the budget paid for."""
    return sum(p.nbytes * p.blocks.num_blocks // (p.blocks.num_blocks + 1) for p in engine.runner.pools.values())


def per_block(engine: Engine, tower: str) -> int:
    pool = engine.runner.pools[tower]
    layers, _, _, bs, heads, dim = pool.kv.shape
    return KVPool.bytes_per_block(layers, heads, dim, bs, pool.kv.dtype)


def test_default_budget_is_a_share_of_free_memory(checkpoint_dir, monkeypatch):
    free = 3 << 20
    monkeypatch.setattr(runner_module, "available_memory", lambda device: free)
    engine = Engine(load_checkpoint(checkpoint_dir), EngineConfig(kv_cache_fraction=0.5, block_size=4))
    slack = per_block(engine, "text") + per_block(engine, "vision")  # rounding down to whole blocks
    assert free // 2 - slack < pool_bytes(engine) <= free // 2
    text = engine.runner.pools["text"].blocks.num_blocks * per_block(engine, "text")
    assert text == pytest.approx(0.75 * free / 2, abs=per_block(engine, "text"))  # the towers' shares


def test_default_budget_stops_at_what_running_requests_can_fill(checkpoint_dir, monkeypatch):
    monkeypatch.setattr(runner_module, "available_memory", lambda device: 1 << 40)
    ckpt = load_checkpoint(checkpoint_dir)
    engine = Engine(ckpt, EngineConfig(max_running=3, block_size=4))
    full = 3 * ckpt.model.text_config.max_position_embeddings
    assert full - 4 <= engine.runner.pools["text"].capacity <= full


def test_an_explicit_budget_wins(checkpoint_dir, monkeypatch):
    def boom(device):
        raise AssertionError("free memory must not be read when the budget is given")

    monkeypatch.setattr(runner_module, "available_memory", boom)
    engine = Engine(load_checkpoint(checkpoint_dir), EngineConfig(kv_cache_memory=2 << 20, block_size=4))
    assert (2 << 20) - 2 * per_block(engine, "text") < pool_bytes(engine) <= 2 << 20


def test_start_up_log_names_each_pools_capacity(checkpoint_dir, caplog):
    with caplog.at_level(logging.INFO, logger="xfusion_serve.engine.runner"):
        engine = Engine(load_checkpoint(checkpoint_dir), EngineConfig(kv_cache_memory=1 << 20, block_size=4))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    for tower, pool in engine.runner.pools.items():
        assert f"{tower} {pool.capacity:,} tokens" in line


def test_budget_arithmetic_and_bad_settings():
    assert kv_cache_budget(None, 0.25, useful=10**12, free=4000) == 1000
    assert kv_cache_budget(None, 0.25, useful=300, free=4000) == 300
    assert kv_cache_budget(1234, 0.25, useful=1, free=0) == 1234
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        EngineConfig(kv_cache_fraction=0.0)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=0)
    assert EngineConfig().kv_cache_fraction == 0.25 and EngineConfig(device="cuda").kv_cache_fraction == 0.85


def test_free_memory_is_read_from_the_machine():
    import torch

    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < available_memory(torch.device("cpu")) <= total
