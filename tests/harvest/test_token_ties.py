"""Token lists: the support floor applies to the top lists too, and exact ties go to the larger
count, then the smaller token id. Checked against a brute force over exact rationals."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from spd_host.harvest.token_stats import token_lists

TOP = 6


def _brute(
    n_ct: dict[int, int], n_t: list[int], n_c: int, N: int, support: int
) -> dict[str, list[int]]:
    """Rank with exact rationals (log is monotone, so PMI ranks as its argument)."""

    def rank(score: dict[int, Fraction], count: dict[int, int], largest: bool) -> list[int]:
        sign = -1 if largest else 1
        order = sorted(score, key=lambda t: (sign * score[t], -count[t], t))
        return order[:TOP]

    co = {t: c for t, c in n_ct.items() if c > 0 and n_t[t] >= support}
    sup = [t for t in range(len(n_t)) if n_t[t] >= support]
    sup_count = {t: n_ct.get(t, 0) for t in sup}
    return {
        "top_pmi": rank({t: Fraction(c * N, n_c * n_t[t]) for t, c in co.items()}, co, True),
        "top_precision": rank({t: Fraction(c, n_t[t]) for t, c in co.items()}, co, True),
        "top_recall": rank({t: Fraction(c, n_c) for t, c in co.items()}, co, True),
        "bottom_pmi": rank(
            {t: Fraction((2 * sup_count[t] + 1) * N, 2 * n_c * n_t[t]) for t in sup},
            sup_count,
            False,
        ),
    }


def _case(seed: int) -> tuple[dict[int, int], list[int], int, int]:
    """Many tokens seen once (all at a firing: precision 1, maximal PMI, exact ties) and
    proportional pairs such as 2/4 and 3/6 (exact ties of different counts)."""
    g = torch.Generator().manual_seed(seed)
    V = 40
    n_t = [0] * V
    n_ct: dict[int, int] = {}
    for t in range(V):
        kind = int(torch.randint(0, 4, (1,), generator=g))
        if kind == 0:  # seen once, at a firing
            n_t[t], n_ct[t] = 1, 1
        elif kind == 1:  # a multiple of 1/2 or of 1/3
            m = int(torch.randint(1, 5, (1,), generator=g))
            d = int(torch.randint(2, 4, (1,), generator=g))
            n_t[t], n_ct[t] = d * m, m
        elif kind == 2:  # common, never at a firing
            n_t[t] = int(torch.randint(3, 30, (1,), generator=g))
        else:
            n_t[t] = int(torch.randint(1, 30, (1,), generator=g))
            n_ct[t] = int(torch.randint(0, n_t[t] + 1, (1,), generator=g))
    n_c = max(sum(n_ct.values()), 1)
    return n_ct, n_t, n_c, sum(n_t) + 7


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("support", [1, 2, 3])
def test_token_lists_match_brute_force_with_ties(seed: int, support: int) -> None:
    n_ct, n_t, n_c, N = _case(seed)
    row = sorted(t for t, c in n_ct.items() if c > 0)
    got = token_lists(
        torch.tensor(row, dtype=torch.int64),
        torch.tensor([n_ct[t] for t in row], dtype=torch.int64),
        torch.tensor(n_t, dtype=torch.int64),
        float(n_c),
        N,
        top=TOP,
        min_support=support,
    )
    exp = _brute(n_ct, n_t, n_c, N, support)
    for name, tokens in exp.items():
        assert [s.token for s in got[name]] == tokens, (name, seed, support)


def test_tokens_seen_once_do_not_fill_the_top_lists() -> None:
    """Hand-worked: tokens 0-4 seen once each, at a firing; token 7 seen 10 times, 6 of them
    at a firing; token 8 seen 4 times, 3 at a firing; floor 2."""
    n_t = [1, 1, 1, 1, 1, 0, 0, 10, 4]
    row = [0, 1, 2, 3, 4, 7, 8]
    counts = [1, 1, 1, 1, 1, 6, 3]
    got = token_lists(
        torch.tensor(row),
        torch.tensor(counts),
        torch.tensor(n_t),
        11.0,
        19,
        top=3,
        min_support=2,
    )
    assert [s.token for s in got["top_precision"]] == [8, 7]  # 3/4 > 6/10
    assert [s.token for s in got["top_pmi"]] == [8, 7]
    assert [s.token for s in got["top_recall"]] == [7, 8]  # 6/11 > 3/11


def test_an_exact_tie_goes_to_the_larger_count() -> None:
    """2/4 and 3/6 are the same precision and PMI; the token with 3 firings ranks first even
    though its id is larger."""
    got = token_lists(
        torch.tensor([1, 2]),
        torch.tensor([2, 3]),
        torch.tensor([0, 4, 6]),
        5.0,
        10,
        top=2,
        min_support=1,
    )
    assert [s.token for s in got["top_precision"]] == [2, 1]
    assert [s.token for s in got["top_pmi"]] == [2, 1]
    assert got["top_pmi"][0].value == got["top_pmi"][1].value  # an exact tie in float64 too
