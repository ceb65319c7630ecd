"""The tokenizer of an SPD run over a Goodfire target model.

Goodfire's SPD runs name a Hub tokenizer (``tokenizer_name``); their pretrain runs also save the
training tokenizer next to their configs (``tokenizer.save_pretrained(out_dir)``: locally
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``; on wandb only
``tokenizer.json``). Order:

1. the pretrain run's saved files, when ``tokenizer_name`` is unset or is the very tokenizer the
   run was trained with (its ``hf_tokenizer_path``): no network, exactly the training tokenizer;
2. ``tokenizer_name`` (local dir or cached Hub repo) otherwise, falling back to the saved files
   when it is not available;
3. the pretrain run's ``hf_tokenizer_path``.
"""

from __future__ import annotations

from typing import Any

from spd_adapters.spd.targets.run_reader import PretrainRun
from spd_host.errors import FormatError, SourceNotFoundError


def _from_run_files(run: PretrainRun) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    assert run.tokenizer_dir is not None
    try:
        if (run.tokenizer_dir / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(run.tokenizer_dir))
        return PreTrainedTokenizerFast(tokenizer_file=str(run.tokenizer_dir / "tokenizer.json"))
    except (OSError, ValueError) as err:
        raise FormatError(f"{run.tokenizer_dir}: cannot load the saved tokenizer: {err}") from err


def load_pretrain_tokenizer(run: PretrainRun, tokenizer_name: str | None) -> Any:
    from spd_host.models import load_tokenizer

    tried: list[str] = []
    hub = run.hf_tokenizer_name()
    if run.tokenizer_dir is not None and tokenizer_name in (None, "", hub):
        return _from_run_files(run)
    if tokenizer_name:
        try:
            return load_tokenizer(tokenizer_name)
        except SourceNotFoundError:
            tried.append(f"tokenizer_name {tokenizer_name!r} (not available locally)")
    if run.tokenizer_dir is not None:
        return _from_run_files(run)
    tried.append(f"tokenizer.json next to {run.model_config}")
    if hub and hub != tokenizer_name:
        try:
            return load_tokenizer(hub)
        except SourceNotFoundError:
            tried.append(f"the pretrain run's hf_tokenizer_path {hub!r}")
    raise SourceNotFoundError(
        f"no tokenizer for pretrain run {run.name!r}: tried {'; '.join(tried)}",
        hint="make the Hub tokenizer available in the local cache, or put the pretrain run's "
        "tokenizer.json next to its model_config.yaml",
    )
