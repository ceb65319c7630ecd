"""Option values checked before any work starts, each failure one line with a hint.

The config models (``HarvestConfig``, ``AutointerpConfig``, the eval suites') are the single
source of what a valid value is; :func:`build` turns their ``ValidationError`` into a
``ConfigError`` that names the *flag* the user typed, not the field. The other checks here are
about the machine rather than the model: is ``--out`` a directory we can write, is a float
finite.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from spd_host.errors import ConfigError, SpdHostError
from spd_host.safe_text import printable

M = TypeVar("M", bound=BaseModel)

# fields whose flag is not simply ``--`` + the field name with dashes
FLAG_OF_FIELD: Mapping[str, str] = {
    "cost_cap_usd": "--cost-cap",
    "timeout_s": "--timeout",
    "input_price_per_mtok": "--input-price",
    "output_price_per_mtok": "--output-price",
    "max_retry_after_s": "--max-retry-after",
    "dataset_column": "--text-column",
    "text_column": "--text-column",
    "strategy_options": "--n-top/--n-quantiles/--per-quantile",
}


def flag_for(field: str) -> str:
    return FLAG_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def build(model: type[M], values: Mapping[str, Any], *, drop_none: bool = False) -> M:
    """``model(**values)``, or a one-line ``ConfigError`` naming the first bad flag."""
    given = {k: v for k, v in values.items() if v is not None} if drop_none else dict(values)
    try:
        return model(**given)
    except ValidationError as err:
        raise option_error(err) from None


def option_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    field = loc[0] if loc else ""
    value = first.get("input")
    msg = str(first.get("msg", "invalid value"))
    if isinstance(value, float) and not math.isfinite(value):
        msg = "must be a finite number"
    shown = printable(repr(value) if isinstance(value, str) else str(value))
    more = len(err.errors()) - 1
    return ConfigError(
        f"invalid {flag_for(field)} {shown}: {msg[0].lower() + msg[1:]}"
        + (f" (and {more} more invalid option{'s' * (more > 1)})" if more else ""),
        hint=f"run the command with -h to see what {flag_for(field)} accepts",
    )


def finite(flag: str, value: float | None) -> None:
    """NaN or infinity is never a meaningful threshold, price or cap."""
    if value is not None and not math.isfinite(value):
        raise ConfigError(
            f"invalid {flag} {value}: must be a finite number", hint=f"pass a number to {flag}"
        )


def expand(raw: str | Path, flag: str) -> Path:
    """``~`` expanded, or a clear error for ``~nosuchuser``."""
    try:
        return Path(raw).expanduser()
    except RuntimeError:
        raise ConfigError(
            f"invalid {flag} {printable(str(raw))}: the user in its '~' is unknown on this machine",
            hint="give an absolute path or one starting with '~/'",
        ) from None


def writable_dir(raw: Path | None, flag: str = "--out") -> Path | None:
    """``raw`` as a directory this process can create or write into, checked up front.

    Refused: an existing file (``/dev/null`` included), a directory without write
    permission, a path whose nearest existing parent is not a writable directory. Permission
    bits are not the whole story: root passes every ``os.access`` check, yet cannot create a
    directory under ``/proc`` (ENOENT) or ``/sys`` (EPERM), nor on a read-only mount (EROFS).
    So the nearest existing directory is also probed by creating (and removing) an empty
    directory in it: what the run would do first, done before any work.
    """
    if raw is None:
        return None
    path = expand(raw, flag)
    shown = printable(str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{flag} {shown} exists and is not a directory",
            hint=f"{flag} names the directory the results go into; pick a new or existing directory",
        )
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    hint = f"choose a {flag} under a directory you can write to"
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {shown} cannot be written ({printable(str(probe))} is not a writable directory)",
            hint=hint,
        )
    try:
        Path(tempfile.mkdtemp(prefix=".spd-host-write-probe-", dir=probe)).rmdir()
    except OSError as err:
        raise ConfigError(
            f"{flag} {shown} cannot be written (creating a directory in {printable(str(probe))} "
            f"failed: {err.strerror or err})",
            hint=hint,
        ) from None
    return path


def check_seq_len_fits(ids: list[str], seq_len: int | None) -> None:
    """Refuse up front a sequence length (given, or each decomposition's recorded one) longer
    than a base model's positions, instead of an IndexError deep in the forward pass."""
    from spd_host.data import check_seq_len
    from spd_host.plugins import get_host
    from spd_host.topology.loading import load_config

    host = get_host()
    for raw in ids:
        adapter = host.load_adapter(raw)
        n = seq_len or adapter.defaults.seq_len
        if not n:
            continue
        try:
            config = load_config(adapter.base_model_name)
        except Exception:  # not reachable offline: the forward pass will tell
            continue
        try:
            check_seq_len(int(n), config)
        except SpdHostError as err:
            flag = "--seq-len" if seq_len else f"the seq_len {raw} records"
            raise ConfigError(f"{flag}: {err.message} ({raw})", hint=err.hint or None) from None
