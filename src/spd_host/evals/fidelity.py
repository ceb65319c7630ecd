"""The ``fidelity`` suite: how much of the base model survives replacing sites by the decomposition.

For every batch of held-out token sequences, the base model runs

1. clean (capturing what every site writes),
2. per *scope* (all sites at once, then each site alone when ``per_site``):
   - zero-ablated: the scope's write targets replaced by zeros,
   - spliced, once per splice variant: ``adapter.splice(model, sites=..., variant=...)``,
     capturing the write targets,
3. through the method's HarvestFn, for firings (L0, components alive).

Reported per scope and variant: CE clean / spliced / ablated and
``ce_loss_score = (CE_abl - CE_splice) / (CE_abl - CE_clean)``; KL(clean || spliced),
KL(clean || ablated) and ``kl_div_score = (KL_abl - KL_splice) / KL_abl``; explained variance,
MSE and cosine similarity at each write target. For a single-site scope the site's input is
clean, so that is the site's own reconstruction quality; for the all-sites scope the numbers
include errors compounded from earlier sites. Per site: L0 and the fraction of components
alive (fired at least once) from the stored harvest when there is one, else from the eval
tokens; the result says which.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from spd_host.adapter import DecompositionAdapter, HarvestOptions, SupportsSplice
from spd_host.errors import ConfigError, ResultsNotFoundError
from spd_host.evals.configs import FidelityConfig, _Frozen
from spd_host.evals.hooks import capture_targets, zero_targets
from spd_host.evals.metrics import (
    MeanAccumulator,
    ReconAccumulator,
    SparsityAccumulator,
    kl_sum,
    next_token_ce_sum,
    recovered_score,
)
from spd_host.evals.results import EvalResult, package_version

ALL_SITES = "all"
DEFAULT_VARIANT = "default"


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


class ReconRow(_Frozen):
    scope: str
    variant: str
    target: str = Field(description="Hook point or module address the site(s) write to.")
    explained_variance: float | None
    mse: float | None
    cosine_similarity: float | None
    n_tokens: int


class SiteSparsity(_Frozen):
    site: str
    n_components: int
    l0: float | None
    n_alive: int
    alive_fraction: float


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
            rows.append(
                {
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
            )
        return rows


def _num(x: float) -> float | None:
    return None if x != x else float(x)


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


def resolve_variants(adapter: SupportsSplice, config: FidelityConfig) -> list[str | None]:
    offered = list(adapter.splice_variants)
    if config.variants is None:
        return list(offered) if offered else [None]
    unknown = [v for v in config.variants if v not in offered]
    if unknown:
        raise ConfigError(
            f"splice variant(s) {unknown} are not offered by this decomposition",
            hint=f"offered: {', '.join(offered) or '(none: omit --variant)'}",
        )
    return list(config.variants)


def fidelity_on_batches(
    adapter: DecompositionAdapter,
    batches: Iterable[torch.Tensor],
    config: FidelityConfig,
    *,
    dataset: str = "(given batches)",
    n_batches_hint: int | None = None,
) -> FidelityResult:
    """Run the fidelity measurements over explicit token batches ([B, S] int64 each)."""
    from spd_host.plugins import get_host
    from spd_host.topology import topology_of

    splicer = check_splice(adapter)
    variants = resolve_variants(splicer, config)
    model = adapter.load_base_model()
    topo = topology_of(model)
    device = next(model.parameters()).device
    sites = list(adapter.sites)
    harvest_fn = get_host().harvest_fn(
        adapter, HarvestOptions(threshold=config.threshold, device=str(device), next_token=False)
    )

    scopes: list[tuple[str, list[str] | None, list[str]]] = [
        (ALL_SITES, None, _unique(t for s in sites for t in s.writes_to))
    ]
    if config.per_site and len(sites) > 1:  # with one site, "each alone" is the "all" scope
        scopes += [(s.name, [s.name], list(s.writes_to)) for s in sites]
    all_targets = scopes[0][2]
    vname = {v: (v if v is not None else DEFAULT_VARIANT) for v in variants}

    ce_clean = MeanAccumulator()
    ce_abl = {sc: MeanAccumulator() for sc, _, _ in scopes}
    kl_abl = {sc: MeanAccumulator() for sc, _, _ in scopes}
    ce_spl = {(sc, vname[v]): MeanAccumulator() for sc, _, _ in scopes for v in variants}
    kl_spl = {(sc, vname[v]): MeanAccumulator() for sc, _, _ in scopes for v in variants}
    recon = {
        (sc, vname[v], t): ReconAccumulator()
        for sc, _, targets in scopes
        for v in variants
        for t in targets
    }
    sparsity = {s.name: SparsityAccumulator(s.n_components) for s in sites}
    n_tokens = n_sequences = 0
    seq_len = 0

    from spd_host.evals.progress import progress_bar

    with torch.no_grad(), progress_bar("fidelity", total=n_batches_hint) as advance:
        for tokens in batches:
            tokens = tokens.to(device)
            seq_len = int(tokens.shape[1])
            n_sequences += int(tokens.shape[0])
            n_tokens += int(tokens.numel())
            with capture_targets(model, topo, all_targets) as acts:
                logits_clean = _logits(model(tokens))
                clean = {t: acts[t].detach().clone() for t in all_targets}
            logp_clean = F.log_softmax(logits_clean.float(), dim=-1)
            ce_clean.add(next_token_ce_sum(logits_clean, tokens))
            for scope, scope_sites, targets in scopes:
                with zero_targets(model, topo, targets):
                    logits = _logits(model(tokens))
                ce_abl[scope].add(next_token_ce_sum(logits, tokens))
                kl_abl[scope].add(kl_sum(logp_clean, logits))
                for v in variants:
                    with (
                        splicer.splice(model, sites=scope_sites, variant=v),
                        capture_targets(model, topo, targets) as acts,
                    ):
                        logits = _logits(model(tokens))
                        spliced = {t: acts[t].detach().clone() for t in targets}
                    ce_spl[(scope, vname[v])].add(next_token_ce_sum(logits, tokens))
                    kl_spl[(scope, vname[v])].add(kl_sum(logp_clean, logits))
                    for t in targets:
                        recon[(scope, vname[v], t)].add(clean[t], spliced[t])
            hb = harvest_fn(tokens)
            for s in sites:
                sparsity[s.name].add(hb.firings[s.name])
            advance()

    if n_tokens == 0:
        raise ConfigError(
            f"no held-out tokens to evaluate {adapter.decomposition_id!r} on ({dataset})",
            hint="use a larger dataset, a smaller --seq-len, or more --n-tokens",
        )

    loss_rows = []
    for scope, _, _ in scopes:
        for v in variants:
            key = (scope, vname[v])
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
                )
            )
    recon_rows = [
        ReconRow(
            scope=sc,
            variant=vn,
            target=t,
            explained_variance=_num(acc.explained_variance),
            mse=_num(acc.mse),
            cosine_similarity=_num(acc.cosine_similarity),
            n_tokens=acc.n,
        )
        for (sc, vn, t), acc in recon.items()
    ]

    notes: list[str] = []
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
        site_rows.append(
            SiteSparsity(
                site=s.name,
                n_components=s.n_components,
                l0=_num(acc.l0),
                n_alive=n_alive,
                alive_fraction=n_alive / s.n_components,
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
    from spd_host.data import TokenDatasetSpec, available_tokens, iter_token_batches

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
    spec = TokenDatasetSpec(**spec_kwargs)
    tokenizer = adapter.load_tokenizer()
    # a small held-out split is used whole rather than refused
    n_tokens = min(config.n_tokens, available_tokens(spec, tokenizer))
    batches = iter_token_batches(spec, tokenizer, batch_size=config.batch_size, n_tokens=n_tokens)
    hint = -(-n_tokens // (config.batch_size * seq_len))
    result = fidelity_on_batches(
        adapter, batches, config, dataset=f"{source} (heldout)", n_batches_hint=hint
    )
    if n_tokens < config.n_tokens:
        notes = [
            *result.notes,
            f"the held-out split has only {n_tokens} tokens (asked {config.n_tokens})",
        ]
        result = result.model_copy(update={"notes": notes})
    return result
