"""The ``fidelity`` suite: how much of the base model survives replacing sites by the decomposition.

For every batch of held-out token sequences, the base model runs

1. clean (capturing what every site writes),
2. per *scope* (all sites at once, then each site alone when ``per_site``):
   - the baseline: the scope's write targets replaced by zeros (zero-ablation), or, where the
     convention and the adapter name one, a baseline splice variant (Goodfire's ``zero_masked``:
     each module outputs only its bias),
   - spliced, once per splice variant: ``adapter.splice(model, sites=..., variant=...)``,
     capturing the write targets,
3. through the method's HarvestFn, for firings (L0, components alive, density).

A scope's forwards start at the lowest block the scope touches, the blocks below returning what
they returned in the clean forward (exact: nothing below changes): always for the zero-ablation,
for splices where the adapter declares ``splice_is_local`` (see ``SupportsSplice``). An adapter
with ``observe_clean_forward`` records what its splice needs from the clean forward there.

Reported per scope and variant: CE clean / spliced / ablated and
``ce_loss_score = (CE_abl - CE_splice) / (CE_abl - CE_clean)``; KL(clean || spliced),
KL(clean || ablated) and ``kl_div_score = (KL_abl - KL_splice) / KL_abl``; explained variance,
MSE, cosine similarity and SAELens' shrinkage numbers at each write target. For a single-site
scope the site's input is clean, so that is the site's own reconstruction quality; for the
all-sites scope the numbers include errors compounded from earlier sites.

**Conventions** (``config.convention``; the result records which was used; docs/evals.md has
the table with the peers' source files):

- ``spd-host``: every position counts; CE / KL are pooled means over all pairs / positions;
  MSE per element.
- ``saelens`` (SAELens ``run_evals(exclude_special_tokens=True)``): positions whose token is a
  special token of the tokenizer are excluded from KL, explained variance, MSE, cosine, L0, L1
  and density, CE pairs whose *input* is special are dropped, and the splice is undone at those
  positions (the zero-ablation is not: SAELens ablates everywhere). MSE is the per-token sum.
- ``goodfire`` (Goodfire SPD ``CEandKLLosses``): each batch's CE / KL / ``ce_unrecovered`` /
  ``ce_difference`` is a mean over that batch, and the reported number is the mean of those
  weighted by the batch's ``B*S``; the baseline is the adapter's ``zero_masked`` variant where it
  has one; L0 is the unweighted mean of per-batch L0s at the run's ``ci_alive_threshold``.

The engine never prints: progress goes to the callback set with :func:`reporting_progress`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from spd_host.adapter import DecompositionAdapter, HarvestOptions, SupportsSplice
from spd_host.errors import ConfigError, ResultsNotFoundError
from spd_host.evals.configs import FidelityConfig, FidelitySettings, _Frozen
from spd_host.evals.hooks import (
    capture_targets,
    first_block,
    keep_original_at,
    record_block_outputs,
    reuse_blocks_below,
    zero_targets,
)
from spd_host.evals.metrics import (
    DENSITY_BIN_EDGES,
    CleanRows,
    MeanAccumulator,
    ReconAccumulator,
    SparsityAccumulator,
    WeightedMean,
    ce_and_kl_sums,
    density_histogram,
    next_token_ce_sum,
    recovered_score,
)
from spd_host.evals.results import EvalResult, package_version
from spd_host.models import no_cache_kwargs

ALL_SITES = "all"
DEFAULT_VARIANT = "default"
SMALL_MODEL_PARAMS = 50_000_000

# (done, total, what): the engine's progress reports; the CLI turns them into a bar
ProgressFn = Callable[[int, int | None, str], None]
_PROGRESS: ContextVar[ProgressFn | None] = ContextVar("fidelity_progress", default=None)


@contextmanager
def reporting_progress(fn: ProgressFn | None) -> Iterator[None]:
    """Within the context, fidelity runs report ``fn(done, total, what)`` after each batch."""
    token = _PROGRESS.set(fn)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class LossRow(_Frozen):
    scope: str = Field(description="'all' or the site spliced alone.")
    variant: str
    ce_clean: float
    ce_spliced: float
    ce_ablated: float
    ce_loss_score: float | None
    kl_spliced: float
    kl_ablated: float
    kl_div_score: float | None
    n_predictions: int = Field(description="Next-token pairs in the CE (within sequences).")
    n_positions: int = Field(description="Positions in the KL.")
    ce_unrecovered: float | None = Field(
        default=None,
        description="goodfire: per-batch (CE_splice - CE_clean) / (CE_baseline - CE_clean), "
        "averaged weighted by B*S.",
    )
    ce_difference: float | None = Field(
        default=None, description="goodfire: per-batch CE_splice - CE_clean, weighted by B*S."
    )


class ReconRow(_Frozen):
    scope: str
    variant: str
    target: str = Field(description="Hook point or module address the site(s) write to.")
    explained_variance: float | None
    mse: float | None = Field(description="Per element (saelens: per-token sum over dims).")
    cosine_similarity: float | None
    n_tokens: int
    mse_per_token: float | None = None
    l2_norm_in: float | None = None
    l2_norm_out: float | None = None
    l2_ratio: float | None = None
    relative_reconstruction_bias: float | None = None


class SiteSparsity(_Frozen):
    site: str
    n_components: int
    l0: float | None
    n_alive: int
    alive_fraction: float
    l1: float | None = Field(default=None, description="Mean sum |primary activation| per token.")
    feature_density: list[float] | None = Field(
        default=None, description="saelens: fraction of kept tokens each component fired on."
    )
    density_histogram: list[int] | None = Field(
        default=None, description="Counts of log10(density + 1e-10) in density_bin_edges bins."
    )


class FidelityResult(EvalResult):
    suite: Literal["fidelity"] = "fidelity"
    dataset: str
    seq_len: int
    n_tokens: int
    n_sequences: int
    variants: list[str]
    loss: list[LossRow]
    recon: list[ReconRow]
    sparsity: list[SiteSparsity]
    l0_total: float | None
    alive_fraction: float
    alive_source: Literal["harvest", "eval_tokens"]
    convention: str = "spd-host"
    prepend_bos: bool | None = None
    special_token_ids: list[int] | None = None
    n_excluded_positions: int = 0
    baseline: str = "zero_ablation"
    peer_names: dict[str, str] = Field(default_factory=dict)
    density_bin_edges: list[float] | None = None

    def loss_row(self, scope: str = ALL_SITES, variant: str | None = None) -> LossRow:
        variant = variant or self.variants[0]
        for row in self.loss:
            if row.scope == scope and row.variant == variant:
                return row
        raise KeyError((scope, variant))

    def table_rows(self) -> list[dict[str, Any]]:
        """One comparison-table row per splice variant (all sites spliced at once)."""
        rows = []
        for v in self.variants:
            r = self.loss_row(ALL_SITES, v)
            single = [x for x in self.recon if x.scope != ALL_SITES and x.variant == v]
            rows_ev = single or [x for x in self.recon if x.variant == v]  # one site: "all" is it
            evs = [x.explained_variance for x in rows_ev if x.explained_variance is not None]
            row: dict[str, Any] = {
                "variant": v,
                "CE clean": r.ce_clean,
                "CE splice": r.ce_spliced,
                "CE abl": r.ce_ablated,
                "CE score": r.ce_loss_score,
                "KL": r.kl_spliced,
                "KL score": r.kl_div_score,
                "EV": sum(evs) / len(evs) if evs else None,
                "L0": self.l0_total,
                "alive": self.alive_fraction,
            }
            if self.convention == "goodfire":
                row["CE unrec"] = r.ce_unrecovered
            if self.convention != "spd-host":
                row["conv"] = self.convention
            rows.append(row)
        return rows


def _num(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, tuple):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"the base model returned {type(out).__name__}, not logits")
    return logits


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_splice(adapter: DecompositionAdapter) -> SupportsSplice:
    if not isinstance(adapter, SupportsSplice):
        raise ConfigError(
            f"decomposition {adapter.decomposition_id!r} (method {adapter.method.name!r}) cannot be spliced into its base model",
            hint="the method's adapter must implement spd_host.adapter.SupportsSplice for fidelity evals",
        )
    return adapter


def resolve_variants(
    adapter: SupportsSplice, config: FidelityConfig, default: Sequence[str] | None = None
) -> list[str | None]:
    offered = list(adapter.splice_variants)
    if config.variants is None:
        if default is not None:
            return list(default)
        return list(offered) if offered else [None]
    unknown = [v for v in config.variants if v not in offered]
    if unknown:
        raise ConfigError(
            f"splice variant(s) {unknown} are not offered by this decomposition",
            hint=f"offered: {', '.join(offered) or '(none: omit --variant)'}",
        )
    return list(config.variants)


def convention_settings(adapter: Any, config: FidelityConfig) -> FidelitySettings:
    """The adapter's reading of the convention (its optional ``fidelity_settings``), else defaults."""
    fn = getattr(adapter, "fidelity_settings", None)
    if fn is None:
        return FidelitySettings()
    settings = fn(config.convention, config)
    if not isinstance(settings, FidelitySettings):
        settings = FidelitySettings.model_validate(settings)
    return settings


def special_token_ids(tokenizer: Any) -> list[int]:
    """SAELens' special tokens: every ``*_token_id`` attribute of the tokenizer that is set, and
    every token of its ``special_tokens_map`` (additional special tokens included)."""
    ids: set[int] = set()
    for attr in dir(tokenizer):
        if attr.endswith("_token_id"):
            try:
                value = getattr(tokenizer, attr)
            except Exception:  # an unset special token may raise on access
                continue
            if isinstance(value, int):
                ids.add(value)
    for token in getattr(tokenizer, "special_tokens_map", {}).values():
        for t in token if isinstance(token, list) else [token]:
            if isinstance(t, str):
                tid = tokenizer.convert_tokens_to_ids(t)
                if isinstance(tid, int):
                    ids.add(tid)
    return sorted(ids)


def with_bos(batches: Iterable[torch.Tensor], bos: int) -> Iterator[torch.Tensor]:
    """Each sequence of already-cut batches becomes BOS + its first ``seq_len - 1`` tokens
    (for callers of :func:`fidelity_on_batches` holding batches without BOS; ``run_fidelity``
    builds BOS sequences in ``spd_host.data`` instead, dropping no stream token)."""
    for b in batches:
        col = torch.full((b.shape[0], 1), bos, dtype=b.dtype, device=b.device)
        yield torch.cat([col, b[:, :-1]], dim=1)


@contextmanager
def _cpu_threads(model: torch.nn.Module, device: torch.device, n: int | None) -> Iterator[None]:
    """Fewer torch threads for a small model on CPU: measured 10x faster on a shared machine
    (every op of a tiny model waits on thread hand-offs otherwise)."""
    if device.type != "cpu":
        yield
        return
    if n is None:
        n_params = sum(p.numel() for p in model.parameters())
        n = 1 if n_params < SMALL_MODEL_PARAMS else None
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@contextmanager
def _fused_gelu(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the context, transformers' ``NewGELUActivation`` modules compute with
    ``F.gelu(approximate="tanh")`` (the formula ``0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))``
    in one kernel, as transformers' own ``gelu_pytorch_tanh``): a third of a small GPT-2's
    forward was this activation's five separate element-wise ops."""
    swapped: list[torch.nn.Module] = []
    if enabled:
        try:
            from transformers.activations import NewGELUActivation
        except ImportError:  # pragma: no cover - transformers is a dependency
            NewGELUActivation = ()  # type: ignore[assignment, misc]
        for m in model.modules():
            if isinstance(m, NewGELUActivation) and "forward" not in vars(m):
                m.forward = _tanh_gelu  # type: ignore[method-assign, assignment]
                swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def _forward_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model(tokens)`` -> logits, without a KV cache where the model offers to build one."""
    kwargs = no_cache_kwargs(model)
    return lambda tokens: _logits(model(tokens, **kwargs))


class _Splicer:
    """Calls ``adapter.splice`` with what this adapter accepts: ``options`` (the convention's
    splice options) and ``positions`` (where to splice); without ``positions`` support the
    splice is undone at excluded positions by hooks at the write targets."""

    def __init__(
        self, adapter: SupportsSplice, model: torch.nn.Module, topo: Any, options: dict[str, Any]
    ):
        self.adapter, self.model, self.topo, self.options = adapter, model, topo, options
        try:
            params = inspect.signature(adapter.splice).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.takes_options = "options" in params
        self.takes_positions = "positions" in params
        if options and not self.takes_options:
            did = getattr(adapter, "decomposition_id", type(adapter).__name__)
            raise ConfigError(
                f"the splice of {did!r} takes no `options`, but its fidelity_settings gave {sorted(options)}",
                hint="the adapter's splice must accept options=... (or return no splice_options)",
            )

    @contextmanager
    def __call__(
        self,
        sites: list[str] | None,
        variant: str | None,
        targets: Sequence[str],
        keep: torch.Tensor | None,
    ) -> Iterator[None]:
        kwargs: dict[str, Any] = {"sites": sites, "variant": variant}
        if self.options:
            kwargs["options"] = self.options
        if keep is not None and self.takes_positions:
            kwargs["positions"] = keep
        with ExitStack() as stack:
            stack.enter_context(self.adapter.splice(self.model, **kwargs))
            if keep is not None and not self.takes_positions:
                stack.enter_context(keep_original_at(self.model, self.topo, targets, keep))
            yield


def fidelity_on_batches(
    adapter: DecompositionAdapter,
    batches: Iterable[torch.Tensor],
    config: FidelityConfig,
    *,
    dataset: str = "(given batches)",
    n_batches_hint: int | None = None,
    special_ids: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> FidelityResult:
    """Run the fidelity measurements over explicit token batches ([B, S] int64 each).

    ``special_ids`` (saelens): the token ids to exclude; default from the adapter's tokenizer.
    """
    from spd_host.plugins import get_host
    from spd_host.topology import topology_of

    convention = config.convention
    splicer = check_splice(adapter)
    settings = convention_settings(adapter, config)
    variants = resolve_variants(splicer, config, settings.default_variants)
    model = adapter.load_base_model()
    topo = topology_of(model)
    device = next(model.parameters()).device
    sites = list(adapter.sites)
    threshold = config.threshold
    if threshold is None:
        threshold = settings.alive_threshold if settings.alive_threshold is not None else 0.0
    harvest_fn = get_host().harvest_fn(
        adapter, HarvestOptions(threshold=threshold, device=str(device), next_token=False)
    )
    primary = next(iter(adapter.activation_types), None)
    exclude: torch.Tensor | None = None
    if convention == "saelens":
        if special_ids is None:
            special_ids = special_token_ids(adapter.load_tokenizer())
        exclude = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    do_splice = _Splicer(splicer, model, topo, dict(settings.splice_options))
    forward = _forward_fn(model)
    baseline_variant = settings.baseline_variant

    scopes: list[tuple[str, list[str] | None, list[str]]] = [
        (ALL_SITES, None, _unique(t for s in sites for t in s.writes_to))
    ]
    if config.per_site and len(sites) > 1:  # with one site, "each alone" is the "all" scope
        scopes += [(s.name, [s.name], list(s.writes_to)) for s in sites]
    all_targets = scopes[0][2]
    vname = {v: (v if v is not None else DEFAULT_VARIANT) for v in variants}
    # Where each scope's forwards may start (blocks below are the clean forward's): the
    # zero-ablation touches only the scope's write targets, a splice whatever its sites read
    # and write, and the latter only where the adapter promises its splice is local.
    local = bool(getattr(splicer, "splice_is_local", False))
    by_name = {s.name: s for s in sites}

    def site_names(scope_sites: list[str] | None) -> list[str]:
        chosen = [by_name[n] for n in scope_sites] if scope_sites is not None else sites
        names = [n for s in chosen for n in (s.reads_from, *s.writes_to)]
        return names + [s.address for s in chosen if s.address]

    start_zero = {sc: first_block(topo, targets) for sc, _, targets in scopes}
    start_splice = {
        sc: first_block(topo, site_names(sc_sites)) if local else 0 for sc, sc_sites, _ in scopes
    }
    # the highest start: blocks below it are recorded in the clean forward
    shortened = max((*start_zero.values(), *start_splice.values()))
    observe = getattr(splicer, "observe_clean_forward", None)

    def scope_variants(scope: str) -> list[str | None]:
        if scope == ALL_SITES or config.per_site_variants == "all":
            return variants
        return variants[:1]

    keys = [(sc, vname[v]) for sc, _, _ in scopes for v in scope_variants(sc)]

    ce_clean = MeanAccumulator()
    ce_abl = {sc: MeanAccumulator() for sc, _, _ in scopes}
    kl_abl = {sc: MeanAccumulator() for sc, _, _ in scopes}
    ce_spl = {k: MeanAccumulator() for k in keys}
    kl_spl = {k: MeanAccumulator() for k in keys}
    # goodfire: per-batch means weighted by B*S
    w_clean = WeightedMean()
    w_ce_abl = {sc: WeightedMean() for sc, _, _ in scopes}
    w_kl_abl = {sc: WeightedMean() for sc, _, _ in scopes}
    w = {name: {k: WeightedMean() for k in keys} for name in ("ce", "kl", "unrec", "diff")}
    recon = {
        (sc, vname[v], t): ReconAccumulator()
        for sc, _, targets in scopes
        for v in scope_variants(sc)
        for t in targets
    }
    sparsity = {s.name: SparsityAccumulator(s.n_components) for s in sites}
    n_tokens = n_sequences = n_excluded = 0
    seq_len = 0
    report = _PROGRESS.get()
    torch.manual_seed(config.seed_masks)  # stochastic / random mask variants draw from it

    def mean_of(pair: tuple[float, int]) -> float:
        return pair[0] / pair[1] if pair[1] else float("nan")

    with (
        torch.no_grad(),  # (not inference_mode: adapters key caches on tensor versions)
        _cpu_threads(model, device, config.cpu_threads),
        _fused_gelu(model, config.fused_gelu),
    ):
        for i_batch, tokens in enumerate(batches):
            tokens = tokens.to(device)
            seq_len = int(tokens.shape[1])
            n_sequences += int(tokens.shape[0])
            n_tokens += int(tokens.numel())
            weight = float(tokens.numel())
            keep = None
            if exclude is not None:
                keep = ~torch.isin(tokens, exclude.to(device))
                n_excluded += int((~keep).sum())
            with ExitStack() as stack:
                acts = stack.enter_context(capture_targets(model, topo, all_targets))
                blocks = (
                    stack.enter_context(record_block_outputs(model, topo, shortened))
                    if shortened
                    else []
                )
                if observe is not None:
                    stack.enter_context(observe(model, tokens))
                logits_clean = forward(tokens)
                clean = {t: CleanRows.of(acts[t], keep) for t in all_targets}

            def from_block(start: int, blocks: list[Any] = blocks) -> Any:
                return reuse_blocks_below(model, topo, start, blocks) if start else nullcontext()

            logp_clean = F.log_softmax(logits_clean.float(), dim=-1)
            p_clean = logp_clean.exp()
            pair = next_token_ce_sum(logits_clean, tokens, keep)
            ce_clean.add(pair)
            c_b = mean_of(pair)
            w_clean.add(c_b, weight)
            for scope, scope_sites, targets in scopes:
                # goodfire: the baseline is a splice variant that is often also measured
                # (zero_mask); without an exclusion mask it is the same forward: run it once
                reuse = (
                    baseline_variant is not None
                    and keep is None
                    and baseline_variant in scope_variants(scope)
                )
                baseline_acts: dict[str, torch.Tensor] = {}
                if baseline_variant is not None:
                    # the ablation is a splice, so SAELens' exclusion does not apply to it
                    with ExitStack() as stack:
                        stack.enter_context(from_block(start_splice[scope]))
                        stack.enter_context(do_splice(scope_sites, baseline_variant, targets, None))
                        if reuse:
                            acts = stack.enter_context(capture_targets(model, topo, targets))
                        logits = forward(tokens)
                        if reuse:
                            baseline_acts = {t: acts[t].detach().clone() for t in targets}
                else:
                    with from_block(start_zero[scope]), zero_targets(model, topo, targets):
                        logits = forward(tokens)
                pair, kpair = ce_and_kl_sums(logp_clean, p_clean, logits, tokens, keep)
                baseline_pairs = (pair, kpair)
                ce_abl[scope].add(pair)
                kl_abl[scope].add(kpair)
                a_b = mean_of(pair)
                w_ce_abl[scope].add(a_b, weight)
                w_kl_abl[scope].add(mean_of(kpair), weight)
                for v in scope_variants(scope):
                    key = (scope, vname[v])
                    if reuse and v == baseline_variant:
                        spliced = baseline_acts
                        pair, kpair = baseline_pairs
                    else:
                        with (
                            from_block(start_splice[scope]),
                            do_splice(scope_sites, v, targets, keep),
                            capture_targets(model, topo, targets) as acts,
                        ):
                            logits = forward(tokens)
                            spliced = {t: acts[t].detach().clone() for t in targets}
                        pair, kpair = ce_and_kl_sums(logp_clean, p_clean, logits, tokens, keep)
                    ce_spl[key].add(pair)
                    kl_spl[key].add(kpair)
                    s_b = mean_of(pair)
                    w["ce"][key].add(s_b, weight)
                    w["kl"][key].add(mean_of(kpair), weight)
                    denom = a_b - c_b
                    w["unrec"][key].add((s_b - c_b) / denom if denom else float("nan"), weight)
                    w["diff"][key].add(s_b - c_b, weight)
                    for t in targets:
                        recon[(scope, vname[v], t)].add(clean[t], spliced[t], keep)
            hb = harvest_fn(tokens)
            for s in sites:
                site_acts = hb.activations.get(s.name, {}).get(primary) if primary else None
                sparsity[s.name].add(hb.firings[s.name], site_acts, keep)
            if report is not None:
                report(i_batch + 1, n_batches_hint, adapter.decomposition_id)

    if n_tokens == 0:
        raise ConfigError(
            f"no held-out tokens to evaluate {adapter.decomposition_id!r} on ({dataset})",
            hint="use a larger dataset, a smaller --seq-len, or more --n-tokens",
        )

    goodfire = convention == "goodfire"
    loss_rows = []
    for scope, _, _ in scopes:
        for v in scope_variants(scope):
            key = (scope, vname[v])
            if goodfire:
                c, sp, a = w_clean.mean, w["ce"][key].mean, w_ce_abl[scope].mean
                ks, ka = w["kl"][key].mean, w_kl_abl[scope].mean
            else:
                c, sp, a = ce_clean.mean, ce_spl[key].mean, ce_abl[scope].mean
                ks, ka = kl_spl[key].mean, kl_abl[scope].mean
            loss_rows.append(
                LossRow(
                    scope=scope,
                    variant=vname[v],
                    ce_clean=c,
                    ce_spliced=sp,
                    ce_ablated=a,
                    ce_loss_score=recovered_score(a, sp, c),
                    kl_spliced=ks,
                    kl_ablated=ka,
                    kl_div_score=recovered_score(ka, ks, 0.0),
                    n_predictions=ce_clean.count,
                    n_positions=kl_abl[scope].count,
                    ce_unrecovered=_num(w["unrec"][key].mean) if goodfire else None,
                    ce_difference=_num(w["diff"][key].mean) if goodfire else None,
                )
            )
    saelens = convention == "saelens"
    recon_rows = [
        ReconRow(
            scope=sc,
            variant=vn,
            target=t,
            explained_variance=_num(acc.explained_variance),
            mse=_num(acc.mse_per_token if saelens else acc.mse),
            cosine_similarity=_num(acc.cosine_similarity),
            n_tokens=acc.n,
            mse_per_token=_num(acc.mse_per_token),
            l2_norm_in=_num(acc.l2_norm_in),
            l2_norm_out=_num(acc.l2_norm_out),
            l2_ratio=_num(acc.l2_ratio),
            relative_reconstruction_bias=_num(acc.relative_reconstruction_bias),
        )
        for (sc, vn, t), acc in recon.items()
    ]

    notes: list[str] = list(settings.notes)
    if saelens:
        notes.append(
            f"saelens convention: {n_excluded} special-token positions excluded "
            f"(token ids {sorted(set(special_ids or []))})"
        )
    harvest_alive, harvest_run = (
        _alive_from_harvest(adapter, config) if config.use_harvest else (None, None)
    )
    alive_source: Literal["harvest", "eval_tokens"]
    if harvest_alive is not None:
        alive_source = "harvest"
        notes.append(f"components alive counted from harvest sub-run {harvest_run!r}")
    else:
        alive_source = "eval_tokens"
        notes.append(f"components alive counted on the {n_tokens} eval tokens (no harvest used)")
    site_rows = []
    for s in sites:
        acc = sparsity[s.name]
        n_alive = harvest_alive[s.name] if harvest_alive is not None else int(acc.fired.sum())
        density = acc.density()
        site_rows.append(
            SiteSparsity(
                site=s.name,
                n_components=s.n_components,
                l0=_num(acc.l0_batch_mean if goodfire else acc.l0),
                n_alive=n_alive,
                alive_fraction=n_alive / s.n_components,
                l1=_num(acc.l1) if primary else None,
                feature_density=density.tolist() if saelens else None,
                density_histogram=density_histogram(density),
            )
        )
    l0s = [r.l0 for r in site_rows]
    total_components = sum(s.n_components for s in sites)
    return FidelityResult(
        decomposition_id=adapter.decomposition_id,
        method=adapter.method.name,
        package_version=package_version(),
        config=config.model_dump(mode="json"),
        harvest_run=harvest_run,
        notes=notes,
        dataset=dataset,
        seq_len=seq_len,
        n_tokens=n_tokens,
        n_sequences=n_sequences,
        variants=[vname[v] for v in variants],
        loss=loss_rows,
        recon=recon_rows,
        sparsity=site_rows,
        l0_total=None if any(x is None for x in l0s) else sum(x for x in l0s if x is not None),
        alive_fraction=sum(r.n_alive for r in site_rows) / total_components,
        alive_source=alive_source,
        convention=convention,
        prepend_bos=prepend_bos,
        special_token_ids=sorted(set(special_ids)) if special_ids is not None else None,
        n_excluded_positions=n_excluded,
        baseline=f"splice variant {baseline_variant}" if baseline_variant else "zero_ablation",
        peer_names=dict(settings.peer_names),
        density_bin_edges=list(DENSITY_BIN_EDGES),
    )


def _alive_from_harvest(
    adapter: DecompositionAdapter, config: FidelityConfig
) -> tuple[dict[str, int] | None, str | None]:
    """Alive counts per site from the stored harvest, or ``(None, None)`` when there is none."""
    try:
        from spd_host.harvest import HarvestRepo
    except ImportError:
        return None, None
    try:
        repo = HarvestRepo.open(adapter.decomposition_id, run=config.harvest_run)
    except ResultsNotFoundError:
        if config.harvest_run is not None:
            raise
        return None, None
    alive: dict[str, int] = {s.name: 0 for s in adapter.sites}
    for comp in repo.summary():
        if comp.site in alive and comp.firing_count > 0:
            alive[comp.site] += 1
    return alive, harvest_run_name(repo)


def harvest_run_name(repo: Any) -> str:
    run = getattr(repo, "run", None)
    return str(run) if run else repo.path.name


def run_fidelity(adapter: DecompositionAdapter, config: FidelityConfig) -> FidelityResult:
    """The suite entry point: held-out tokens from the configured dataset, then measure."""
    from spd_host.data import (
        TokenDatasetSpec,
        available_tokens,
        bos_token_for,
        iter_token_batches,
    )

    check_splice(adapter)
    defaults = adapter.defaults
    source = config.dataset or defaults.dataset or "demo"
    seq_len = config.seq_len or defaults.seq_len or 128
    spec_kwargs: dict[str, Any] = {
        "source": source,
        "split": "heldout",
        "seq_len": seq_len,
        "seed": config.seed,
    }
    column = config.text_column or defaults.dataset_column
    if column:
        spec_kwargs["text_column"] = column
    tokenizer = adapter.load_tokenizer()
    prepend_bos = resolve_prepend_bos(config, defaults.extra, tokenizer)
    spec = TokenDatasetSpec(**spec_kwargs, prepend_bos=prepend_bos)
    bos_token_for(spec, tokenizer)  # no BOS to prepend: refused before the model loads
    # a small held-out split is used whole rather than refused
    n_tokens = min(config.n_tokens, available_tokens(spec, tokenizer))
    batches: Iterable[torch.Tensor] = iter_token_batches(
        spec, tokenizer, batch_size=config.batch_size, n_tokens=n_tokens
    )
    special = special_token_ids(tokenizer) if config.convention == "saelens" else None
    hint = -(-n_tokens // (config.batch_size * seq_len))
    result = fidelity_on_batches(
        adapter,
        batches,
        config,
        dataset=f"{source} (heldout)",
        n_batches_hint=hint,
        special_ids=special,
        prepend_bos=prepend_bos,
    )
    if n_tokens < config.n_tokens:
        notes = [
            *result.notes,
            f"the held-out split has only {n_tokens} tokens (asked {config.n_tokens})",
        ]
        result = result.model_copy(update={"notes": notes})
    return result


def resolve_prepend_bos(config: FidelityConfig, recorded: dict[str, Any], tokenizer: Any) -> bool:
    """``--prepend-bos`` if given, else what the decomposition recorded (``prepend_bos`` in its
    defaults' extra, e.g. a SAELens config), else whether the tokenizer adds BOS itself: the
    one rule of ``spd_host.data.resolve_prepend_bos``, shared with the harvest."""
    from spd_host.data import resolve_prepend_bos as resolve

    return resolve(config.prepend_bos, recorded, tokenizer)
