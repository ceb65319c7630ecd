"""Decoder directions the viewer reads logits through, per method, against the files:
a CLT feature's total write (its decoder rows summed over the layers it writes into, read from
``W_dec_{i}.safetensors``), SPD's ``U`` for sites writing into the residual stream (read from the
checkpoint's ``_components.<module>.U``) and none for the others."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from spd_host.plugins import get_host
from spd_host.viewer.logits import decoder_directions

ADAPTERS = Path(__file__).resolve().parents[2] / "spd_adapters"
D_MODEL = 128


def test_clt_direction_is_the_sum_of_its_decoders() -> None:
    adapter = get_host().load_adapter("clt:demo")
    n_layers = len(adapter.sites)
    for i in (0, 2):
        W = load_file(str(ADAPTERS / "clt" / "demo_assets" / f"W_dec_{i}.safetensors"))[
            f"W_dec_{i}"
        ]
        assert W.shape[1] == n_layers - i
        want = sum(W[:, k, :].double() for k in range(n_layers - i))
        got = decoder_directions(adapter, f"layer_{i}", D_MODEL)
        assert got is not None and got.shape == (W.shape[0], D_MODEL)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_spd_directions_only_where_the_site_writes_the_residual_stream() -> None:
    adapter = get_host().load_adapter("spd:demo")
    sd = torch.load(ADAPTERS / "spd" / "demo_assets" / "model_400.pth", weights_only=True)
    down = decoder_directions(adapter, "1.mlp.down", D_MODEL)
    assert down is not None
    torch.testing.assert_close(down, sd["_components.transformer-h-1-mlp-c_proj.U"].float())
    assert decoder_directions(adapter, "1.mlp.up", D_MODEL) is None  # writes the MLP hidden
