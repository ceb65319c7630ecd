"""``run_harvest``: one pass over a token dataset, with checkpoints, shards and progress.

Sharding follows the data module's convention: global batch ``g`` belongs to rank
``g % world_size``; rank ``r``'s ``i``-th batch is global batch ``r + i * world_size``. All
randomness is derived from ``(seed, global batch)``, so the statistics do not depend on how
the work was split or interrupted (reservoir samples: same distribution).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from spd_host.adapter import HarvestOptions
from spd_host.errors import ConfigError, DatasetError, ResultsNotFoundError
from spd_host.harvest.accumulator import HarvestAccumulator, Layout
from spd_host.harvest.checkpoint import load_checkpoint, save_checkpoint
from spd_host.harvest.config import HarvestConfig
from spd_host.harvest.merge import merge_accumulators
from spd_host.harvest.pipeline import AccumulationPipeline, InlineAccumulation
from spd_host.harvest.repo import HarvestRepo, harvest_root
from spd_host.harvest.store import RESULT_JSON, write_results
from spd_host.locking import RunLock

BatchSource = Callable[[int, int, int], Iterator[torch.Tensor]]
"""``(rank, world_size, start_batch) -> token batches [B, S]`` of that rank, from its ``start_batch``-th."""


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; else torchrun's RANK/WORLD_SIZE; else SLURM_PROCID/SLURM_NTASKS; else 0/1."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"invalid shard: rank {rank} of world size {world_size}",
            hint="rank must be in [0, world_size); check --rank/--world-size or RANK/WORLD_SIZE",
        )
    return rank, world_size


def run_dir_name(
    decomposition_id: str, config: HarvestConfig, inputs: dict[str, str | None] | None = None
) -> str:
    """The sub-run's key: ID, config and the fingerprints of its input files (see
    :func:`input_fingerprints`), so changed weights or a changed dataset file get a new run."""
    doc: dict[str, Any] = {"id": decomposition_id, "config": config.identity()}
    if inputs:
        doc["inputs"] = inputs
    return "run-" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def decomposition_files(adapter: Any, decomposition_id: str) -> Path | None:
    """Where the decomposition's files are: a local ID's path, else what the adapter loaded
    (``root`` of dictionary adapters, ``files.run_dir`` of SPD runs); None if unknown."""
    from spd_host.plugins import get_host

    try:
        did = get_host().parse_id(decomposition_id)
    except Exception:
        did = None
    if did is not None and did.path is not None:
        return Path(did.path)
    for candidate in (
        getattr(adapter, "root", None),
        getattr(getattr(adapter, "files", None), "run_dir", None),
    ):
        if isinstance(candidate, (str, Path)) and Path(candidate).exists():
            return Path(candidate)
    return None


def input_fingerprints(adapter: Any, config: HarvestConfig) -> dict[str, str | None]:
    """Fingerprints of the decomposition's files and of a local dataset file or directory."""
    from spd_host.fingerprint import fingerprint_path

    files = decomposition_files(adapter, adapter.decomposition_id)
    out: dict[str, str | None] = {"decomposition": fingerprint_path(files) if files else None}
    dataset = str(config.dataset or "")
    try:
        local = Path(dataset).expanduser()
    except RuntimeError:
        local = Path(dataset)
    out["dataset"] = fingerprint_path(local) if dataset and local.exists() else None
    return out


def check_against_model(adapter: Any, config: HarvestConfig) -> None:
    """Refuse, before any work, a ``seq_len`` longer than the base model's positions and
    example windows longer than a sequence (``--context-tokens 100000`` was OOM-killed)."""
    seq_len = int(config.seq_len or 128)
    if config.context_tokens > seq_len:
        raise ConfigError(
            f"invalid --context-tokens {config.context_tokens}: more than the sequence length "
            f"{seq_len} (an example window cannot be longer than its sequence)",
            hint=f"pass --context-tokens {min(seq_len, 8)} (tokens kept on each side of a firing)",
        )
    try:
        from spd_host.topology.loading import load_config

        model_config = load_config(adapter.base_model_name)
    except Exception:  # no config reachable offline: the forward pass will tell
        return
    from spd_host.data import check_seq_len

    check_seq_len(seq_len, model_config)


def shard_dir(out: Path, rank: int, world_size: int) -> Path:
    return out / "shards" / f"rank-{rank}-of-{world_size}"


def resolve_config(adapter: Any, config: HarvestConfig) -> HarvestConfig:
    """Fill dataset fields left as None from the decomposition's recorded defaults."""
    d = adapter.defaults
    return config.model_copy(
        update={
            "dataset": config.dataset or d.dataset or "demo",
            "dataset_column": config.dataset_column or d.dataset_column or "text",
            "seq_len": config.seq_len or d.seq_len or 128,
        }
    )


def resolve_bos(adapter: Any, config: HarvestConfig) -> HarvestConfig:
    """``prepend_bos`` as a bool (the option, else the decomposition's record, else its
    tokenizer's habit), so the sub-run key and ``harvest.json`` say what was done."""
    from spd_host.data import resolve_prepend_bos

    given = config.prepend_bos
    recorded = adapter.defaults.extra
    if given is None and not isinstance(recorded.get("prepend_bos"), bool):
        value = resolve_prepend_bos(None, recorded, adapter.load_tokenizer())
    else:
        value = resolve_prepend_bos(given, recorded, None)
    return config.model_copy(update={"prepend_bos": value})


def dataset_batches(adapter: Any, config: HarvestConfig) -> BatchSource:
    """Token batches from ``spd_host.data`` for the resolved config."""
    try:
        from spd_host.data import (
            TokenDatasetSpec,
            available_tokens,
            bos_token_for,
            iter_token_batches,
        )
    except ImportError as err:
        raise ConfigError(
            "spd_host.data is not available in this installation",
            hint="install a version of spd-host that ships spd_host.data, or pass batches= to run_harvest",
        ) from err
    spec = TokenDatasetSpec(
        source=str(config.dataset),
        text_column=str(config.dataset_column),
        seq_len=int(config.seq_len or 128),
        seed=config.seed,
        prepend_bos=bool(config.prepend_bos),
    )
    tokenizer = adapter.load_tokenizer()
    bos_token_for(spec, tokenizer)  # asked for BOS and the tokenizer has none: refused now
    # Fail before the progress bar and the model load, not at the first batch.
    available = available_tokens(spec, tokenizer)
    if config.n_tokens > available:
        raise DatasetError(
            f"asked for {config.n_tokens:,} tokens but the train split of {spec.source!r} holds "
            f"{available:,} tokens in sequences of {spec.seq_len}",
            hint=f"pass --n-tokens {available} or less, or use a larger dataset",
        )

    def source(rank: int, world_size: int, start_batch: int) -> Iterator[torch.Tensor]:
        return iter_token_batches(
            spec,
            tokenizer,
            batch_size=config.batch_size,
            n_tokens=config.n_tokens,
            rank=rank,
            world_size=world_size,
            start_batch=start_batch,
        )

    return source


def run_harvest(
    decomposition_id: str,
    config: HarvestConfig,
    *,
    out: Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    batches: BatchSource | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    force: bool = False,
) -> HarvestRepo | None:
    """Harvest a decomposition; resume from the last checkpoint if one exists.

    Single process: returns the finished ``HarvestRepo``. Sharded: each rank writes its final
    state under ``shards/``; the rank that finishes last merges them and returns the repo, the
    others return ``None`` (``spd-host harvest merge`` does the same by hand).
    ``stop_after``: process at most this many batches in this call (tests, budgets).
    ``force``: recompute even if this sub-run (same ID, config and input fingerprints) is
    finished; otherwise the finished one is returned with ``repo.reused`` set.
    Two harvests of one sub-run at once: the second is refused (``BusyError`` naming the pid).
    """
    from spd_host.plugins import get_host

    host = get_host()
    rank, world_size = resolve_rank(rank, world_size)
    adapter = host.load_adapter(decomposition_id)
    did = adapter.decomposition_id
    config = resolve_config(adapter, config)
    if batches is None:  # tokens from spd_host.data: whether they start with BOS is settled now
        config = resolve_bos(adapter, config)
    check_against_model(adapter, config)
    if out is None:
        out = harvest_root(did) / run_dir_name(did, config, input_fingerprints(adapter, config))
    out = Path(out)
    lock_name = ".harvest.lock" if world_size == 1 else f".harvest-rank-{rank}-of-{world_size}.lock"
    with RunLock(out / lock_name, f"harvest of {did} into {out}"):
        if force:
            _discard_results(out, world_size, rank)
        elif world_size == 1 and (out / RESULT_JSON).exists():
            repo = HarvestRepo(out)
            repo.reused = True
            return repo
        return _run_locked(
            adapter, did, config, out, rank, world_size, batches, progress, stop_after
        )


def _discard_results(out: Path, world_size: int, rank: int) -> None:
    """``--force``: remove this sub-run's finished files and checkpoint (only ours, by name)."""
    from spd_host.harvest.store import DB_FILE, EXAMPLES_FILE, STATS_FILE

    (out / RESULT_JSON).unlink(missing_ok=True)  # first: the run is unfinished from here on
    for name in (STATS_FILE, EXAMPLES_FILE, DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(
        out / "state" if world_size == 1 else shard_dir(out, rank, world_size), ignore_errors=True
    )


def _run_locked(
    adapter: Any,
    did: str,
    config: HarvestConfig,
    out: Path,
    rank: int,
    world_size: int,
    batches: BatchSource | None,
    progress: bool,
    stop_after: int | None,
) -> HarvestRepo | None:
    from spd_host.plugins import get_host

    host = get_host()
    state_dir = out / "state" if world_size == 1 else shard_dir(out, rank, world_size)
    layout = Layout.of(adapter.sites, adapter.activation_types)
    options = HarvestOptions(
        threshold=config.threshold,
        device=config.device,
        sparse=True,
        next_token_top_k=config.output_top_k,
        # the LM head's top-k may be left to the accumulation thread (pipeline.py)
        defer_next_token=True,
    )
    fn = host.harvest_fn(adapter, options)
    source = batches if batches is not None else dataset_batches(adapter, config)

    seq_len = int(config.seq_len or 128)
    total_batches = math.ceil(config.n_tokens / (config.batch_size * seq_len))
    my_batches = len(range(rank, total_batches, world_size))
    acc: HarvestAccumulator | None = None
    start = 0
    found = load_checkpoint(state_dir, device=config.device)
    if found is not None:
        acc, meta = found
        if acc.config.identity() != config.identity() or acc.layout != layout:
            raise ConfigError(
                f"the checkpoint in {state_dir} was made with a different config or decomposition",
                hint="use a different --out, or delete that directory to start over",
            )
        acc.config = config  # the same up to the device, which may differ on a resume
        start = int(meta["next_local_batch"])
        if meta.get("complete"):
            start = my_batches
    t0 = time.perf_counter()
    done_tokens = acc.n_tokens if acc is not None else 0
    bar = _progress(progress, world_size, rank)
    pacer = CheckpointPacer()
    processed = 0
    exhausted = False
    pipe: Accumulation | None = None
    with bar:
        task = bar.add_task(
            "harvest", total=my_batches * config.batch_size * seq_len, completed=done_tokens
        )

        def advance(batch: Any) -> None:  # on the thread that applied the batch
            bar.update(task, advance=int(batch.tokens.numel()))

        it = source(rank, world_size, start) if start < my_batches else iter(())
        try:
            for local in range(start, my_batches):
                if stop_after is not None and processed >= stop_after:
                    break
                try:
                    tokens = next(it)
                except StopIteration:
                    exhausted = True
                    break
                g = rank + local * world_size
                with torch.no_grad():
                    batch = fn(tokens)
                if acc is None:
                    acc = HarvestAccumulator(layout, config, _vocab_size(batch, adapter))
                if pipe is None:
                    pipe = _accumulation(acc, config, advance)
                pipe.submit(batch, g)
                del batch, tokens  # the pipeline holds them until they are applied
                processed += 1
                # none after the last planned batch: the results (or a shard's final state)
                # are written right after the loop, so that checkpoint would be pure cost
                last = local + 1 == my_batches
                if (local + 1) % config.checkpoint_every == 0 and not last and pacer.due():
                    pipe.drain()  # the checkpoint is the state after batch `local`, exactly
                    with pacer.timing():
                        save_checkpoint(
                            state_dir,
                            acc,
                            {"next_local_batch": local + 1, "decomposition_id": did},
                        )
            if pipe is not None:
                pipe.drain()
        except Exception as err:
            # an update of an earlier batch failed too: its error is the one the sequential
            # loop would have raised first (it never got to this batch)
            earlier = _earlier_error(pipe)
            if earlier is not None and earlier is not err:
                raise earlier from None
            raise
        finally:
            if pipe is not None:
                pipe.close()  # Ctrl-C: drops queued batches, waits for the one in progress
        if exhausted or start + processed >= my_batches:
            # the planned total counts whole batches; a short last batch or a dataset that
            # ran out must still end the bar at 100%
            done_now = next(t.completed for t in bar.tasks if t.id == task)
            bar.update(task, total=done_now, completed=done_now)
    if acc is None:
        raise ConfigError(
            f"the dataset yielded no batches for rank {rank}", hint="check --dataset and --n-tokens"
        )
    next_local = start + processed
    complete = exhausted or next_local >= my_batches
    if not complete or world_size > 1:
        # the state is what a later call resumes from, or this shard's part of the merge; a
        # finished single-process run writes its results directly (a crash during that write
        # resumes from the last periodic checkpoint)
        save_checkpoint(
            state_dir,
            acc,
            {"next_local_batch": next_local, "decomposition_id": did, "complete": complete},
        )
    if not complete:
        return None
    meta = {
        "decomposition_id": did,
        "world_size": world_size,
        "seconds": time.perf_counter() - t0,
    }
    if pipe is not None:  # this call's split of the time (pipeline.py): which side bounds it
        meta["pipeline"] = {k: round(v, 3) for k, v in pipe.timings.items()}
    if batches is None:  # tokens came from spd_host.data: record how (BOS/EOS per family)
        from spd_host.data import tokenization_record

        meta["tokenization"] = tokenization_record(
            adapter.load_tokenizer(), prepend_bos=bool(config.prepend_bos)
        )
    if world_size == 1:
        write_results(out, acc, meta)
        # the finished files hold everything; the checkpoint only served the resume
        shutil.rmtree(state_dir, ignore_errors=True)
        return HarvestRepo(out)
    return _merge_if_last(out, world_size, did)


Accumulation = AccumulationPipeline | InlineAccumulation


def _accumulation(
    acc: HarvestAccumulator, config: HarvestConfig, on_applied: Callable[[Any], None]
) -> Accumulation:
    """The pipelined worker (``config.pipeline``, the default) or the inline, sequential path;
    both apply ``acc.update`` in batch order, so the results are the same bits. Other device
    types than CPU and CUDA (whose stream rule pipeline.py follows) stay sequential."""
    if config.pipeline and torch.device(config.device).type in ("cpu", "cuda"):
        return AccumulationPipeline(
            acc.update, depth=1, device=config.device, on_applied=on_applied
        )
    return InlineAccumulation(acc.update, on_applied=on_applied)


def _earlier_error(pipe: Accumulation | None) -> BaseException | None:
    """Let the worker finish what was handed to it, and return the error it raised, if any."""
    if pipe is None:
        return None
    with suppress(Exception):  # the error is returned below
        pipe.drain()
    return pipe.error


class CheckpointPacer:
    """Keeps checkpoints cheap relative to the batches between them.

    A checkpoint falls due every ``checkpoint_every`` batches, and is skipped while less than
    ``RATIO`` times the last checkpoint's duration has passed since it ended, so writing state
    costs at most about ``1 / RATIO`` of the run however large the state grows. Skipping is
    safe: a state is exact at every batch boundary, so when checkpoints happen never changes
    the result (a resume re-does the batches since the last one).
    """

    RATIO = 10.0

    def __init__(self) -> None:
        self._last_end = time.perf_counter()
        self._last_cost = 0.0

    def due(self) -> bool:
        return time.perf_counter() - self._last_end >= self.RATIO * self._last_cost

    @contextmanager
    def timing(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - t0


def _vocab_size(batch: Any, adapter: Any) -> int:
    if batch.next_token_topk is not None:
        return int(batch.next_token_topk.vocab_size)
    nt = batch.next_token_logits if batch.next_token_logits is not None else batch.next_token_probs
    if nt is not None:
        return int(nt.shape[-1])
    return len(adapter.load_tokenizer())


def _merge_if_last(out: Path, world_size: int, did: str) -> HarvestRepo | None:
    for r in range(world_size):
        meta_path = shard_dir(out, r, world_size) / "state.json"
        if not meta_path.exists() or not json.loads(meta_path.read_text()).get("complete"):
            return None
    try:
        fd = os.open(out / ".merge.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.close(fd)
    try:
        return merge_shards(out)
    finally:
        (out / ".merge.lock").unlink(missing_ok=True)


def merge_shards(out: Path) -> HarvestRepo:
    """Merge every complete shard state under ``out/shards`` into a finished harvest in ``out``."""
    dirs = sorted((out / "shards").glob("rank-*-of-*"), key=lambda p: int(p.name.split("-")[1]))
    if not dirs:
        raise ResultsNotFoundError(
            f"no shard states under {out / 'shards'}", hint="run the sharded harvest first"
        )
    worlds = {p.name.rsplit("-", 1)[1] for p in dirs}
    if len(worlds) != 1:
        raise ConfigError(
            f"shards from different world sizes in {out / 'shards'}: {sorted(worlds)}"
        )
    world = int(next(iter(worlds)))
    if len(dirs) != world:
        raise ResultsNotFoundError(f"{len(dirs)} of {world} shards present in {out / 'shards'}")
    parts = []
    did = ""
    for d in dirs:
        found = load_checkpoint(d)
        if found is None or not found[1].get("complete"):
            raise ResultsNotFoundError(
                f"shard {d} is not complete", hint="re-run that rank with the same command"
            )
        parts.append(found[0])
        did = found[1]["decomposition_id"]
    acc = merge_accumulators(parts)
    write_results(out, acc, {"decomposition_id": did, "world_size": world, "seconds": None})
    return HarvestRepo(out)


def _progress(enabled: bool, world_size: int, rank: int) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from spd_host.cli.common import err_console

    class TokensPerSecond(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task: Any) -> Any:
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s")

    label = "harvest" if world_size == 1 else f"harvest rank {rank}/{world_size}"
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TokensPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled,
        transient=False,
    )


def summarize(repo: HarvestRepo) -> dict[str, Any]:
    """The final summary: tokens, alive/dead per site, median density, time."""
    from safetensors import safe_open

    with safe_open(str(repo.path / "stats.safetensors"), framework="pt") as f:
        fc = f.get_tensor("firing_count")
    sites = []
    for name, off, n in zip(repo.layout.names, repo.layout.offsets, repo.layout.sizes, strict=True):
        c = fc[off : off + n]
        alive = int((c > 0).sum())
        dens = c.to(torch.float64) / max(repo.n_tokens, 1)
        sites.append(
            {
                "site": name,
                "components": n,
                "alive": alive,
                "dead": n - alive,
                "median_density": float(dens.median()),
                "median_density_alive": float(dens[c > 0].median()) if alive else 0.0,
            }
        )
    return {
        "decomposition_id": repo.adapter_id,
        "run": repo.run,
        "path": str(repo.path),
        "n_tokens": repo.n_tokens,
        "world_size": repo.meta.get("world_size", 1),
        "seconds": repo.meta.get("seconds"),
        "cooccurrence_tokens": repo.meta.get("cooc_n_tokens"),
        "sites": sites,
    }
