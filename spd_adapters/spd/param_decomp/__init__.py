"""Runs of Goodfire's JAX successor project ``param-decomp`` (orbax checkpoints, ``p-`` IDs).

The decomposition (V/U component stacks + the trained CI function) is read from the run's orbax
checkpoint with ``orbax-checkpoint`` (the optional extra ``spd-host[jax]``); everything the host
computes from it (CI, component activations, spliced forwards) runs in torch. The frozen target is
not in the checkpoint: it comes from the run's launch config (``spd_adapters.spd.param_decomp.target``).
"""
