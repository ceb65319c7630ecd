"""Eval suites: compare any decompositions on the same footing.

Public API::

    from spd_host.evals import eval_suites, get_suite, run_suite, EvalSuite, EvalResult
    result = run_suite("fidelity", "transcoder:demo", n_tokens=8192)

Suites come from the ``register_eval_suites`` hook (the host's own through the built-in plugin
:mod:`spd_host.evals.plugin`); results are versioned pydantic models saved as JSON under
``results_dir(storage_key)/evals/<suite>.json``.
"""

from __future__ import annotations

from spd_host.evals.registry import EvalSuite, eval_suites, get_suite
from spd_host.evals.results import EvalResult, load_result, result_path, save_result
from spd_host.evals.runner import run_suite

__all__ = [
    "EvalResult",
    "EvalSuite",
    "eval_suites",
    "get_suite",
    "load_result",
    "result_path",
    "run_suite",
    "save_result",
]
