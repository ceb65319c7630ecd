"""Finding a Hugging Face model on this machine (never downloading one) and picking a device."""

from __future__ import annotations

from pathlib import Path

from spd_host.errors import SourceNotFoundError


def local_model_dir(name: str, what: str) -> Path:
    """``name`` as a local directory, or the snapshot of the Hub repo ``name`` in the local
    Hugging Face cache (``HF_HOME``); a clear error when it is neither."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as err:  # not cached, or not a valid repo id
        raise SourceNotFoundError(
            f"{what} {name!r} is neither a directory nor in the local Hugging Face cache "
            f"({type(err).__name__})",
            hint=f"download it first (`hf download {name}`) or pass a local directory; "
            "spd-host never downloads models during an eval",
        ) from None


def in_local_cache(name: str) -> bool:
    try:
        local_model_dir(name, "model")
    except SourceNotFoundError:
        return False
    return True


def pick_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
