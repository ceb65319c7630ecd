"""Run a suite on one decomposition ID: load the adapter, validate the config, save the result."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from spd_host.evals.registry import get_suite
from spd_host.evals.results import EvalResult, save_result


def run_suite(
    suite_name: str,
    decomposition_id: str,
    config: BaseModel | None = None,
    *,
    save: bool = True,
    **options: Any,
) -> EvalResult:
    """Run ``suite_name`` on ``decomposition_id`` (config from ``config`` or ``**options``)."""
    from spd_host.plugins import get_host

    host = get_host()
    suite = get_suite(suite_name, host)
    if config is None:
        config = suite.make_config(**options)
    elif not isinstance(config, suite.config_model):
        config = suite.make_config(**config.model_dump())
    did = host.parse_id(decomposition_id)
    adapter = host.load_adapter(did)
    result = suite.run(adapter, config)
    if save:
        save_result(result, did.storage_key)
    return result


def common_data_options(ids: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Compare on the same footing: with several IDs, one dataset and sequence length for all.

    Options given explicitly win; otherwise the first decomposition (in the order given) that
    records a dataset / seq_len sets it for every ID (cheap: metadata only, no weights).
    """
    if len(ids) < 2 or (options.get("dataset") and options.get("seq_len")):
        return options
    from spd_host.plugins import get_host

    out = dict(options)
    host = get_host()
    for raw in ids:
        defaults = host.load_adapter(raw).defaults
        if out.get("dataset") is None and defaults.dataset:
            out["dataset"] = defaults.dataset
            if out.get("text_column") is None and defaults.dataset_column:
                out["text_column"] = defaults.dataset_column
        if out.get("seq_len") is None and defaults.seq_len:
            out["seq_len"] = defaults.seq_len
    return out
