"""The harvest's configuration: one frozen model, recorded next to every result."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 2  # 2: examples and per-component means as arrays, not SQLite JSON


class HarvestConfig(BaseModel):
    """Everything that determines a harvest's result (same config + same data = same result).

    Dataset fields mirror ``spd_host.data.TokenDatasetSpec``; ``None`` means "take the
    decomposition's recorded default, else the host default".
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str | None = Field(default=None, description="'demo', a file/dir, or a Hub dataset")
    dataset_column: str | None = None
    seq_len: int | None = Field(default=None, gt=1)
    prepend_bos: bool | None = Field(
        default=None,
        description="Each sequence is BOS + seq_len - 1 dataset tokens (spd_host.data); None: "
        "what the decomposition recorded, else what its tokenizer does (resolved before the run)",
    )
    n_tokens: int = Field(
        default=200_000, gt=0, description="Tokens to harvest (all ranks together)"
    )
    batch_size: int = Field(default=16, gt=0, description="Sequences per batch")
    examples_per_component: int = Field(
        default=20, gt=0, description="K: reservoir size and number of top-activation examples"
    )
    context_tokens: int = Field(
        default=8, ge=0, description="Tokens kept on each side of a firing in an example window"
    )
    threshold: float = Field(
        default=0.0,
        allow_inf_nan=False,  # NaN compares false everywhere: an all-dead harvest, exit 0
        description="Passed to the plugin's HarvestFn",
    )
    seed: int = 0
    output_top_k: int = Field(
        default=16, gt=0, description="Next-token probabilities kept per position for output stats"
    )
    output_min_prob: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="Next-token probabilities below this are not kept (their mass counts in the "
        "recorded approximation bound); keeps the output table to salient predictions",
    )
    histogram_bins: int = Field(default=32, gt=1)
    histogram_min: float = Field(default=1e-4, gt=0)
    histogram_max: float = Field(default=1e3, gt=0)
    cooccurrence: bool = True
    cooccurrence_fraction: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Fraction of token positions (drawn from a generator seeded by seed and "
        "global batch, so independent of sharding) on which co-occurrence is counted, exactly. "
        "Co-occurrence costs L^2/2 per position for L firing components; 1.0 counts every position",
    )
    cooccurrence_max_pairs: int = Field(
        default=1 << 26,
        gt=0,
        description="Stop counting co-occurrence (exactly, on the tokens seen so far) once this "
        "many distinct pairs are stored; the token count it covers is recorded. The default "
        "(2**26 pairs: 1 GiB of keys and counts, ~1.6 GiB while a merge runs) keeps a sparse "
        "table inside a harvest's memory budget (a dense table within the default "
        "dense_table_bytes holds fewer pairs than that)",
    )
    min_token_support: int = Field(
        default=5,
        ge=1,
        description="Token lists (top and bottom) only rank tokens seen at least this often overall",
    )
    dense_table_bytes: int = Field(
        default=1 << 28,
        ge=0,
        description="A (component, token) or co-occurrence table is kept dense (int64, one "
        "scatter-add per batch, no sort) when rows x columns x 8 bytes fit this; else sparse",
    )
    token_table_max_pairs: int | None = Field(
        default=1 << 25,
        gt=0,
        description="Bound on the distinct (component, token) pairs a sparse token table keeps "
        "(None: exact and unbounded). Every 16 batches a table above it drops its smallest "
        "counts down to half of it; the summed thresholds are recorded as the bound on how much "
        "any stored or missing count under-estimates the exact one. The default (2**25 pairs: "
        "512 MiB of keys and counts per table) keeps memory flat in tokens at any C x V; a "
        "table that never reaches it (every dense table, and a sparse one below 2**25 distinct "
        "pairs) stays exact, with a recorded bound of 0",
    )
    checkpoint_every: int = Field(default=50, gt=0, description="Batches between checkpoints")
    device: str = Field(
        default="cpu",
        description="Harvest device ('cpu', 'cuda', 'cuda:1'): where the state lives and every "
        "accumulation runs. Not part of the result's identity: results are bit-identical on "
        "every device, and a run may resume on another device",
    )
    pipeline: bool = Field(
        default=True,
        description="Accumulate batch i on a worker thread while the model computes batch i+1 "
        "(harvest/pipeline.py). Not part of the result's identity: one thread applies the "
        "updates in batch order either way, so the results are the same bits; off for plugins "
        "that reuse their output tensors between calls",
    )
    background_merge: bool = Field(
        default=True,
        description="Sort and merge a sparse table's full buffer on a background thread while "
        "the updates go on (CPU; harvest/sparse_counts.py). Not part of the result's identity: "
        "what is added is the same, only when it is folded in moves, so the results are the "
        "same bits",
    )

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.histogram_max <= self.histogram_min:
            raise ValueError("histogram_max must exceed histogram_min")
        return self

    def identity(self) -> dict[str, object]:
        """The fields that determine the result (all but ``device``, ``pipeline`` and
        ``background_merge``, which change where and when work runs, not what it computes).

        ``prepend_bos`` counts only when BOS is prepended: a run without it has the key it had
        before the option existed (its sequences are the same), so those harvests stay valid."""
        exclude = {"device", "pipeline", "background_merge"}
        if not self.prepend_bos:
            exclude.add("prepend_bos")
        return self.model_dump(mode="json", exclude=exclude)

    @property
    def window(self) -> int:
        return 2 * self.context_tokens + 1
