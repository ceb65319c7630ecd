"""Find and read a Goodfire pretrain run: the files behind ``pretrained_model_name``.

Layouts (as ``spd.pretrain.train`` writes them):

- local run dir: ``<out>/final_config.yaml``, ``<out>/model_config.yaml``, tokenizer files
  (``tokenizer.json`` + ``tokenizer_config.json`` ... from ``save_pretrained``) and
  ``<out>/checkpoints/model_step_<N>.pt``. Goodfire names the *checkpoint file*; the configs sit
  two levels up. A run dir itself is accepted too (the highest ``N`` wins).
- wandb: the same files flat in the run's files (``model_step_<N>.pt`` next to the configs).
  Only the configs, tokenizer files and the highest-step checkpoint are downloaded, once, into
  spd-host's wandb cache (``<cache>/wandb/<entity>__<project>__<run>``, the layout
  :func:`spd_host.ids.fetch_wandb_run` uses); a cached run is read without network, and with
  ``WANDB_MODE=offline`` (or ``disabled``) nothing is ever downloaded.
- flat dirs (a downloaded wandb run, param-decomp's ``pretrain_cache/<project>-<run>``):
  ``model_step_<N>.{pt,safetensors}`` next to ``model_config.yaml``.

``wandb:`` names take every form Goodfire accepts: ``[wandb:]<entity>/<project>/<run>``,
``[wandb:]<entity>/<project>/runs/<run>`` and ``https://wandb.ai/<entity>/<project>/runs/<run>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spd_host.errors import FormatError, SourceNotFoundError

MODEL_CONFIG = "model_config.yaml"
RUN_CONFIG = "final_config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_STEP_RE = re.compile(r"^model_step_(\d+)\.(pt|safetensors)$")
_SEG = r"[^/\s]+"
_RUN = r"(?:[a-z0-9]-)?[a-z0-9]{8}"  # Goodfire's run IDs: 8 chars, optionally "s-"-style prefixed
_WANDB_FORMS = (
    re.compile(rf"^(?:wandb:)?({_SEG})/({_SEG})/runs/({_SEG})/?$"),
    re.compile(rf"^https://wandb\.ai/([^/]+)/([^/]+)/runs/({_RUN})(?:/[^?]*)?(?:\?.*)?$"),
    re.compile(rf"^wandb:({_SEG})/({_SEG})/({_SEG})$"),
    re.compile(rf"^({_SEG})/({_SEG})/({_RUN})$"),
)


@dataclass(frozen=True)
class PretrainRun:
    """The files of one pretrain run (``final_config.yaml`` and tokenizer are optional;
    ``checkpoint`` is None only when located without weights)."""

    name: str
    checkpoint: Path | None
    model_config: Path
    run_config: Path | None
    tokenizer_dir: Path | None

    def read_model_config(self) -> dict[str, Any]:
        return _read_yaml(self.model_config)

    def read_run_config(self) -> dict[str, Any]:
        return _read_yaml(self.run_config) if self.run_config is not None else {}

    def hf_tokenizer_name(self) -> str | None:
        """The Hub tokenizer the run was trained with (``train_dataset_config.hf_tokenizer_path``,
        or ``data.tokenizer_name`` in param-decomp's configs)."""
        cfg = self.read_run_config()
        for section, key in (
            ("train_dataset_config", "hf_tokenizer_path"),
            ("data", "tokenizer_name"),
        ):
            value = cfg.get(section, {}).get(key) if isinstance(cfg.get(section), dict) else None
            if isinstance(value, str) and value:
                return value
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FormatError(f"{path}: cannot read YAML: {err}") from err
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
    return raw


def parse_wandb_name(name: str) -> tuple[str, str, str] | None:
    """``(entity, project, run)`` when ``name`` is a wandb run reference, else None."""
    s = name.strip()
    for pattern in _WANDB_FORMS:
        if m := pattern.match(s):
            return m.group(1), m.group(2), m.group(3)
    return None


def _latest_checkpoint(directory: Path) -> Path | None:
    found = [
        (int(m.group(1)), m.group(2) == "pt", p)
        for p in directory.iterdir()
        if p.is_file() and (m := _STEP_RE.match(p.name))
    ]
    return max(found)[2] if found else None


def _run_at(name: str, root: Path, checkpoint: Path | None) -> PretrainRun:
    run_config = root / RUN_CONFIG
    return PretrainRun(
        name=name,
        checkpoint=checkpoint,
        model_config=root / MODEL_CONFIG,
        run_config=run_config if run_config.is_file() else None,
        tokenizer_dir=root if (root / "tokenizer.json").is_file() else None,
    )


def _run_from_checkpoint(name: str, checkpoint: Path) -> PretrainRun:
    """Configs next to the checkpoint (flat) or two levels up (``<out>/checkpoints/``)."""
    for root in (checkpoint.parent.parent, checkpoint.parent):
        if (root / MODEL_CONFIG).is_file():
            return _run_at(name, root, checkpoint)
    raise FormatError(
        f"pretrain run {name!r}: no {MODEL_CONFIG} next to checkpoint {checkpoint} "
        f"(looked in {checkpoint.parent.parent} and {checkpoint.parent})",
        hint="a Goodfire pretrain run keeps model_config.yaml in its output dir, above "
        "checkpoints/; copy it from the run (wandb files or the trainer's output dir)",
    )


def locate(name: str, *, weights: bool = True) -> PretrainRun:
    """Resolve ``pretrained_model_name`` (wandb reference or local path) to a run's files.

    ``weights=False``: the caller needs only the configs and tokenizer (the SPD checkpoint holds
    the target's weights as ``target_model.*``), so a wandb run's checkpoint is not downloaded
    and ``checkpoint`` may be None.
    """
    wandb_ref = parse_wandb_name(name)
    path = Path(name).expanduser()
    if wandb_ref is not None and not path.exists():
        directory = fetch_wandb_pretrain(*wandb_ref, weights=weights)
        if not weights and _latest_checkpoint(directory) is None:
            if not (directory / MODEL_CONFIG).is_file():
                raise FormatError(f"pretrain run {name!r}: no {MODEL_CONFIG} in {directory}")
            return _run_at(name, directory, None)
        return locate_dir(name, directory)
    if path.is_file():
        return _run_from_checkpoint(name, path)
    if path.is_dir():
        return locate_dir(name, path)
    raise SourceNotFoundError(
        f"pretrain run {name!r} is neither a local checkpoint/run directory nor a wandb run "
        "reference",
        hint="pretrained_model_name takes wandb:<entity>/<project>/runs/<id> or a path to "
        "<run>/checkpoints/model_step_<N>.pt",
    )


def locate_dir(name: str, directory: Path) -> PretrainRun:
    """A run dir (``checkpoints/`` inside) or a flat dir of ``model_step_<N>`` files."""
    sub = directory / "checkpoints"
    checkpoint = (_latest_checkpoint(sub) if sub.is_dir() else None) or _latest_checkpoint(
        directory
    )
    if checkpoint is None:
        raise FormatError(
            f"pretrain run {name!r}: no model_step_<N>.pt checkpoint in {directory}"
            + (f" or {sub}" if sub.is_dir() else ""),
            hint="the pretrain trainer writes checkpoints/model_step_<N>.pt; was the run saved?",
        )
    return _run_from_checkpoint(name, checkpoint)


def wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")


#: all files wanted are cached (the marker :func:`spd_host.ids.fetch_wandb_run` uses too)
COMPLETE = ".complete"
#: configs and tokenizer cached, checkpoint not downloaded
CONFIGS_COMPLETE = ".configs-complete"


def fetch_wandb_pretrain(entity: str, project: str, run_id: str, *, weights: bool = True) -> Path:
    """The cached files of a wandb pretrain run, downloading what is missing once when allowed.

    Downloaded: ``model_config.yaml``, ``final_config.yaml``, tokenizer files and (with
    ``weights``) the highest-step ``model_step_<N>.pt`` only, as Goodfire's own reader does.
    """
    from spd_host.paths import cache_dir

    run_path = f"{entity}/{project}/{run_id}"
    target = cache_dir("wandb") / run_path.replace("/", "__")
    if (target / COMPLETE).exists() or (not weights and (target / CONFIGS_COMPLETE).exists()):
        return target
    if wandb_offline():
        what = "its checkpoint is" if (target / CONFIGS_COMPLETE).exists() else "it is"
        raise SourceNotFoundError(
            f"wandb pretrain run {run_path!r}: {what} not in the local cache ({target}) and "
            "WANDB_MODE forbids downloading",
            hint="unset WANDB_MODE=offline once to download it, or copy the run's files "
            f"(model_config.yaml, model_step_<N>.pt, ...) into {target} with a {COMPLETE} file",
        )
    try:
        import wandb

        files = list(wandb.Api().run(run_path).files())
    except Exception as err:  # wandb raises many unrelated types
        raise SourceNotFoundError(
            f"wandb pretrain run {run_path!r} could not be read: {err}",
            hint="check entity/project/run, and WANDB_API_KEY for private projects",
        ) from err
    steps = [(int(m.group(1)), f) for f in files if (m := _STEP_RE.match(f.name))]
    wanted = [f for f in files if f.name in (MODEL_CONFIG, RUN_CONFIG, *TOKENIZER_FILES)]
    if not steps or not any(f.name == MODEL_CONFIG for f in wanted):
        raise FormatError(
            f"wandb run {run_path!r} is not a Goodfire pretrain run: it has "
            f"{'no model_step_<N>.pt' if not steps else 'no ' + MODEL_CONFIG} among its files",
            hint="pretrained_model_name must name the pretrain run of the target model",
        )
    if weights:
        wanted.append(max(steps, key=lambda s: s[0])[1])
    target.mkdir(parents=True, exist_ok=True)
    for f in wanted:
        if not (target / f.name).is_file():
            f.download(root=str(target), replace=False, exist_ok=True)
    (target / (COMPLETE if weights else CONFIGS_COMPLETE)).write_text(run_path)
    return target
