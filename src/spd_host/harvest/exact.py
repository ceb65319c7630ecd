"""Order-independent exact accumulation of real numbers in int64.

Why: shards are merged, checkpoints resumed and batches accumulated on a GPU with atomic adds,
so a sum must not depend on the order in which terms are added. Floating-point addition is not
associative; integer addition is. Each contribution is converted on its own to fixed point
(``split_fixed``: units of ``2**-frac_bits`` plus a remainder in units of ``2**-64``; exact for
a float32 of magnitude ``>= 2**-41``, else within ``2**-65``) and accumulated as integers in
int64 limbs. The limbs are brought to a canonical form before anything reads them, so states
and results are bit-identical for any split, order, batch size or device. ``quantize`` (one
rounding to ``2**-frac_bits``) serves bounded inputs such as probabilities.
"""

from __future__ import annotations

import torch

_LIMB = 40
# lo may take this many contributions of < 2**40 each (plus a canonical lo) before it can
# overflow int64; normalisation runs well before that
_LO_HEADROOM = 1 << 22


class ExactSum:
    """A tensor of exact sums (shape fixed at construction), on ``device``.

    Three int64 limbs per entry: ``value = (hi * 2**40 + lo) * 2**-frac_bits + fine * 2**-64``.
    ``fine`` holds the part of each contribution below ``2**-frac_bits`` (``split_fixed``), so
    a float32 contribution is represented exactly when ``|x| >= 2**-41`` and to ``2**-65``
    otherwise: float32 activations sum exactly, whatever the order, split or device.
    """

    def __init__(
        self, shape: tuple[int, ...], frac_bits: int = 32, device: torch.device | str = "cpu"
    ) -> None:
        self.frac_bits = frac_bits
        self.hi = torch.zeros(shape, dtype=torch.int64, device=device)
        self.lo = torch.zeros(shape, dtype=torch.int64, device=device)
        self.fine = torch.zeros(shape, dtype=torch.int64, device=device)
        self._load = 0  # contributions added to one lo entry since the last normalisation (bound)

    def add_(self, x: torch.Tensor) -> None:
        """Add float contributions (each quantised to ``2**-frac_bits``) elementwise."""
        self.add_int_(quantize(x, self.frac_bits))

    def add_int_(self, q: torch.Tensor) -> None:
        lo = self.lo + q
        carry = torch.div(lo, 1 << _LIMB, rounding_mode="floor")
        self.lo = lo - carry * (1 << _LIMB)
        self.hi = self.hi + carry

    def index_add_(
        self,
        index: torch.Tensor,
        q: torch.Tensor,
        max_per_entry: int,
        fine: torch.Tensor | None = None,
        small: bool = False,
    ) -> None:
        """Add int64 contributions ``q`` (units ``2**-frac_bits``; ``fine``: units ``2**-64``,
        each in ``[0, 2**(64 - frac_bits)]``) at flat indices ``index`` (atomic-safe).

        ``max_per_entry`` bounds how many contributions one entry can get in this call (e.g.
        the positions in the batch); it keeps the limbs from overflowing between
        normalisations. ``small``: the caller knows every ``|q| < 2**40``, so ``q`` goes to
        the ``lo`` limb whole (one scatter instead of two; the same number once normalised).
        """
        if index.numel() == 0:
            return
        if self._load + max_per_entry > _LO_HEADROOM:
            self.normalize()
        if small:  # |q| < 2**40: all of it fits the lo limb (normalisation carries later)
            self.lo.view(-1).index_add_(0, index, q)
        else:
            hi = torch.div(q, 1 << _LIMB, rounding_mode="floor")
            self.lo.view(-1).index_add_(0, index, q - hi * (1 << _LIMB))
            self.hi.view(-1).index_add_(0, index, hi)
        if fine is not None:
            self.fine.view(-1).index_add_(0, index, fine)
        self._load += max_per_entry

    def normalize(self) -> None:
        """Canonical limbs (``0 <= fine < 2**(64-frac)``, ``0 <= lo < 2**40``); the represented
        numbers do not change."""
        fb = 64 - self.frac_bits
        carry = torch.div(self.fine, 1 << fb, rounding_mode="floor")
        self.fine -= carry * (1 << fb)
        self.lo += carry
        carry = torch.div(self.lo, 1 << _LIMB, rounding_mode="floor")
        self.lo -= carry * (1 << _LIMB)
        self.hi += carry
        self._load = 0

    def merge_(self, other: ExactSum) -> None:
        other.normalize()
        self.normalize()
        self.hi = self.hi + other.hi.to(self.hi.device)
        self.fine = self.fine + other.fine.to(self.fine.device)
        self.add_int_(other.lo.to(self.lo.device))
        self.normalize()

    def value(self) -> torch.Tensor:
        self.normalize()
        scale = 2.0 ** (-self.frac_bits)
        coarse = self.hi.to(torch.float64) * (2.0**_LIMB * scale)
        return coarse + (self.lo.to(torch.float64) * scale + self.fine.to(torch.float64) * 2.0**-64)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        self.normalize()
        return {f"{prefix}.hi": self.hi, f"{prefix}.lo": self.lo, f"{prefix}.fine": self.fine}

    def load_state(self, prefix: str, t: dict[str, torch.Tensor]) -> None:
        dev = self.hi.device
        self.hi, self.lo = t[f"{prefix}.hi"].to(dev).clone(), t[f"{prefix}.lo"].to(dev).clone()
        fine = t.get(f"{prefix}.fine")  # absent in states written before the fine limb
        self.fine = torch.zeros_like(self.hi) if fine is None else fine.to(dev).clone()
        self._load = 0


def split_fixed(x: torch.Tensor, frac_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(floor(x * 2**frac), round(rest * 2**64))``: ``x`` in units of ``2**-frac`` plus the
    remainder (``[0, 2**-frac)``) in units of ``2**-64``.

    Exact steps in float64 (power-of-two scaling, floor, and the subtraction, whose result
    holds at most float32's 24 significant bits); only the final rounding of the remainder
    loses anything (``<= 2**-65``). Raises ``OverflowError`` when ``|x| >= 2**(62 - frac)``.
    """
    y = x.to(torch.float64) * 2.0**frac_bits
    c = torch.floor(y)
    if c.numel() and float(c.abs().max()) >= 2.0**62:
        raise OverflowError(f"value too large for exact accumulation at 2**-{frac_bits} resolution")
    fine = torch.round((y - c) * 2.0 ** (64 - frac_bits))
    return c.to(torch.int64), fine.to(torch.int64)


def split_fixed_bounded(x: torch.Tensor, frac_bits: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``split_fixed`` plus whether every ``|floor(x * 2**frac)| < 2**40`` (from the same
    range check, so no extra pass): such contributions fit ``ExactSum``'s ``lo`` limb whole."""
    y = x.to(torch.float64) * 2.0**frac_bits
    c = torch.floor(y)
    top = float(c.abs().max()) if c.numel() else 0.0
    if top >= 2.0**62:
        raise OverflowError(f"value too large for exact accumulation at 2**-{frac_bits} resolution")
    fine = torch.round((y - c) * 2.0 ** (64 - frac_bits))
    return c.to(torch.int64), fine.to(torch.int64), top < 2.0**_LIMB


def quantize(x: torch.Tensor, frac_bits: int, *, check: bool = True) -> torch.Tensor:
    """``round(x * 2**frac_bits)`` as int64 (raises if a value cannot be represented).

    The product is taken in float64, where multiplying by a power of two is exact, so the
    result is the same on every device. ``check=False`` skips the range check (one device
    sync) for inputs known to be bounded, such as probabilities.
    """
    y = torch.round(x.to(torch.float64) * 2.0**frac_bits)
    if check and y.numel() and float(y.abs().max()) >= 2.0**62:
        raise OverflowError(f"value too large for exact accumulation at 2**-{frac_bits} resolution")
    return y.to(torch.int64)


PROB_FRAC_BITS = 30
"""Probability masses are int64 counts of ``2**-30`` (exact, order-independent; up to ~8.6e9)."""
