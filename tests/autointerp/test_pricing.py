"""The price list (one data file), its use by the providers and the cost cap, and the cost
projection in docs/autointerp.md. Expected figures are worked by hand from the listed prices."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.pricing import (
    PriceEntry,
    parse_price_pair,
    parse_price_table,
    price_table,
)
from spd_host.autointerp.pricing_report import (
    BEGIN,
    END,
    LabelProfile,
    cost_per_label,
    cost_table_markdown,
)
from spd_host.autointerp.providers.base import Pricing
from spd_host.autointerp.registry import get_provider
from spd_host.autointerp.runner import resolve_pricing
from spd_host.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "src/spd_host/autointerp/pricing.yaml"


def test_every_entry_has_a_date_a_source_and_sane_prices() -> None:
    raw = yaml.safe_load(YAML.read_text())
    table = price_table()
    assert set(table) >= {"anthropic", "openai", "gemini", "openrouter"}
    for provider, models in raw.items():
        for model, entry in models.items():
            assert isinstance(entry["as_of"], dt.date), (provider, model)
            assert entry["source"].startswith("https://"), (provider, model)
            parsed = table[provider][model]
            # cache reads are a discount, writes a premium, output dearer than input
            assert parsed.cached_input is None or parsed.cached_input < parsed.input
            assert parsed.cache_write is None or parsed.cache_write > parsed.input
            assert parsed.output > parsed.input


def test_providers_take_their_prices_from_the_file() -> None:
    raw = yaml.safe_load(YAML.read_text())
    for name in ("anthropic", "openai", "openrouter", "gemini"):
        provider = get_provider(name)
        assert set(provider.pricing) == set(raw[name]), name
        for model, entry in raw[name].items():
            p = provider.pricing[model]
            assert (p.input_per_mtok, p.output_per_mtok) == (entry["input"], entry["output"])
            assert p.cached_input_per_mtok == entry.get("cached_input")


def test_a_bad_entry_is_a_clear_error_naming_it() -> None:
    doc = {
        "openai": {"gpt-x": {"input": 1.0, "output": -2.0, "as_of": "2026-01-01", "source": "s"}}
    }
    with pytest.raises(ConfigError, match=r"prices\.yaml: openai/gpt-x: output"):
        parse_price_table(doc, "prices.yaml")
    with pytest.raises(ConfigError, match="as_of"):
        parse_price_table({"openai": {"m": {"input": 1, "output": 2, "source": "s"}}}, "f")


def test_cached_tokens_are_billed_at_their_own_price() -> None:
    # 1,000 input tokens of which 600 read from the cache and 100 written to it, 50 output
    p = Pricing(
        input_per_mtok=3.0,
        output_per_mtok=15.0,
        cached_input_per_mtok=0.3,
        cache_write_per_mtok=3.75,
    )
    want = (300 * 3.0 + 600 * 0.3 + 100 * 3.75 + 50 * 15.0) / 1e6
    assert p.cost(1000, 50, cache_read_tokens=600, cache_write_tokens=100) == pytest.approx(want)
    # a price given by hand has no cached price: cached tokens count in full (the cap's safe side)
    hand = Pricing(input_per_mtok=3.0, output_per_mtok=15.0)
    assert hand.cost(1000, 50, cache_read_tokens=600) == pytest.approx((1000 * 3 + 50 * 15) / 1e6)


def test_batch_prices_take_the_discount_off_every_token() -> None:
    e = PriceEntry(
        input=2.0, output=8.0, cached_input=0.5, batch_discount=0.5, as_of=dt.date(2026, 1, 1),
        source="s",
    )  # fmt: skip
    b = e.pricing(batch=True)
    assert (b.input_per_mtok, b.output_per_mtok, b.cached_input_per_mtok) == (1.0, 4.0, 0.25)


def test_unknown_model_is_refused_until_a_price_is_given() -> None:
    provider = get_provider("anthropic")
    with pytest.raises(ConfigError, match="no price known for model 'claude-next'") as info:
        resolve_pricing(provider, "claude-next", AutointerpConfig(provider="anthropic"))
    assert "--price-per-mtok" in (info.value.hint or "")
    given = AutointerpConfig(provider="anthropic", input_price_per_mtok=2, output_price_per_mtok=9)
    p = resolve_pricing(provider, "claude-next", given)
    assert (p.input_per_mtok, p.output_per_mtok) == (2, 9)


@pytest.mark.parametrize(("text", "want"), [("0.3,2.5", (0.3, 2.5)), (" 1 , 4 ", (1.0, 4.0))])
def test_price_pair_parses(text: str, want: tuple[float, float]) -> None:
    assert parse_price_pair(text) == want


@pytest.mark.parametrize("text", ["0.3", "a,b", "1,2,3", "-1,2", "inf,1"])
def test_price_pair_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--price-per-mtok"):
        parse_price_pair(text)


def test_cost_per_label_by_mode_worked_by_hand() -> None:
    e = price_table()["openai"]["gpt-4.1-mini"]  # 0.40 in, 0.10 cached, 1.60 out, batch 50%
    prof = LabelProfile(input_tokens=2500, shared_prefix_tokens=1200, output_tokens=150)
    sync = (2500 * 0.40 + 150 * 1.60) / 1e6
    cached = (1300 * 0.40 + 1200 * 0.10 + 150 * 1.60) / 1e6
    assert cost_per_label(e, prof, "sync") == pytest.approx(sync)
    assert cost_per_label(e, prof, "cached") == pytest.approx(cached)
    assert cost_per_label(e, prof, "batch") == pytest.approx(sync / 2)
    assert cost_per_label(e, prof, "batch+cached") == pytest.approx(cached / 2)
    # OpenAI caches the shared prefix of any prompt of 1,024+ tokens, however short the prefix
    short = prof.model_copy(update={"shared_prefix_tokens": 500})
    assert cost_per_label(e, short, "cached") == pytest.approx((2000 * 0.4 + 500 * 0.1 + 240) / 1e6)
    tiny_prompt = LabelProfile(input_tokens=1000, shared_prefix_tokens=800, output_tokens=150)
    assert cost_per_label(e, tiny_prompt, "cached") == pytest.approx((1000 * 0.4 + 240) / 1e6)
    # Anthropic counts the prefix itself: Sonnet 4.5 caches 1,024+ prefix tokens, not 1,023
    sonnet = price_table()["anthropic"]["claude-sonnet-4-5"]  # 3.00 in, 0.30 cached, 15.00 out
    for n, cached in ((1023, 0), (1024, 1024)):
        p = prof.model_copy(update={"shared_prefix_tokens": n})
        want = ((2500 - cached) * 3.0 + cached * 0.30 + 150 * 15.0) / 1e6
        assert cost_per_label(sonnet, p, "cached") == pytest.approx(want)


def test_the_docs_cost_table_is_the_generated_one() -> None:
    doc = (ROOT / "docs/autointerp.md").read_text()
    assert BEGIN in doc and END in doc, "docs/autointerp.md lost its generated cost table"
    block = doc[doc.index(BEGIN) : doc.index(END) + len(END)]
    assert block == cost_table_markdown(), (
        "docs/autointerp.md's cost table is stale: paste the output of "
        "`python -m spd_host.autointerp.pricing_report`"
    )
    # and a cell checked by hand: gpt-4.1-mini, sync, 100k labels = $124
    assert "| openai | `gpt-4.1-mini` | $124 / $1,240 |" in block
