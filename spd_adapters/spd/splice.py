"""Running the base model with decomposed modules replaced by their masked components.

Inside :func:`splice`, every forward of ``model`` replaces each chosen module's output by
``((x V) * m) U + b`` where the mask ``m`` is (Goodfire's ``CEandKLLosses`` name in brackets):

- ``ci_masked`` [ci_masked]: the causal importances;
- ``rounded_ci`` [rounded_masked]: ``ci > rounding_threshold`` (default 0.5, i.e. ``torch.round``;
  the goodfire convention uses the run's own threshold);
- ``all_ones`` [unmasked]: ones (the full reconstruction ``x (V U) + b``);
- ``zero_mask`` [zero_masked]: zeros (the module outputs only its bias);
- ``stochastic`` [stoch_masked]: ``ci + (1 - ci) * r`` with ``r`` uniform (``sampling:
  continuous``) or 0/1 (``binomial``), plus the weight-delta term ``r' * x (W - (V U)^T)`` with
  one uniform ``r'`` per position, as the reference's eval samples it;
- ``random`` [random_masked]: a uniform random mask.

As in the reference evaluation, the causal importances are computed from the *unmodified*
forward: the CI variants first run the model once without replacement (capturing every
decomposed module's input, which a global CI function needs), then run the spliced forward.
That clean pass and its CI are cached per token batch (:class:`CiCache`), so the variants and
per-site scopes of one eval batch share one CI, as the reference's eval computes it once per
batch. A caller that runs the clean forward itself (the fidelity engine) records the modules'
inputs there with :func:`observe_clean_forward`, and the CI comes from that forward instead of
a pre-pass of its own: the same inputs, so the same CI. ``positions`` ([B, S] bool) restricts the replacement to those positions (the module's
own output elsewhere: SAELens' special-token exclusion).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from spd_adapters.spd.capture import capture_inputs
from spd_adapters.spd.model import SpdModel
from spd_host.errors import ConfigError

DETERMINISTIC_VARIANTS = ("ci_masked", "all_ones", "rounded_ci", "zero_mask")
SPLICE_VARIANTS = (*DETERMINISTIC_VARIANTS, "stochastic", "random")
GOODFIRE_NAMES = {
    "ci_masked": "ci_masked",
    "all_ones": "unmasked",
    "rounded_ci": "rounded_masked",
    "zero_mask": "zero_masked",
    "stochastic": "stoch_masked",
    "random": "random_masked",
}
_NEEDS_CI = ("ci_masked", "rounded_ci", "stochastic")
OPTION_KEYS = ("rounding_threshold", "ci_sampling")


class CiCache:
    """The CI of the last token batch, keyed by that tensor's identity and version; and the
    decomposed modules' inputs of a clean forward someone else ran on a batch
    (:meth:`put_clean_inputs`), from which that batch's CI is computed without a pre-pass."""

    def __init__(self) -> None:
        self._ref: Any = None
        self._version = -1
        self._key: tuple[Any, ...] = ()
        self.ci: dict[str, Tensor] = {}
        self._inputs_ref: Any = None
        self._inputs_version = -1
        self._inputs: dict[str, Tensor] = {}

    def put_clean_inputs(self, tokens: Tensor, inputs: dict[str, Tensor]) -> None:
        self._inputs_ref, self._inputs_version, self._inputs = (
            weakref.ref(tokens),
            tokens._version,
            inputs,
        )

    def clean_inputs(self, tokens: Tensor, paths: Sequence[str]) -> dict[str, Tensor] | None:
        """The recorded clean inputs of ``tokens``, when every path in ``paths`` has one."""
        fresh = self._inputs_ref is not None and self._inputs_ref() is tokens
        if (
            fresh
            and self._inputs_version == tokens._version
            and all(p in self._inputs for p in paths)
        ):
            return self._inputs
        return None

    def get(self, tokens: Tensor, key: tuple[Any, ...]) -> dict[str, Tensor] | None:
        fresh = self._ref is not None and self._ref() is tokens
        if fresh and self._version == tokens._version and self._key == key:
            return self.ci
        return None

    def put(self, tokens: Tensor, key: tuple[Any, ...], ci: dict[str, Tensor]) -> None:
        self._ref, self._version, self._key, self.ci = (
            weakref.ref(tokens),
            tokens._version,
            key,
            ci,
        )


@contextmanager
def observe_clean_forward(
    model: nn.Module, spd: SpdModel, tokens: Tensor, cache: CiCache
) -> Iterator[None]:
    """Around an unmodified forward of ``model`` on ``tokens``: record every decomposed module's
    input into ``cache``, so that splices of the same ``tokens`` compute their CI from it."""
    with capture_inputs(model, spd.paths) as inputs:
        yield
    cache.put_clean_inputs(tokens, {p: x.detach() for p, x in inputs.items()})


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a
    return None


@contextmanager
def splice(
    model: nn.Module,
    spd: SpdModel,
    paths: Sequence[str],
    variant: str,
    *,
    options: Mapping[str, Any] | None = None,
    positions: Tensor | None = None,
    ci_cache: CiCache | None = None,
    sampling: str = "continuous",
) -> Iterator[None]:
    if variant not in SPLICE_VARIANTS:
        raise ConfigError(
            f"unknown SPD splice variant {variant!r}", hint=f"one of: {', '.join(SPLICE_VARIANTS)}"
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"unknown SPD splice options {unknown}", hint=f"one of: {OPTION_KEYS}")
    threshold = options.get("rounding_threshold")
    ci_sampling = options.get("ci_sampling")  # None: noiseless CI; else the run's sampling
    cache = ci_cache if ci_cache is not None else CiCache()
    masks: dict[str, Tensor] = {}
    state = {"clean": False}

    def mask_for(path: str, ci: Tensor) -> Tensor:
        if variant == "ci_masked":
            return ci
        if variant == "rounded_ci":
            return ci.round() if threshold is None else (ci > threshold).to(ci.dtype)
        # stochastic: ci + (1 - ci) * source, source as the run samples it
        # drawn in row-major order whatever the CI tensor's strides are
        if sampling == "binomial":
            source = torch.randint(0, 2, ci.shape, device=ci.device).to(ci.dtype)
        else:
            source = torch.rand(ci.shape, dtype=ci.dtype, device=ci.device)
        return ci + (1 - ci) * source

    def pre_forward(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["clean"]:
            return
        tokens = _first_tensor(args, kwargs)
        key = (ci_sampling,)
        ci = cache.get(tokens, key) if tokens is not None else None
        if ci is None:
            recorded = cache.clean_inputs(tokens, spd.paths) if tokens is not None else None
            if recorded is not None:  # the caller's own clean forward of this batch
                with torch.no_grad():
                    ci = spd.causal_importance(recorded, sampling=ci_sampling)
            else:
                state["clean"] = True  # the nested clean forward: no CI pass, no replacement
                try:
                    with torch.no_grad(), capture_inputs(model, spd.paths) as inputs:
                        model(*args, **kwargs)
                    ci = spd.causal_importance(inputs, sampling=ci_sampling)
                finally:
                    state["clean"] = False
            if tokens is not None:
                cache.put(tokens, key, ci)
        masks.clear()
        for p in paths:
            masks[p] = mask_for(p, ci[p])

    def replacement(path: str, x: Tensor, output: Tensor) -> Tensor:
        comp = spd.components[path]
        ci_shape = (*x.shape, comp.C) if comp.kind == "embedding" else (*x.shape[:-1], comp.C)
        if variant == "all_ones":
            out = comp.forward(x)
        elif variant == "zero_mask":
            out = comp.forward(x, torch.zeros(ci_shape, dtype=comp.V.dtype, device=x.device))
        elif variant == "random":
            out = comp.forward(x, torch.rand(ci_shape, dtype=comp.V.dtype, device=x.device))
        else:
            out = comp.forward(x, masks[path])
        if variant == "stochastic":
            # the weight delta x (W - (V U)^T) is the module's own output minus the full
            # reconstruction (biases cancel), masked by one uniform number per position
            delta = output.to(out.dtype) - comp.forward(x)
            r = torch.rand(delta.shape[:-1], dtype=out.dtype, device=out.device)
            out = out + r.unsqueeze(-1) * delta
        if positions is not None:
            keep = positions.to(out.device).reshape(*positions.shape, 1)
            out = torch.where(keep, out, output.to(out.dtype))
        return out.to(output.dtype)

    with ExitStack() as stack:
        if variant in _NEEDS_CI:
            stack.callback(model.register_forward_pre_hook(pre_forward, with_kwargs=True).remove)
        for path in paths:

            def hook(
                _m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                output: Any,
                *,
                _p: str = path,
            ) -> Tensor | None:
                if state["clean"]:
                    return None
                x = args[0] if args else next(iter(kwargs.values()))
                return replacement(_p, x, output)

            handle = model.get_submodule(path).register_forward_hook(hook, with_kwargs=True)
            stack.callback(handle.remove)
        yield
