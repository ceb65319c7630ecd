"""Order-independent exact accumulation of real numbers in int64.

Why: shards are merged and checkpoints resumed, so a sum must not depend on the order in which
partial sums are added. Floating-point addition is not associative; integer addition is. Each
contribution is quantised once to a multiple of ``2**-frac_bits`` (deterministically, from the
same batch, however the work is split) and accumulated as an integer in two int64 limbs
``value = hi * 2**40 + lo`` (``0 <= lo < 2**40``), a canonical form, so the result is
bit-identical for any split or order. Quantisation error is at most ``2**-(frac_bits+1)``
per contribution.
"""

from __future__ import annotations

import torch

_LIMB = 40


class ExactSum:
    """A tensor of exact sums (shape fixed at construction)."""

    def __init__(self, shape: tuple[int, ...], frac_bits: int = 32) -> None:
        self.frac_bits = frac_bits
        self.hi = torch.zeros(shape, dtype=torch.int64)
        self.lo = torch.zeros(shape, dtype=torch.int64)

    def add_(self, x: torch.Tensor) -> None:
        """Add float contributions (each quantised to ``2**-frac_bits``)."""
        self.add_int_(quantize(x, self.frac_bits))

    def add_int_(self, q: torch.Tensor) -> None:
        lo = self.lo + q
        carry = torch.div(lo, 1 << _LIMB, rounding_mode="floor")
        self.lo = lo - carry * (1 << _LIMB)
        self.hi = self.hi + carry

    def merge_(self, other: ExactSum) -> None:
        self.hi = self.hi + other.hi
        self.add_int_(other.lo)

    def value(self) -> torch.Tensor:
        scale = 2.0 ** (-self.frac_bits)
        return self.hi.to(torch.float64) * (2.0**_LIMB * scale) + self.lo.to(torch.float64) * scale

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.hi": self.hi, f"{prefix}.lo": self.lo}

    def load_state(self, prefix: str, t: dict[str, torch.Tensor]) -> None:
        self.hi, self.lo = t[f"{prefix}.hi"].clone(), t[f"{prefix}.lo"].clone()


def quantize(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``round(x * 2**frac_bits)`` as int64 (raises if a value cannot be represented)."""
    y = torch.round(x.to(torch.float64) * 2.0**frac_bits)
    if y.numel() and float(y.abs().max()) >= 2.0**62:
        raise OverflowError(f"value too large for exact accumulation at 2**-{frac_bits} resolution")
    return y.to(torch.int64)


PROB_FRAC_BITS = 30
"""Probability masses are int64 counts of ``2**-30`` (exact, order-independent; up to ~8.6e9)."""
