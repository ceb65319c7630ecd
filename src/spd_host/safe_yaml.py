"""YAML from a downloaded decomposition, loaded without letting it exhaust memory.

``yaml.safe_load`` refuses arbitrary objects, but not an alias bomb: nine anchors of nine
aliases each are a 1 KB file that expands to 9**9 strings the moment anything walks the
result (a JSON dump of the config, a validator, a copy). Aliases themselves are legitimate
(``yaml.dump`` writes them for shared objects), so they are allowed; what is refused is a
document whose alias-expanded size passes :data:`MAX_NODES`, counted on the composed node
graph (shared nodes counted once per reference, in linear time) before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spd_host.errors import FormatError

MAX_NODES = 1_000_000


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a cycle (recursive alias) counts once instead of recursing forever
    size = 1
    value = node.value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, tuple):  # mapping: (key node, value node)
                size += _expanded_size(item[0], memo) + _expanded_size(item[1], memo)
            else:
                size += _expanded_size(item, memo)
            if size > MAX_NODES:
                break
    memo[key] = size
    return size


def load_yaml(text: str, where: str | Path) -> Any:
    """``yaml.safe_load(text)``, refusing alias bombs with a ``FormatError`` naming ``where``."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as err:
            raise FormatError(f"{where}: not valid YAML ({err})") from None
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise FormatError(
                f"{where}: the YAML expands to more than {MAX_NODES:,} values through its "
                "aliases (an alias bomb); refusing to load it",
                hint="a decomposition's config is a few hundred values; check where this file came from",
            )
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as err:
            raise FormatError(f"{where}: not valid YAML ({err})") from None
    finally:
        loader.dispose()
