"""Sparse accumulation of counts keyed by int64 pairs.

Why: the reference implementation keeps dense ``C x C`` co-occurrence and ``C x vocab`` token
tensors, which cannot exist for a million components. Here only pairs that actually occurred
are stored, as a sorted int64 key array (``row * n_cols + col``) with a value per key, so memory
grows with the number of distinct observed pairs.

Updates are appended to a buffer and folded into the sorted main table when the buffer grows
past a fraction of it (a two-level log-structured merge), so the amortised cost per update is a
sort of the new keys plus a linear share of the table, never a dense scan.

Integer tables (``dtype=torch.int64``) are exact. Float tables accumulate in float64.
"""

from __future__ import annotations

import torch


class SparsePairCounter:
    """A map ``(row, col) -> value`` over an ``n_rows x n_cols`` grid, stored sparsely."""

    def __init__(self, n_rows: int, n_cols: int, *, dtype: torch.dtype = torch.int64) -> None:
        if n_rows * n_cols >= 2**62:
            raise ValueError(f"grid {n_rows} x {n_cols} does not fit int64 keys")
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.dtype = dtype
        self.keys = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0, dtype=dtype)
        self._buf_keys: list[torch.Tensor] = []
        self._buf_values: list[torch.Tensor] = []
        self._buf_len = 0

    # -- updates ----------------------------------------------------------------------------------
    def add_keys(self, keys: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add ``weights`` (1 each when None) at ``keys`` (int64 ``row * n_cols + col``)."""
        if keys.numel() == 0:
            return
        if weights is None:
            k, v = torch.unique(keys, return_counts=True)
            v = v.to(self.dtype)
        else:
            k, inv = torch.unique(keys, return_inverse=True)
            v = torch.zeros(k.shape[0], dtype=self.dtype).index_add_(0, inv, weights.to(self.dtype))
        self._buf_keys.append(k)
        self._buf_values.append(v)
        self._buf_len += int(k.shape[0])
        if self._buf_len > max(1 << 20, self.keys.shape[0] // 2):
            self.consolidate()

    def add(self, rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.add_keys(rows.to(torch.int64) * self.n_cols + cols.to(torch.int64), weights)

    def consolidate(self) -> None:
        """Fold the buffer into the sorted main table (sum of values per distinct key)."""
        if not self._buf_keys:
            return
        keys = torch.cat([self.keys, *self._buf_keys])
        values = torch.cat([self.values, *self._buf_values])
        self._buf_keys, self._buf_values, self._buf_len = [], [], 0
        self.keys, self.values = _sum_by_key(keys, values)

    def merge_(self, other: SparsePairCounter) -> None:
        """Add another counter's entries (used to combine shards; exact for int64)."""
        if (other.n_rows, other.n_cols) != (self.n_rows, self.n_cols):
            raise ValueError("cannot merge counters over different grids")
        other.consolidate()
        self._buf_keys.append(other.keys)
        self._buf_values.append(other.values.to(self.dtype))
        self.consolidate()

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        self.consolidate()
        return int(self.keys.shape[0])

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns and values of one row (binary search on the sorted keys)."""
        self.consolidate()
        lo = int(torch.searchsorted(self.keys, torch.tensor(r * self.n_cols)))
        hi = int(torch.searchsorted(self.keys, torch.tensor((r + 1) * self.n_cols)))
        return self.keys[lo:hi] % self.n_cols, self.values[lo:hi]

    def nbytes(self) -> int:
        return (
            self.keys.numel() * 8
            + self.values.numel() * self.values.element_size()
            + sum(k.numel() * 8 + v.numel() * v.element_size() for k, v in zip(self._buf_keys, self._buf_values, strict=True))
        )

    # -- state ------------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        self.consolidate()
        return {f"{prefix}.keys": self.keys, f"{prefix}.values": self.values}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self._buf_keys, self._buf_values, self._buf_len = [], [], 0
        self.keys = tensors[f"{prefix}.keys"].to(torch.int64)
        self.values = tensors[f"{prefix}.values"].to(self.dtype)


def _sum_by_key(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if keys.numel() == 0:
        return keys, values
    uniq, inv = torch.unique(keys, return_inverse=True)
    out = torch.zeros(uniq.shape[0], dtype=values.dtype).index_add_(0, inv, values)
    return uniq, out
