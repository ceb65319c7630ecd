"""Plugin discovery through real entry points, load-error isolation and the env-var switch.

Third-party plugins are real distributions: a ``*.dist-info`` directory with
``entry_points.txt`` next to a module, put on ``sys.path`` exactly as pip would install them.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spd_host.adapter import DecompositionDefaults, HarvestBatch, HarvestOptions, MethodInfo, Site
from spd_host.cli.app import app
from spd_host.errors import DecompositionIdError, HarvestBatchError, PluginError
from spd_host.hookspecs import hookimpl
from spd_host.plugins import BUILTIN_PLUGINS, PluginHost, get_host, reset_host, temporary_plugins

TOY_PLUGIN = """
from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl

@hookimpl
def register_methods(register):
    register(MethodInfo(name="{method}", description="A toy method for tests."))
"""


def install_fake_distribution(
    root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]
) -> None:
    """Write modules plus a dist-info with entry_points.txt, the layout pip leaves behind."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = ["[spd_host]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    install_fake_distribution(
        tmp_path,
        "spd-host-toys",
        {
            "toy_good": TOY_PLUGIN.format(method="toy"),
            "toy_broken_import": "raise ImportError('missing optional dependency foo')\n",
            "toy_broken_register": textwrap.dedent(
                """
                from spd_host.hookspecs import hookimpl

                @hookimpl
                def register_methods(register):
                    raise RuntimeError("boom in register")
                """
            ),
            "toy_duplicate": TOY_PLUGIN.format(method="transcoder"),
        },
        {
            "toy_good": "toy_good",
            "toy_broken_import": "toy_broken_import",
            "toy_broken_register": "toy_broken_register",
            "toy_duplicate": "toy_duplicate",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("toy_good", "toy_broken_import", "toy_broken_register", "toy_duplicate"):
        sys.modules.pop(mod, None)
    reset_host()
    return tmp_path


def test_first_party_methods_load_as_entry_points() -> None:
    host = get_host()
    assert {"spd", "transcoder", "clt"} <= set(host.method_names)
    for name in ("spd", "transcoder", "clt"):
        record = host.records[name]
        assert record.first_party and not record.errors
        assert record.distribution == "spd-host" and record.version
        assert "register_methods" in record.hooks


def test_third_party_plugins_and_isolated_failures(third_party: Path) -> None:
    host = get_host()
    assert "toy" in host.method_names
    assert host.records["toy_good"].version == "1.2.3"
    assert not host.records["toy_good"].first_party
    assert "missing optional dependency foo" in host.records["toy_broken_import"].errors[0]
    assert "boom in register" in host.records["toy_broken_register"].errors[0]
    dup_errors = host.records["toy_duplicate"].errors
    assert dup_errors and "already registered by plugin 'transcoder'" in dup_errors[0]
    # the broken plugins took nothing else down
    assert {"spd", "transcoder", "clt", "toy"} <= set(host.method_names)


def test_env_var_restricts_third_party(third_party: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPD_HOST_LOAD_PLUGINS", "toy_good")
    reset_host()
    host = get_host()
    builtins = {name for name, _ in BUILTIN_PLUGINS}  # the host's own plugin modules always load
    assert set(host.records) == {"spd", "transcoder", "clt", "toy_good", *builtins}
    monkeypatch.setenv("SPD_HOST_LOAD_PLUGINS", "")
    reset_host()
    assert set(get_host().records) == {"spd", "transcoder", "clt", *builtins}
    monkeypatch.setenv("SPD_HOST_LOAD_PLUGINS", "spd-host-toys")  # by distribution name
    reset_host()
    assert "toy_broken_import" in get_host().records


def test_cli_plugins_json_reports_errors(third_party: Path) -> None:
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    by_name = {p["name"]: p for p in doc["plugins"]}
    assert by_name["spd"]["loaded"] and by_name["spd"]["methods"] == ["spd"]
    assert not by_name["toy_broken_import"]["loaded"]
    assert "toy" in doc["methods"]


class ToyAdapter:
    """A complete in-memory adapter: two sites, one activation type, a fixed vocabulary."""

    method = MethodInfo(name="toy2", description="toy")
    sites = (
        Site(name="a", n_components=3, reads_from="0.mlp_in", writes_to=("0.mlp_out",)),
        Site(name="b", n_components=2, reads_from="1.mlp_in", writes_to=("1.mlp_out",)),
    )
    activation_types = ("activation",)
    base_model_name = "none"
    defaults = DecompositionDefaults(seq_len=4)

    def __init__(self, decomposition_id: str, broken: str | None = None) -> None:
        self.decomposition_id = decomposition_id
        self.broken = broken

    def load_base_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def load_tokenizer(self) -> None:
        return None

    def batch(self, tokens: torch.Tensor) -> HarvestBatch:
        B, S = tokens.shape
        acts = {s.name: torch.relu(torch.randn(B, S, s.n_components)) for s in self.sites}
        firings = {k: v > 0 for k, v in acts.items()}
        activations = {k: {"activation": v} for k, v in acts.items()}
        logits = torch.zeros(B, S, 7)
        if self.broken == "shape":
            firings["b"] = firings["b"][..., :1]
        elif self.broken == "nan":
            activations["a"]["activation"][0, 0, 0] = float("nan")
        elif self.broken == "dtype":
            firings["a"] = firings["a"].float()
        elif self.broken == "site":
            firings.pop("b")
        elif self.broken == "raise":
            raise ValueError("kaboom")
        return HarvestBatch(
            tokens=tokens, firings=firings, activations=activations, next_token_logits=logits
        )


class ToyPlugin:
    @hookimpl
    def register_methods(self, register):  # type: ignore[no-untyped-def]
        register(MethodInfo(name="toy2", description="toy"))

    @hookimpl
    def load_decomposition(self, decomposition_id):  # type: ignore[no-untyped-def]
        path = decomposition_id.path
        return ToyAdapter(
            decomposition_id.normalized, broken=path.name if path is not None else None
        )

    @hookimpl
    def harvest_fn(self, adapter, options):  # type: ignore[no-untyped-def]
        return adapter.batch


def test_load_and_validated_harvest_fn(tmp_path: Path) -> None:
    with temporary_plugins(("toy2_plugin", ToyPlugin())) as host:
        adapter = host.load_adapter("toy2:demo")
        assert adapter.decomposition_id == "toy2:demo"
        fn = host.harvest_fn(adapter, HarvestOptions())
        batch = fn(torch.zeros(2, 4, dtype=torch.long))
        assert batch.firings["a"].shape == (2, 4, 3)


@pytest.mark.parametrize(
    ("broken", "fragment"),
    [
        ("shape", "firings['b'] must be [2, 4, 2]"),
        ("nan", "contains NaN or inf"),
        ("dtype", "must be bool"),
        ("site", "firings has sites ['a'], expected ['a', 'b']"),
    ],
)
def test_invalid_batches_name_the_plugin(tmp_path: Path, broken: str, fragment: str) -> None:
    (tmp_path / broken).mkdir()
    with temporary_plugins(("toy2_plugin", ToyPlugin())) as host:
        adapter = host.load_adapter(f"toy2:{tmp_path / broken}")
        fn = host.harvest_fn(adapter)
        with pytest.raises(HarvestBatchError) as info:
            fn(torch.zeros(2, 4, dtype=torch.long))
    assert "plugin 'toy2_plugin'" in str(info.value)
    assert fragment in str(info.value)


def test_harvest_fn_exception_is_wrapped_with_plugin_name(tmp_path: Path) -> None:
    (tmp_path / "raise").mkdir()
    with temporary_plugins(("toy2_plugin", ToyPlugin())) as host:
        fn = host.harvest_fn(host.load_adapter(f"toy2:{tmp_path / 'raise'}"))
        with pytest.raises(PluginError, match=r"plugin .toy2_plugin. harvest_fn failed.*kaboom"):
            fn(torch.zeros(1, 4, dtype=torch.long))


def test_method_without_loader_is_a_plugin_error() -> None:
    class OnlyRegisters:
        @hookimpl
        def register_methods(self, register):  # type: ignore[no-untyped-def]
            register(MethodInfo(name="hollow", description="registers but cannot load"))

    with temporary_plugins(("hollow", OnlyRegisters()), entry_points=False) as host:
        with pytest.raises(PluginError, match="returned no adapter"):
            host.load_adapter("hollow:demo")
        with pytest.raises(DecompositionIdError, match="unknown method 'spd'"):
            host.load_adapter("spd:demo")


def test_cli_unknown_method_exits_nonzero_without_traceback() -> None:
    result = CliRunner().invoke(app, ["info", "nosuch:demo"])
    assert result.exit_code == 2
    assert "unknown method 'nosuch'" in result.output
    assert "Traceback" not in result.output


def test_plugin_host_without_entry_points_is_empty() -> None:
    assert PluginHost(entry_points=False).method_names == []
