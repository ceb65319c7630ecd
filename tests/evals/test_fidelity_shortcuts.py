"""Forwards that start above the blocks a splice leaves alone, and SPD's CI from the engine's
clean forward: same numbers as the full forwards, less work."""

from __future__ import annotations

import torch

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import fidelity_on_batches
from spd_host.evals.hooks import first_block, record_block_outputs, reuse_blocks_below
from spd_host.plugins import temporary_plugins
from spd_host.topology import topology_of
from tests.evals.toy_plugin import N_LAYER, VOCAB, ToyPlugin, build_model


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))


def _zero_mlp(model: torch.nn.Module, layer: int) -> torch.utils.hooks.RemovableHandle:
    return model.transformer.h[layer].mlp.register_forward_hook(lambda _m, _a, out: out * 0)


def test_first_block_of_hook_points_and_addresses() -> None:
    model = build_model()
    topo = topology_of(model)
    assert first_block(topo, ["1.mlp_out", "1.mlp_in"]) == 1
    assert first_block(topo, ["1.mlp_out", "0.mlp.down"]) == 0
    assert first_block(topo, ["1.mlp.up"]) == 1
    assert first_block(topo, ["embed", "1.mlp_out"]) == 0  # global names never shorten
    assert first_block(topo, ["transformer.h.1.mlp"]) == 0  # not canonical: no promise


def test_reused_blocks_give_the_full_forward_bit_for_bit_and_do_not_run() -> None:
    model = build_model().eval()
    topo = topology_of(model)
    tokens = _tokens()
    calls = [0]
    model.transformer.h[0].attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad():
        with record_block_outputs(model, topo) as blocks:
            model(tokens)
        h = _zero_mlp(model, 1)
        full = model(tokens).logits
        n_full = calls[0]
        with reuse_blocks_below(model, topo, 1, blocks):
            short = model(tokens).logits
        h.remove()
    assert n_full == 2 and calls[0] == 2  # block 0 ran in the clean and full forwards only
    assert torch.equal(full, short)
    assert "forward" not in vars(model.transformer.h[0])  # undone


def _run(local: bool) -> tuple[dict, int]:
    with temporary_plugins(("toytc", ToyPlugin()), entry_points=False) as host:
        adapter = host.load_adapter("toytc:demo")
        if local:
            adapter.splice_is_local = True  # the toy splice replaces only its MLP's output
        model = adapter.load_base_model()
        calls = [0]
        h = model.transformer.h[0].attn.register_forward_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1)
        )
        tokens = _tokens()
        res = fidelity_on_batches(
            adapter, [tokens[:2], tokens[2:]], FidelityConfig(use_harvest=False)
        )
        h.remove()
        dump = res.model_dump(exclude={"created_at", "package_version"})
        return dump, calls[0]


def test_a_local_splice_starts_per_site_forwards_at_its_block_with_the_same_numbers() -> None:
    full, n_full = _run(local=False)
    short, n_short = _run(local=True)
    assert full == short  # bit for bit: blocks below a site see exactly the clean forward
    n_batches, n_variants = 2, 2
    # per batch: clean, all-sites baseline + 2 variants, per site one baseline + one variant,
    # harvest. Block 0 is skipped by site 1's splice (the zero-ablations below a target are
    # skipped whatever the adapter says)
    per_batch_full = 1 + 1 + n_variants + N_LAYER * 2 - 1 + 1
    assert n_full == n_batches * per_batch_full
    assert n_short == n_full - n_batches


def _spd_logits(observe: bool) -> tuple[torch.Tensor, int]:
    from spd_host.plugins import get_host

    adapter = get_host().load_adapter("spd:demo")
    model = adapter.load_base_model()
    calls = [0]
    h = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            if observe:
                with adapter.observe_clean_forward(model, tokens):
                    model(tokens)
            with adapter.splice(model, sites=[adapter.sites[-1].name], variant="ci_masked"):
                logits = model(tokens).logits
    finally:
        h.remove()
    return logits, calls[0]


def test_spd_ci_from_the_observed_clean_forward_needs_no_pre_pass() -> None:
    with_pass, n_pass = _spd_logits(observe=False)
    observed, n_observed = _spd_logits(observe=True)
    assert n_pass == 2  # the splice's own clean pre-pass, then the spliced forward
    assert n_observed == 2  # the caller's clean forward, then the spliced forward
    assert torch.equal(with_pass, observed)  # the same clean inputs, the same CI
