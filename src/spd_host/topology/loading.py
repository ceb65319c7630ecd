"""Build a weightless model skeleton from a config, for inspecting its topology.

``spd-host topology`` needs the module tree, not the weights: the model is instantiated from
its ``config.json`` on the ``meta`` device (no memory, no download of weights). Hub names are
resolved from the local Hugging Face cache only (``local_files_only``), so the command works
offline and never downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spd_host.errors import SourceNotFoundError, TopologyError


def _demo_dir() -> Path | None:
    try:
        from spd_host.demo import demo_model_dir  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return Path(demo_model_dir())


def load_config(name_or_path: str) -> object:
    """The ``transformers`` config of a local model directory, ``demo``, or a cached Hub name."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if name_or_path == "demo" and not path.exists():
        demo = _demo_dir()
        if demo is None:
            raise SourceNotFoundError("the demo model is not installed in this checkout")
        path = demo
    if path.exists():
        if not (path / "config.json").is_file():
            raise SourceNotFoundError(
                f"{path} has no config.json",
                hint="pass a directory written by save_pretrained (config.json next to the weights)",
            )
        source = str(path)
    else:
        source = name_or_path
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise SourceNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor in the Hugging Face cache",
            hint="pass a local model directory, or download it first "
            f"(`huggingface-cli download {name_or_path} config.json`); spd-host never downloads here",
        ) from err
    except (ValueError, KeyError) as err:
        raise TopologyError(
            f"transformers cannot read the config of {name_or_path!r}: {err}",
            hint="the model type may need a newer transformers, or trust_remote_code (not supported here)",
        ) from err


def skeleton_from_pretrained(name_or_path: str) -> nn.Module:
    """The causal-LM module tree of ``name_or_path`` on the meta device (no weights loaded)."""
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)  # type: ignore[no-any-return]
    except ValueError as err:
        model_type = getattr(config, "model_type", "?")
        raise TopologyError(
            f"{name_or_path!r} (model_type={model_type!r}) is not a causal language model transformers can build",
            hint="spd-host maps decoder-only causal LMs (AutoModelForCausalLM)",
        ) from err
