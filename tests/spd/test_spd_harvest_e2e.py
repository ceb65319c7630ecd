"""spd:demo through the method-agnostic harvest engine."""

from __future__ import annotations

from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest


def test_harvest_spd_demo_end_to_end() -> None:
    cfg = HarvestConfig(n_tokens=1024, batch_size=8, seq_len=64, examples_per_component=4)
    repo = run_harvest("spd:demo", cfg, progress=False)
    again = HarvestRepo.open("spd:demo")
    assert again.path == repo.path
    summary = again.summary()
    sites = {c.site for c in summary}
    assert sites == {f"{i}.mlp.{k}" for i in range(4) for k in ("up", "down")}
    assert len(summary) == 8 * 128
    fired = [c for c in summary if c.firing_count > 0]
    assert fired and len(fired) < len(summary)
    assert all(0.0 <= c.density <= 1.0 for c in summary)
