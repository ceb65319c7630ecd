"""Token datasets: text sources -> one cached token stream -> fixed-length, shuffled, sharded batches.

Every consumer of text (harvest, evals, the demo trainer) goes through ``iter_token_batches`` so that
"the same dataset spec and seed" means exactly the same tokens everywhere.

Pipeline:

1. **Documents.** ``source`` names where the text comes from:

   - ``"demo"``: the Tiny Shakespeare corpus shipped with the package (one document);
   - a ``.txt`` file: the whole file is one document;
   - a ``.jsonl`` file: one document per non-blank line, the string in ``text_column``;
   - a directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``,
     whose ``train`` split is used): one document per row, column ``text_column``;
   - anything else is a Hugging Face Hub dataset, ``[hf:]owner/name[:config]``, loaded with
     ``datasets.load_dataset(..., split="train")``, which honours the normal cache and
     ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``.

   ``datasets`` is an optional extra (``pip install 'spd-host[datasets]'``) and is only imported for
   the last two kinds.
2. **Token stream.** Each document is tokenized without the tokenizer's own special tokens, and the
   documents are concatenated with a boundary token *after* each one: the tokenizer's EOS token if it
   has one, else its BOS token, else nothing. (GPT-2-style models were trained with
   ``<|endoftext|>`` between documents; a BOS-only tokenizer gets a BOS that starts the next
   document.) The stream is cached as safetensors under
   ``paths.cache_dir("tokens", <key>)``, where the key hashes the source's identity (path, size and
   modification time, or the ``datasets`` fingerprint), the column, and the tokenizer's full
   definition, so a repeated harvest never re-tokenizes and any change invalidates the cache.
3. **Split.** The last tenth of the *token stream* is held out (``heldout_start``); each part is cut
   into non-overlapping ``seq_len`` sequences (a trailing remainder shorter than ``seq_len`` is
   dropped). Splitting tokens rather than sequences keeps train and held-out disjoint for every
   ``seq_len``, so a model trained on one sequence length (the demo model) is evaluated fairly at any
   other.

   **BOS.** With ``prepend_bos`` each sequence is the tokenizer's BOS followed by ``seq_len - 1``
   stream tokens: the stream is cut into ``seq_len - 1``-token bodies and BOS is put in front of
   each, so no stream token is dropped and a sequence still has ``seq_len`` tokens. This is how
   SAELens (``prepend_bos``: a begin-batch BOS, then ``context_size - 1`` tokens) and Goodfire's
   ``tokenize_and_concatenate(add_bos_token=True)`` (``max_length - 1`` tokens, then BOS in
   front) build sequences. The default (``resolve_prepend_bos``) is what the decomposition
   recorded (``defaults.extra["prepend_bos"]``), else what the base model's tokenizer does when
   it encodes a text: Llama/Gemma-style tokenizers (``add_bos_token``) start with BOS, GPT-2's
   does not.
4. **Order.** With ``shuffle`` the sequences are permuted by ``numpy.random.default_rng(seed)``;
   ``n_tokens`` takes the first ``ceil(n_tokens / seq_len)`` sequences of that order (so a longer
   run extends a shorter one), which are grouped into batches of ``batch_size`` (the last batch may
   be smaller; nothing is dropped).
5. **Sharding and resume.** Rank ``r`` of ``world_size`` takes global batches ``r, r + world_size,
   ...``; ``start_batch`` skips that many of *this rank's* batches (what a resumed worker has already
   processed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from spd_host import paths
from spd_host.errors import ConfigError, DatasetError
from spd_host.paths import expand_user

HELDOUT_FRACTION_DENOMINATOR = 10
"""The last ``1/HELDOUT_FRACTION_DENOMINATOR`` of every token stream is the held-out split."""

_CACHE_FORMAT_VERSION = "1"
_TOKENIZE_CHUNK = 512
"""Documents per tokenizer call (the fast tokenizers parallelise within a call)."""


class TokenDatasetSpec(BaseModel):
    """Which tokens to read: source, column, split, sequence length and order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        default="demo",
        description="'demo', a .txt/.jsonl file, a save_to_disk directory, or a Hub dataset name",
    )
    text_column: str = Field(
        default="text", description="Column/key holding the text (jsonl, datasets)"
    )
    split: Literal["train", "heldout"] = Field(
        default="train", description="'heldout' is the last 10% of the token stream"
    )
    seq_len: int = Field(default=128, ge=2, description="Tokens per sequence")
    seed: int = Field(default=0, description="Seed of the sequence order")
    shuffle: bool = Field(
        default=True, description="Permute the sequences (else keep corpus order)"
    )
    prepend_bos: bool = Field(
        default=False,
        description="Each sequence is BOS + seq_len - 1 stream tokens (see the module docstring)",
    )

    @property
    def body_len(self) -> int:
        """Stream tokens per sequence: ``seq_len``, or ``seq_len - 1`` after a prepended BOS."""
        return self.seq_len - 1 if self.prepend_bos else self.seq_len


def heldout_start(n_tokens: int) -> int:
    """Index of the first held-out token: the last tenth of the token stream is held out."""
    return n_tokens - n_tokens // HELDOUT_FRACTION_DENOMINATOR


# --------------------------------------------------------------------------------------------
# public entry points


def iter_token_batches(
    spec: TokenDatasetSpec,
    tokenizer: Any,
    *,
    batch_size: int,
    n_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield int64 ``[B, spec.seq_len]`` token batches (see the module docstring for the rules).

    ``n_tokens`` is the total over all ranks (rounded up to whole sequences); ``None`` means the
    whole split. Raises ``DatasetError`` when the source cannot be read or holds fewer tokens than
    asked for, ``ConfigError`` for inconsistent arguments.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_batch < 0:
        raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
    if n_tokens is not None and n_tokens < 1:
        raise ConfigError(
            f"n_tokens must be positive (or None for the whole split), got {n_tokens}"
        )

    bos = bos_token_for(spec, tokenizer)
    sequences = split_sequences(
        load_token_stream(spec.source, tokenizer, text_column=spec.text_column), spec
    )
    order = sequence_order(sequences.shape[0], spec)
    if n_tokens is not None:
        wanted = math.ceil(n_tokens / spec.seq_len)
        if wanted > order.shape[0]:
            raise DatasetError(
                f"asked for {n_tokens:,} tokens but the {spec.split} split of {spec.source!r} holds "
                f"{order.shape[0]:,} sequences of {spec.seq_len} = {order.shape[0] * spec.seq_len:,} tokens",
                hint=f"ask for at most {order.shape[0] * spec.seq_len:,} tokens, or use a larger dataset",
            )
        order = order[:wanted]

    n_batches = math.ceil(order.shape[0] / batch_size)
    for global_batch in range(rank + start_batch * world_size, n_batches, world_size):
        index = order[global_batch * batch_size : (global_batch + 1) * batch_size]
        batch = sequences[torch.from_numpy(index)]
        if bos is not None:
            batch = torch.cat([torch.full((batch.shape[0], 1), bos, dtype=batch.dtype), batch], 1)
        yield batch


def bos_token_for(spec: TokenDatasetSpec, tokenizer: Any) -> int | None:
    """The BOS id to put in front of every sequence, or None without ``prepend_bos``.

    A tokenizer without a BOS token cannot honour ``prepend_bos``: a clear error, not a
    silent sequence without it."""
    if not spec.prepend_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        raise ConfigError(
            "sequences must start with BOS (--prepend-bos, or the decomposition records "
            f"prepend_bos), but the tokenizer ({type(tokenizer).__name__}) has no BOS token",
            hint="pass --no-prepend-bos",
        )
    return bos


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself starts an encoded text with its BOS token (Llama/Gemma
    tokenizers with ``add_bos_token``: yes; GPT-2's: no, although its BOS id is set)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer that cannot encode a letter adds nothing
        return False
    return bool(ids) and ids[0] == bos


def resolve_prepend_bos(given: bool | None, recorded: Mapping[str, Any], tokenizer: Any) -> bool:
    """``prepend_bos`` for a harvest or eval: the option if given, else what the decomposition
    recorded (``defaults.extra["prepend_bos"]``: a SAELens config's, a Goodfire run's), else
    what the base model's tokenizer does (:func:`tokenizer_adds_bos`)."""
    if given is not None:
        return given
    value = recorded.get("prepend_bos")
    if isinstance(value, bool):
        return value
    return tokenizer_adds_bos(tokenizer)


def available_tokens(spec: TokenDatasetSpec, tokenizer: Any) -> int:
    """How many tokens ``iter_token_batches`` can yield for ``spec`` (whole sequences of its split)."""
    stream = load_token_stream(spec.source, tokenizer, text_column=spec.text_column)
    return split_sequences(stream, spec).shape[0] * spec.seq_len  # a prepended BOS counts


def model_context_length(model_or_config: Any) -> int | None:
    """The longest sequence a Hugging Face model (or its config) accepts, if the config says."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, model_or_config: Any) -> None:
    """Raise ``DatasetError`` if ``seq_len`` exceeds the model's context length.

    ``iter_token_batches`` does not see the model, so callers that have one (harvest, evals) call
    this before the first forward pass instead of failing inside the position embedding.
    """
    limit = model_context_length(model_or_config)
    if limit is not None and seq_len > limit:
        raise DatasetError(
            f"seq_len {seq_len} is longer than the model's context of {limit} tokens",
            hint=f"use seq_len <= {limit}",
        )


def split_sequences(stream: torch.Tensor, spec: TokenDatasetSpec) -> torch.Tensor:
    """The ``[n, spec.body_len]`` non-overlapping stream pieces of ``spec.split`` (a view of
    ``stream``): whole sequences, or their bodies after BOS with ``prepend_bos``."""
    start = heldout_start(stream.numel())
    part = stream[:start] if spec.split == "train" else stream[start:]
    body = spec.body_len
    n = part.numel() // body
    if n == 0:
        raise DatasetError(
            f"the {spec.split} split of {spec.source!r} has {part.numel():,} tokens, fewer than one "
            f"sequence of {spec.seq_len}{' (BOS + ' + str(body) + ')' if spec.prepend_bos else ''} "
            f"(the whole stream has {stream.numel():,})",
            hint="use a shorter seq_len or a larger dataset",
        )
    return part[: n * body].view(n, body)


def sequence_order(n_sequences: int, spec: TokenDatasetSpec) -> np.ndarray:
    """The order in which sequences are read: a seeded permutation, or corpus order."""
    if not spec.shuffle:
        return np.arange(n_sequences, dtype=np.int64)
    return np.random.default_rng(spec.seed).permutation(n_sequences).astype(np.int64)


def load_token_stream(source: str, tokenizer: Any, *, text_column: str = "text") -> torch.Tensor:
    """The whole source as one int64 token stream (documents joined by the boundary token), cached."""
    resolved = _resolve_source(source, text_column)
    separator = boundary_token_id(tokenizer)
    key_material = {
        "format": _CACHE_FORMAT_VERSION,
        "source": resolved.identity,
        "text_column": text_column if resolved.uses_column else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "separator": separator,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
    cache_file = paths.cache_dir("tokens", key) / "tokens.safetensors"
    if cache_file.exists():
        from safetensors.torch import load_file

        return load_file(cache_file)["tokens"].to(torch.int64)

    stream = _tokenize_documents(resolved.documents(), tokenizer, separator, label=source)
    if stream.numel() == 0:
        raise DatasetError(
            f"dataset {source!r} is empty: it holds no text to tokenize",
            hint="check the file or the text_column",
        )
    _atomic_save(stream, cache_file, metadata={"source": source, "key": json.dumps(key_material)})
    return stream


def boundary_token_id(tokenizer: Any) -> int | None:
    """The token placed after every document: EOS if the tokenizer has one, else BOS, else none."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def tokenization_record(tokenizer: Any, prepend_bos: bool = False) -> dict[str, Any]:
    """How documents were turned into sequences for this tokenizer, recorded with a harvest.

    Tokenizer families differ: GPT-2-style tokenizers have only ``<|endoftext|>`` (used as
    EOS and BOS); Llama/Gemma-style ones have a distinct BOS and set ``add_bos_token``, and
    their models expect BOS at the start of a sequence. The stream here never inserts the
    tokenizer's own special tokens; it places the boundary token after each document, so a
    sequence starts wherever the stream is cut, unless ``prepend_bos`` puts BOS in front of
    every sequence (``bos_at_sequence_start``). Recording the family and the choice makes a
    harvest's statistics interpretable (and comparable) across tokenizers.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    boundary = boundary_token_id(tokenizer)
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "boundary_token": "eos"
        if boundary is not None and boundary == eos
        else ("bos" if boundary is not None and boundary == bos else None),
        "boundary_token_id": boundary,
        "bos_token_id": bos if isinstance(bos, int) else None,
        "eos_token_id": eos if isinstance(eos, int) else None,
        "tokenizer_adds_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        "tokenizer_encodes_bos": tokenizer_adds_bos(tokenizer),
        "bos_at_sequence_start": bool(prepend_bos),
        "special_tokens_in_documents": False,
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer maps text to ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# sources


class _ResolvedSource:
    """Where the documents come from, and a stable identity for the cache key."""

    def __init__(self, identity: dict[str, Any], documents: Any, *, uses_column: bool) -> None:
        self.identity = identity
        self.documents = documents
        self.uses_column = uses_column


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _looks_like_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(
        (".txt", ".jsonl", ".json")
    )


def _resolve_source(source: str, text_column: str) -> _ResolvedSource:
    if source == "demo":
        from spd_host.demo import demo_corpus_path

        path = demo_corpus_path()
        return _ResolvedSource(
            {"kind": "text", **_file_identity(path)},
            lambda: _text_documents(path),
            uses_column=False,
        )

    path = expand_user(source, "dataset")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _ResolvedSource(
                {"kind": "jsonl", **_file_identity(path)},
                lambda: _jsonl_documents(path, text_column),
                uses_column=True,
            )
        if path.suffix == ".txt":
            return _ResolvedSource(
                {"kind": "text", **_file_identity(path)},
                lambda: _text_documents(path),
                uses_column=False,
            )
        raise DatasetError(
            f"cannot read dataset file {path}: unsupported extension {path.suffix!r}",
            hint="use a .txt file (one document), a .jsonl file (one JSON object per line), or a datasets.save_to_disk directory",
        )
    if path.is_dir():
        dataset = _load_from_disk(path)
        _check_column(dataset, text_column, str(path))
        return _ResolvedSource(
            {
                "kind": "save_to_disk",
                "path": str(path.resolve()),
                "fingerprint": dataset._fingerprint,
            },
            lambda: _dataset_documents(dataset, text_column),
            uses_column=True,
        )
    if _looks_like_local_path(source):
        raise DatasetError(
            f"dataset file not found: {path}",
            hint="check the path; 'demo' uses the bundled Tiny Shakespeare corpus",
        )
    dataset = _load_from_hub(source)
    _check_column(dataset, text_column, source)
    return _ResolvedSource(
        {"kind": "hub", "name": source, "fingerprint": dataset._fingerprint},
        lambda: _dataset_documents(dataset, text_column),
        uses_column=True,
    )


def _text_documents(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path} is not UTF-8 text ({err})", hint="re-encode the file as UTF-8"
        ) from err
    if text:
        yield text


def _jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(
                    f"{path}:{line_no} is not valid JSON ({err.msg})",
                    hint="one JSON object per line",
                ) from err
            if not isinstance(record, dict) or text_column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(
                    f"{path}:{line_no} has no {text_column!r} field (it has {keys})",
                    hint="pass text_column= naming the field that holds the text",
                )
            value = record[text_column]
            if not isinstance(value, str):
                raise DatasetError(
                    f"{path}:{line_no}: field {text_column!r} is {type(value).__name__}, not a string",
                    hint="pass text_column= naming a text field",
                )
            yield value


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DatasetError(
            "reading Hugging Face datasets needs the optional 'datasets' package",
            hint="pip install 'spd-host[datasets]'",
        ) from err
    return datasets


def _load_from_disk(path: Path) -> Any:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DatasetError(
            f"{path} is a directory but not one written by datasets' save_to_disk ({err})",
            hint="point at a .txt/.jsonl file or a save_to_disk directory",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(
                f"{path} holds a DatasetDict without a 'train' split (it has {sorted(loaded)})",
                hint="save the split you want with Dataset.save_to_disk",
            )
        loaded = loaded["train"]
    return loaded


def _load_from_hub(source: str) -> Any:
    datasets = _import_datasets()
    name = source.removeprefix("hf:")
    config: str | None = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        return datasets.load_dataset(name, config, split="train")
    except Exception as err:  # datasets raises many types for "not there"; all mean the same here
        offline = _is_offline(datasets)
        raise DatasetError(
            f"cannot load dataset {source!r}: it is not a local file or directory, and loading it from "
            f"the Hugging Face Hub failed{' (offline mode, and it is not cached)' if offline else ''}: "
            f"{type(err).__name__}: {err}",
            hint="check the name, or download it once online (datasets caches it), or point at a local file",
        ) from err


def _is_offline(datasets: Any) -> bool:
    """Offline as the libraries see it (they read the environment once, at import)."""
    if getattr(getattr(datasets, "config", None), "HF_HUB_OFFLINE", False):
        return True
    try:
        import huggingface_hub.constants as hf_constants

        if hf_constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    flags = (os.environ.get(name, "").lower() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in {"1", "true", "yes", "on"} for flag in flags)


def _check_column(dataset: Any, text_column: str, where: str) -> None:
    if text_column not in dataset.column_names:
        raise DatasetError(
            f"dataset {where} has no column {text_column!r} (it has {dataset.column_names})",
            hint="pass text_column= naming the column that holds the text",
        )
    if len(dataset) == 0:
        raise DatasetError(f"dataset {where} has no rows", hint="check the dataset")


def _dataset_documents(dataset: Any, text_column: str) -> Iterator[str]:
    for start in range(0, len(dataset), _TOKENIZE_CHUNK):
        for value in dataset[start : start + _TOKENIZE_CHUNK][text_column]:
            if not isinstance(value, str):
                raise DatasetError(
                    f"column {text_column!r} holds {type(value).__name__} values, not strings",
                    hint="pass text_column= naming a text column",
                )
            yield value


# --------------------------------------------------------------------------------------------
# tokenization and the cache


def _chunks(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenize_documents(
    documents: Iterable[str], tokenizer: Any, separator: int | None, *, label: str
) -> torch.Tensor:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    pieces: list[np.ndarray] = []
    n_docs = 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True) as bar:
        task = bar.add_task(f"tokenizing {label}")
        for chunk in _chunks(documents, _TOKENIZE_CHUNK):
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if separator is not None:
                    ids = [*ids, separator]
                pieces.append(np.asarray(ids, dtype=np.int64))
            n_docs += len(chunk)
            bar.update(task, description=f"tokenizing {label}: {n_docs:,} documents")
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(pieces))


def _atomic_save(stream: torch.Tensor, target: Path, metadata: dict[str, str]) -> None:
    """Write the stream as int32 safetensors next to ``target``, then rename it into place."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tokens-", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"tokens": stream.to(torch.int32).contiguous()}, tmp, metadata=metadata)
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "TokenDatasetSpec",
    "available_tokens",
    "bos_token_for",
    "boundary_token_id",
    "check_seq_len",
    "heldout_start",
    "iter_token_batches",
    "load_token_stream",
    "model_context_length",
    "resolve_prepend_bos",
    "split_sequences",
    "tokenization_record",
    "tokenizer_adds_bos",
]
