"""Rate limiter and pause schedules (fake clock), backoff, the cost gate, provider registry."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.limits import CostBudget, RateLimiter, SharedPause
from spd_host.autointerp.providers.base import Provider
from spd_host.autointerp.providers.offline import OfflineBaselineClient
from spd_host.autointerp.registry import get_provider, list_providers, list_strategies
from spd_host.autointerp.runner import backoff_delay
from spd_host.errors import ConfigError, PluginError
from spd_host.hookspecs import hookimpl
from spd_host.plugins import temporary_plugins


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_rate_limiter_spaces_request_starts() -> None:
    t = FakeTime()
    limiter = RateLimiter(120, clock=t.clock, sleep=t.sleep)  # one start per 0.5 s
    starts = []

    async def main() -> None:
        for _ in range(5):
            await limiter.acquire()
            starts.append(t.now)

    asyncio.run(main())
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_shared_pause_extends_and_waits() -> None:
    t = FakeTime()
    pause = SharedPause(clock=t.clock, sleep=t.sleep)
    pause.pause_for(2.0)
    pause.pause_for(1.0)  # a shorter request does not shorten the pause
    asyncio.run(pause.wait())
    assert t.now == 2.0 and pause.remaining == 0


def test_cost_budget_counts_reservations() -> None:
    b = CostBudget(10.0)
    assert b.reserve(4) and b.reserve(4) and not b.reserve(4) and b.exhausted
    b.settle(4, 1.0)
    assert b.spent == 1.0 and b.reserved == 4 and b.reserve(4)
    assert CostBudget(None).reserve(1e9)


def test_backoff_is_exponential_jittered_capped_and_honours_retry_after() -> None:
    cfg = AutointerpConfig(backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(0)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        d = backoff_delay(attempt, cfg, None, rng)
        assert step / 2 <= d <= step
    assert backoff_delay(1, cfg, 30.0, rng) == 30.0


def test_builtin_providers_and_strategies_are_registered() -> None:
    assert {"offline", "anthropic", "openai", "openrouter", "openai-compatible"} <= set(
        list_providers()
    )
    assert {"compact_skeptical", "dual_view"} <= set(list_strategies())


def test_default_provider_is_offline_without_keys_and_keyed_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert get_provider(None).name == "offline" and get_provider(None).baseline
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert get_provider(None).name == "openai"


def test_missing_key_is_a_clear_error() -> None:
    from spd_host.autointerp.providers.base import ClientOptions

    p = get_provider("anthropic")
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        p.make_client(ClientOptions(model="claude-haiku-4-5"))


class _ThirdParty:
    """A third-party plugin replacing the built-in offline provider and adding one."""

    @hookimpl
    def register_llm_providers(self, register: Any) -> None:
        for name in ("offline", "acme"):
            register(
                Provider(
                    name=name,
                    description="third party",
                    make_client=OfflineBaselineClient,
                    default_model="m",
                    api_key_env=None,
                    key_required=False,
                )
            )


def test_plugins_can_add_and_override_providers() -> None:
    with temporary_plugins(("thirdparty", _ThirdParty()), entry_points=False) as host:
        found = list_providers(host)
        assert found["offline"].description == "third party" and "acme" in found
        assert found["anthropic"].name == "anthropic"  # built-ins still there
        assert host.records["spd_host.autointerp"].first_party


class _Broken:
    @hookimpl
    def register_autointerp_strategies(self, register: Any) -> None:
        register("not a strategy")


def test_wrong_registered_type_names_the_plugin() -> None:
    with (
        temporary_plugins(("broken", _Broken()), entry_points=False) as host,
        pytest.raises(PluginError, match="'broken'"),
    ):
        list_strategies(host)
