"""The library's public surface (``spd_host.__all__``): every name resolves, is documented and
type-hinted, matches the type checkers' view, and the cheap names import no torch, transformers
or method plugin."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import spd_host

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "spd_adapters")
# names whose module needs torch at import time (they work on models or tensors)
NEEDS_TORCH = {
    "ArchitectureSpec",
    "HarvestRepo",
    "TokenDatasetSpec",
    "TransformerTopology",
    "iter_token_batches",
    "load_base_model",
    "load_tokenizer",
    "run_harvest",
    "topology_of",
}
NOT_CALLABLE = {"__version__", "DEMO_MODEL_NAME"}


def _names() -> list[str]:
    return [n for n in spd_host.__all__ if n != "__version__"]


def test_every_public_name_resolves_and_is_listed_in_dir() -> None:
    assert sorted(dir(spd_host)) == sorted(spd_host.__all__)
    assert sorted(spd_host.__all__) == sorted({*spd_host._LAZY, "__version__"})  # type: ignore[attr-defined]
    for name in spd_host.__all__:
        assert getattr(spd_host, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        spd_host.nope  # noqa: B018


def test_the_surface_covers_the_pipeline() -> None:
    for name in (
        "load_adapter",
        "topology_of",
        "run_harvest",
        "HarvestRepo",
        "run_autointerp",
        "load_labels",
        "run_suite",
        "eval_suites",
    ):
        assert name in spd_host.__all__


def test_type_checking_imports_match_the_lazy_table() -> None:
    """What mypy/IDEs see (the ``if TYPE_CHECKING:`` imports) is exactly what runs."""
    tree = ast.parse((ROOT / "src" / "spd_host" / "__init__.py").read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    lazy = spd_host._LAZY  # type: ignore[attr-defined]
    assert sorted(seen) == sorted(lazy)
    for name, module in seen.items():
        assert getattr(spd_host, name) is getattr(sys.modules[module or ""], name), name


@pytest.mark.parametrize("name", _names())
def test_public_name_is_documented_and_type_hinted(name: str) -> None:
    obj = getattr(spd_host, name)
    if name in NOT_CALLABLE or not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return  # constants and typing aliases (HarvestFn) are documented where defined
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"spd_host.{name} has no docstring"
    if inspect.isclass(obj):
        if hasattr(obj, "model_fields"):  # pydantic: the fields are the typed surface
            for field, info in obj.model_fields.items():
                assert info.annotation is not None, f"{name}.{field}"
            return
        members = [
            (m, f)
            for m, f in vars(obj).items()
            if inspect.isfunction(f)
            and (not m.startswith("_") or m == "__init__")
            and f.__module__ == obj.__module__  # not typing.Protocol's generated __init__
        ]
    else:
        members = [(name, obj)]
    for member, fn in members:
        # annotations as written (strings under `from __future__ import annotations`): present,
        # not resolved, since some name types imported only for type checking
        sig = inspect.signature(fn)
        missing = [
            p.name
            for p in sig.parameters.values()
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
        ]
        assert not missing, f"spd_host.{name}.{member}: no type hints for {missing}"
        assert sig.return_annotation is not inspect.Signature.empty, (
            f"spd_host.{name}.{member}: no return type"
        )


CHECK = """
import json, sys
import spd_host
for name in {names!r}:
    getattr(spd_host, name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps(heavy))
"""


def _imported_after_touching(names: list[str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(names=names, heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    return list(json.loads(out.stdout.splitlines()[-1]))


def test_import_and_cheap_names_load_no_torch_transformers_or_plugins() -> None:
    cheap = [n for n in _names() if n not in NEEDS_TORCH]
    assert "load_adapter" in cheap and "HarvestConfig" in cheap and "run_suite" in cheap
    assert _imported_after_touching([]) == []
    assert _imported_after_touching(cheap) == []


def test_the_check_sees_torch_when_a_heavy_name_is_touched() -> None:
    """The reference for the test above: the same check does report torch."""
    assert "torch" in _imported_after_touching(["HarvestRepo"])
