"""The MOLT ``DecompositionAdapter``: metadata from config.json, weights on first use.

One MOLT is one site: it reads the MLP input of one block and writes (replaces) that block's MLP
output. Its components are the transforms, numbered rank group by rank group (ranks ascending).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from spd_host.adapter import (
    DecompositionDefaults,
    HarvestBatch,
    HarvestFn,
    HarvestOptions,
    MethodInfo,
    Site,
    next_token_topk_of,
)
from spd_host.errors import ConfigError, FormatError
from spd_host.ids import DecompositionId
from spd_host_molt.format import (
    MoltConfig,
    base_model_of,
    read_config,
    read_lm_config,
    read_weights,
)
from spd_host_molt.maths import Molt

ACTIVATION_TYPES = ("activation", "pre_activation")
SPLICE_VARIANTS = ("reconstruction",)
_CANONICAL_RE = re.compile(r"^\d+\.(resid_pre|resid_mid|mlp_in|mlp_out|attn_out|resid_post)$")
_TL_LN2_RE = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")


def canonical_hook_point(name: str, *, where: Path) -> str:
    """Map a Llamascopium (TransformerLens) hook name to spd-host's canonical hook point."""
    if _CANONICAL_RE.match(name):
        return name
    from spd_host.topology import hook_point_from_transformerlens

    try:
        return hook_point_from_transformerlens(name)
    except Exception as err:  # TopologyError or ValueError, depending on the name
        raise FormatError(
            f"{where / 'config.json'}: hook point {name!r} has no canonical spd-host name ({err})",
            hint="expected TransformerLens names such as 'blocks.3.ln2.hook_normalized' and "
            "'blocks.3.hook_mlp_out'",
        ) from err


class MoltAdapter:
    """``DecompositionAdapter`` + ``SupportsSplice`` for one Llamascopium MOLT directory."""

    def __init__(self, did: DecompositionId, root: Path, method: MethodInfo) -> None:
        self._did = did
        self.root = root
        self._method = method
        self.cfg: MoltConfig = read_config(root)
        self.lm_config = read_lm_config(root)
        self.reads_from = canonical_hook_point(self.cfg.hook_point_in, where=root)
        m = _TL_LN2_RE.match(self.cfg.hook_point_in)
        # Llamascopium runs TransformerLens with fold_ln: its ln2.hook_normalized is the MLP
        # input before the norm's scale/bias, which must be undone on the Hugging Face model.
        self.unfold_norm_of_block: int | None = int(m.group(1)) if m else None
        self.writes_to = canonical_hook_point(self.cfg.hook_point_out, where=root)
        self._molt: Molt | None = None
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        n = self._n_features()
        self._site = Site(
            name=self.writes_to,
            n_components=n,
            reads_from=self.reads_from,
            writes_to=(self.writes_to,),
            description=(
                f"MOLT ({self.cfg.act_fn}, ranks {', '.join(map(str, self.cfg.ranks))}) reading "
                f"{self.cfg.hook_point_in}, replacing {self.cfg.hook_point_out}"
            ),
        )

    def _n_features(self) -> int:
        """Count features from the safetensors header only (no weights read)."""
        from safetensors import safe_open

        from spd_host_molt.format import weights_file

        path = weights_file(self.root)
        try:
            with safe_open(str(path), framework="pt") as fh:
                names = set(fh.keys())
                if "W_E" not in names:
                    raise FormatError(f"{path}: missing tensor 'W_E'")
                shape = fh.get_slice("W_E").get_shape()
        except FormatError:
            raise
        except Exception as err:
            raise FormatError(f"{path}: not a readable safetensors file ({err})") from err
        if len(shape) != 2 or shape[0] != self.cfg.d_model or shape[1] < 1:
            raise FormatError(
                f"{path}: tensor 'W_E' has shape {list(shape)}, expected [{self.cfg.d_model}, n_features]"
            )
        return int(shape[1])

    # -- DecompositionAdapter -------------------------------------------------------------------
    @property
    def decomposition_id(self) -> str:
        return self._did.normalized

    @property
    def method(self) -> MethodInfo:
        return self._method

    @property
    def sites(self) -> Sequence[Site]:
        return (self._site,)

    @property
    def activation_types(self) -> Sequence[str]:
        return ACTIVATION_TYPES

    @property
    def base_model_name(self) -> str:
        return base_model_of(self.lm_config) or "unknown"

    @property
    def defaults(self) -> DecompositionDefaults:
        return DecompositionDefaults(
            extra={
                "format": "llamascopium",
                "ranks": list(self.cfg.ranks),
                "act_fn": self.cfg.act_fn,
                "norm_activation": self.cfg.norm_activation,
                "hook_point_in": self.cfg.hook_point_in,
                "hook_point_out": self.cfg.hook_point_out,
            }
        )

    def molt(self) -> Molt:
        """The weights, read and checked on first use."""
        if self._molt is None:
            self._molt = Molt(self.cfg, read_weights(self.root, self.cfg))
        return self._molt

    def load_base_model(self) -> torch.nn.Module:
        if self._model is None:
            name = base_model_of(self.lm_config)
            if name is None:
                raise FormatError(
                    f"{self.root}: no lm_config.json names the base model",
                    hint='write lm_config.json with {"model_name": "<hub name>"} or '
                    '{"model_from_pretrained_path": "<dir>"} next to config.json',
                )
            from spd_host.models import load_base_model

            self._model = load_base_model(name)
        return self._model

    def load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from spd_host.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_model_name)
        return self._tokenizer

    # -- SupportsSplice -------------------------------------------------------------------------
    @property
    def splice_variants(self) -> Sequence[str]:
        return SPLICE_VARIANTS

    @contextmanager
    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> Iterator[None]:
        """Within the context, the block's MLP output is the MOLT's output."""
        if variant not in (None, *SPLICE_VARIANTS):
            raise ConfigError(
                f"unknown splice variant {variant!r} for MOLT",
                hint=f"variants: {', '.join(SPLICE_VARIANTS)}",
            )
        if sites is not None:
            unknown = set(sites) - {self._site.name}
            if unknown:
                raise ConfigError(
                    f"unknown MOLT site(s) {sorted(unknown)}",
                    hint=f"the site is {self._site.name!r}",
                )
            if not sites:
                yield
                return
        from spd_host.topology import topology_of

        topo = topology_of(model)
        molt = self.molt().to(_device_of(model))
        to_input = self.input_transform(topo)
        with topo.capture([self.reads_from]) as acts:

            def replace(original: torch.Tensor) -> torch.Tensor:
                return molt.reconstruct(to_input(acts[self.reads_from])).to(original.dtype)

            with topo.replace({self.writes_to: replace}):
                yield

    def input_transform(self, topo: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map from spd-host's ``mlp_in`` (after the MLP norm) to the MOLT's input space.

        Identity, except for TransformerLens ``ln2.hook_normalized`` inputs (see ``__init__``):
        then ``(x - beta) / gamma`` with the norm's effective affine. ``beta`` is the norm's
        ``bias`` (zero when absent). ``gamma`` is ``nn.LayerNorm.weight``; for other norms it is
        read off the module itself as ``norm(ones) - beta``, which covers RMSNorm and Gemma's
        ``1 + weight`` alike (an all-ones row has unit RMS; the eps error is ~1e-6 relative).
        """
        block = self.unfold_norm_of_block
        if block is None:
            return lambda x: x
        norm = topo.module(f"{block}.norm.mlp_pre")
        d = self.cfg.d_model
        param = next(norm.parameters(), None)
        if param is None:  # a norm without affine: the two spaces coincide
            return lambda x: x
        with torch.no_grad():
            bias = getattr(norm, "bias", None)
            beta = bias.detach().float() if isinstance(bias, torch.Tensor) else torch.zeros(d)
            beta = beta.to(param.device)
            if isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None:
                gamma = norm.weight.detach().float()  # LayerNorm(ones) = beta: read the weight
            else:
                ones = torch.ones(1, d, dtype=param.dtype, device=param.device)
                gamma = norm(ones).float().reshape(d) - beta
        if bool((gamma.abs() < 1e-12).any()):
            raise FormatError(
                f"{self.root}: the MLP norm of block {block} has zero scale entries, so the "
                "TransformerLens-normalised input cannot be recovered from the model's mlp_in"
            )
        return lambda x: (x.float() - beta.to(x.device)) / gamma.to(x.device)

    # -- harvest --------------------------------------------------------------------------------
    def harvest_fn(self, options: HarvestOptions) -> HarvestFn:
        from spd_host.models import no_cache_kwargs
        from spd_host.topology import topology_of

        device = torch.device(options.device)
        model = self.load_base_model().to(device)
        topo = topology_of(model)
        forward_kwargs = no_cache_kwargs(model)  # each batch runs once: no KV cache
        molt = self.molt().to(device)
        to_input = self.input_transform(topo)
        site = self._site.name

        @torch.no_grad()
        def run(tokens: torch.Tensor) -> HarvestBatch:
            with topo.capture([self.reads_from]) as acts:
                out = model(tokens.to(device), **forward_kwargs)
            f, h = molt.encode(to_input(acts[self.reads_from]))
            logits = getattr(out, "logits", out)
            top_k = options.next_token_top_k if options.next_token else None
            # dense (the pre-activation is non-zero off the firings), left on the device
            return HarvestBatch(
                tokens=tokens,
                firings={site: f > options.threshold},
                activations={site: {"activation": f, "pre_activation": h}},
                next_token_logits=logits.float() if options.next_token and not top_k else None,
                next_token_topk=next_token_topk_of(logits, top_k) if top_k else None,
            )

        return run


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
