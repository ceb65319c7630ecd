"""Load base models and tokenizers by one name: ``"demo"``, a local directory, or a Hub name.

Adapters, harvest and evals all load the model a decomposition was trained on through these two
functions, so that "demo" means the bundled model everywhere and a Hub name goes through the
normal Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), which also makes it work offline
(``HF_HUB_OFFLINE=1``) once the model has been downloaded. A name that is neither a local directory
nor in the cache (when offline) raises ``SourceNotFoundError`` with the fix.

Models load in float32 by default: decompositions store float32 weights, and mixing a bfloat16 base
model with them would fail (or silently lose precision) in every adapter. Pass ``dtype`` to choose.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spd_host.demo import DEMO_MODEL_NAME, demo_model_dir
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.paths import expand_user

# TransformerLens model names (as decompositions trained with TransformerLens record them) and
# the Hugging Face Hub names they load from.
TL_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "gemma-2b": "google/gemma-2b",
    "gemma-7b": "google/gemma-7b",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "tiny-stories-1M": "roneneldan/TinyStories-1M",
    "tiny-stories-33M": "roneneldan/TinyStories-33M",
    **{
        f"pythia-{size}{suffix}": f"EleutherAI/pythia-{size}{suffix}"
        for size in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
        for suffix in ("", "-deduped")
    },
}

_OVERRIDES: dict[str | None, str] = {}


def override_base_model(replacement: str | None, original: str | None = None) -> None:
    """Load ``replacement`` (a Hub name or a local directory) wherever ``original`` is asked
    for, or wherever any base model is asked for when ``original`` is None (the CLI's
    ``--base-model``, one decomposition per process). ``replacement=None`` removes it.

    Why here: every adapter loads its base model and tokenizer through this module, so one
    override serves every method without a plugin knowing about it.
    """
    if replacement is None:
        _OVERRIDES.pop(original, None)
    else:
        _OVERRIDES[original] = replacement


def resolve_model_source(name_or_path: str) -> str:
    """What to hand to ``from_pretrained``: the demo directory, a local directory, or the Hub name.

    A ``--base-model`` override wins; a TransformerLens name (``gpt2-small``,
    ``pythia-70m-deduped``) maps to its Hub name. Raises ``SourceNotFoundError`` for a
    path-like name that does not exist, and ``FormatError`` for a local directory without
    ``config.json``/tokenizer files.
    """
    name_or_path = _OVERRIDES.get(name_or_path, _OVERRIDES.get(None, name_or_path))
    name_or_path = TL_ALIASES.get(name_or_path, name_or_path)
    if name_or_path == DEMO_MODEL_NAME:
        return str(demo_model_dir())
    path = expand_user(name_or_path, "model")
    if path.is_dir():
        return str(path)
    if (
        path.exists()
        or name_or_path.startswith(("/", "./", "../", "~"))
        or name_or_path.count("/") > 1
    ):
        raise SourceNotFoundError(
            f"model directory not found: {path}",
            hint=f"pass '{DEMO_MODEL_NAME}', an existing Hugging Face model directory, or a Hub name like 'gpt2'",
        )
    return name_or_path


def _is_offline() -> bool:
    try:
        import huggingface_hub.constants as hf_constants

        if getattr(hf_constants, "HF_HUB_OFFLINE", False):
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _not_found(name: str, what: str, err: Exception) -> SourceNotFoundError:
    if _is_offline():
        message = f"{what} {name!r} is not a local directory and is not in the Hugging Face cache (offline mode)"
        hint = (
            "download it once online (unset HF_HUB_OFFLINE; e.g. `huggingface-cli download "
            f"{name}`), point HF_HOME at a cache that holds it, or pass a local directory"
        )
    else:
        message = f"{what} {name!r} is not a local directory and could not be loaded from the Hugging Face Hub"
        hint = "check the name (and your network / HF_TOKEN for gated models), or pass a local directory"
    return SourceNotFoundError(f"{message}: {type(err).__name__}: {err}", hint=hint)


def _dtype_kwarg(dtype: torch.dtype | str) -> dict[str, Any]:
    """transformers >= 4.56 takes ``dtype=``; older releases only ``torch_dtype=``."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' "Loading weights" tqdm bar for one load, then restore the user's setting.

    The bar interleaves with our rich progress output. transformers only offers a process-wide
    switch (which also drives huggingface_hub's download bars), so it is turned off here and
    both libraries' previous states are put back afterwards, even on error.
    """
    import huggingface_hub.utils as hf_hub_utils
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_on = not hf_hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if not hub_on:
            hf_hub_utils.disable_progress_bars()
        elif hf_hub_utils.are_progress_bars_disabled():
            hf_hub_utils.enable_progress_bars()


def load_base_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> torch.nn.Module:
    """A causal LM in eval mode with frozen parameters (``requires_grad=False``) on ``device``."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FormatError(
            f"{source} has no config.json: not a Hugging Face model directory",
            hint="save the model with `model.save_pretrained(dir)`",
        )
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, **_dtype_kwarg(dtype))
    except OSError as err:
        if Path(source).is_dir():
            raise FormatError(
                f"cannot load the model in {source}: {err}", hint="check the directory's files"
            ) from err
        raise _not_found(name_or_path, "model", err) from err
    module: torch.nn.Module = model
    module.to(torch.device(device))
    module.eval()
    module.requires_grad_(False)
    return module


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer stored with a model (``PreTrainedTokenizerBase``), resolved like ``load_base_model``."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise FormatError(
                f"cannot load a tokenizer from {source}: {err}",
                hint="save the tokenizer next to the model with `tokenizer.save_pretrained(dir)`",
            ) from err
        raise _not_found(name_or_path, "tokenizer", err) from err


__all__ = [
    "TL_ALIASES",
    "load_base_model",
    "load_tokenizer",
    "override_base_model",
    "resolve_model_source",
]


def no_cache_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` for a model that would build a KV cache, else ``{}``.

    A Hugging Face model builds a KV cache by default on every forward; a harvest or an eval
    runs each batch once and never reads it, and at 12 layers x 8 x 256 positions x 768 it is
    150 MB of live memory per batch (the outputs are the same with or without it). Passed when
    ``forward`` names ``use_cache``, or when the model is a transformers model whose config
    has the setting (a subclass that wraps ``forward(*args, **kwargs)`` still takes it)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "use_cache" in params:
        return {"use_cache": False}
    config = getattr(model, "config", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return {}
    if isinstance(model, PreTrainedModel) and getattr(config, "use_cache", None) is not None:
        return {"use_cache": False}
    return {}
