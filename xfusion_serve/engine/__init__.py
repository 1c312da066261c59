"""The engine: KV cache, scheduler, runner, flow-matching and text sampling, step loop, async engine, offline API."""
