"""One site's firings of one batch as entries on the harvest device, from either input form.

Every accumulation works on the entries ``(n, c, values)``: flat position ``n = b * S + s``,
component ``c`` (local to the site) and one float32 value per activation type, sorted by
``(n, c)``. Dense input (``[B, S, C]`` firings and activations) is made sparse on the device by
one ``nonzero``; sparse input (``SparseActivity``) is sorted by ``(n, c)`` (entries may come
in any order) and checked for duplicates. Window lookups read the dense tensors when the site
came dense (so non-firing activations show in examples), else look the entries up by binary
search (activations are zero off firings by the sparse contract); both agree whenever the
sparse contract holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spd_host.adapter import HarvestBatch
from spd_host.errors import HarvestBatchError


@dataclass
class SiteEntries:
    """The firing entries of one site in one batch (all tensors on the harvest device)."""

    n: torch.Tensor  # [E] int64 flat positions
    c: torch.Tensor  # [E] int64 local component
    values: torch.Tensor  # [T, E] float32, one row per activation type
    C: int
    dense_fired: torch.Tensor | None = None  # [N, C] bool when the site came dense
    dense_acts: tuple[torch.Tensor, ...] | None = None  # per type [N, C]
    keys: torch.Tensor | None = None  # sorted n * C + c (sparse sites, for lookups)
    n_pos: int = 0  # positions in the batch
    _by_comp: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted c * n_pos + n, order)
    _alone_w: tuple[int, torch.Tensor] | None = None  # (W, entries alone within W positions)

    @classmethod
    def from_dense(
        cls,
        fired: torch.Tensor,
        activations: dict[str, torch.Tensor],
        act_types: Sequence[str],
        device: torch.device | str | None = None,
    ) -> SiteEntries:
        """Entries of dense ``[..., C]`` firings and activations (one ``nonzero``)."""
        C = int(fired.shape[-1])
        dev = torch.device(device) if device is not None else fired.device
        f = fired.to(dev).reshape(-1, C)
        acts = tuple(activations[t].to(dev).reshape(-1, C) for t in act_types)
        n, c = f.nonzero().unbind(1)
        if acts:
            values = torch.stack([a[n, c].to(torch.float32) for a in acts])
        else:
            values = torch.zeros(0, n.shape[0], dtype=torch.float32, device=dev)
        return cls(n, c, values, C, dense_fired=f, dense_acts=acts, n_pos=int(f.shape[0]))

    @property
    def is_dense(self) -> bool:
        return self.dense_fired is not None

    def lookup(self, rows: torch.Tensor, comps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fired [n, w] bool, acts [n, w, T] float32)`` at flat positions ``rows [n, w]``
        of components ``comps [n]``."""
        T = self.values.shape[0]
        flat = (rows * self.C + comps[:, None]).reshape(-1)
        shape = rows.shape
        if self.dense_fired is not None and self.dense_acts is not None:
            fired = self.dense_fired.reshape(-1).index_select(0, flat).view(shape)
            acts = torch.stack(
                [
                    a.reshape(-1).index_select(0, flat).view(shape).to(torch.float32)
                    for a in self.dense_acts
                ],
                -1,
            )
            return fired, acts
        assert self.keys is not None
        E = self.keys.shape[0]
        if E == 0:
            z = torch.zeros(shape, dtype=torch.bool, device=rows.device)
            return z, torch.zeros((*shape, T), dtype=torch.float32, device=rows.device)
        if shape[1] % 2 == 1 and self.n_pos:
            found_w = self._window_lookup(rows, comps)
            if found_w is not None:
                return found_w
        idx = torch.searchsorted(self.keys, flat).clamp(max=E - 1)
        found = self.keys[idx] == flat
        vals = self.values[:, idx].T  # [n*w, T]
        acts = torch.where(found[:, None], vals, torch.zeros_like(vals))
        return found.view(shape), acts.view(*shape, T)

    def by_component(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sorted c * n_pos + n, order)``: the entries grouped by component, in data order
        within each (computed once per batch and shared by the example plans and lookups)."""
        if self._by_comp is None:
            ck, order = torch.sort(self.c * max(self.n_pos, 1) + self.n)
            self._by_comp = (ck, order)
        return self._by_comp

    def _window_lookup(
        self, rows: torch.Tensor, comps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Windows whose centre ``rows[:, W]`` is a firing of ``comps``, without a search per slot.

        In the entries sorted by ``(component, position)`` a component's firings within ``W``
        positions of one of its firings are among the ``W`` entries before and after it; so one
        search finds each centre and a ``[n, 2W+1]`` gather of its neighbours gives every
        candidate, kept where it is the same component at exactly the slot's position (which
        also rules out the neighbouring sequence). None when a centre is not a firing.
        """
        ck, order = self.by_component()
        E = ck.shape[0]
        n, width = rows.shape
        W = width // 2
        centre = rows[:, W]
        want = comps * self.n_pos + centre
        j = torch.searchsorted(ck, want).clamp(max=E - 1)
        if not bool((ck[j] == want).all()):
            return None
        T = self.values.shape[0]
        dev = rows.device
        fired = torch.zeros(n * width, dtype=torch.bool, device=dev)
        acts = torch.zeros(n * width, T, dtype=torch.float32, device=dev)
        # most centres have no firing of their component within W positions: their window
        # is the centre alone (one write per window instead of a [n, 2W+1] candidate gather)
        alone = self._alone(W).index_select(0, j)
        ev = alone.nonzero().flatten()
        dst = ev * width + W
        fired[dst] = True
        acts[dst] = self.values[:, order.index_select(0, j.index_select(0, ev))].T
        ev = (~alone).nonzero().flatten()
        if ev.numel():
            rows, comps, j, centre = rows[ev], comps[ev], j[ev], centre[ev]
            cand = (j[:, None] + torch.arange(-W, W + 1, device=dev)).clamp(0, E - 1)
            key = ck[cand]
            pos = key % self.n_pos
            slot = pos - centre[:, None] + W
            ok = (torch.div(key, self.n_pos, rounding_mode="floor") == comps[:, None]) & (
                (slot >= 0) & (slot < width)
            )
            slot = slot.clamp(0, width - 1)
            ok &= torch.gather(rows, 1, slot) == pos
            m = ev.shape[0]
            who = ev[:, None].expand(m, width)[ok]
            dst = who * width + slot[ok]
            fired[dst] = True
            acts[dst] = self.values[:, order[cand[ok]]].T
        return fired.view(n, width), acts.view(n, width, T)

    def _alone(self, W: int) -> torch.Tensor:
        """``[E]`` bool, in by-component order: no other firing of the entry's component lies
        within ``W`` flat positions (cached per ``W`` for the batch).

        Entries are sorted by ``(component, position)``, so only the two neighbours in that
        order need a look: any nearer firing of the same component would sit between them.
        """
        if self._alone_w is not None and self._alone_w[0] == W:
            return self._alone_w[1]
        ck = self.by_component()[0]
        comp = torch.div(ck, max(self.n_pos, 1), rounding_mode="floor")
        near = (comp[1:] == comp[:-1]) & (ck[1:] - ck[:-1] <= W)
        alone = torch.ones(ck.shape[0], dtype=torch.bool, device=ck.device)
        alone[1:] &= ~near
        alone[:-1] &= ~near
        self._alone_w = (W, alone)
        return alone


def site_entries(
    batch: HarvestBatch,
    site: str,
    C: int,
    N: int,
    act_types: Sequence[str],
    device: torch.device,
) -> SiteEntries:
    """The site's entries from whichever form the plugin used (see the module docstring)."""
    sp = batch.sparse.get(site) if batch.sparse else None
    if sp is None:
        return SiteEntries.from_dense(
            batch.firings[site], dict(batch.activations[site]), act_types, device
        )
    n = sp.position.to(device, torch.int64)
    c = sp.component.to(device, torch.int64)
    keys = n * C + c
    # entries from ``nonzero()`` (the usual plugin path) come sorted: one pass proves it (and
    # that no entry repeats); otherwise sort, then look for repeats
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        keys, order = torch.sort(keys)
        if bool((keys[1:] == keys[:-1]).any()):
            raise HarvestBatchError(
                f"the sparse activity of site {site!r} lists a (position, component) entry twice",
                hint="this is a bug in the plugin's harvest_fn: each firing is one entry",
            )
        values = torch.stack([sp.values[t].to(device, torch.float32)[order] for t in act_types])
    else:
        values = torch.stack([sp.values[t].to(device, torch.float32) for t in act_types])
    n = torch.div(keys, C, rounding_mode="floor")
    return SiteEntries(n, keys % C, values, C, keys=keys, n_pos=N)
