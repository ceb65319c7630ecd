"""Translation of other ecosystems' names into canonical hook points (pure string functions).

TransformerLens hook names and module-path hookpoints (as used by sparsify, SAELens'
``hook_name`` for HF models, Goodfire SPD) are mapped without looking at a model. Names whose
meaning depends on the architecture (HF's ``post_attention_layernorm`` is the pre-MLP norm in
Llama but a post-attention norm in Gemma 2 / OLMo 2) are refused here; use
``TransformerTopology.hook_point_of_module`` for those.
"""

from __future__ import annotations

import re
from typing import Literal

from spd_host.errors import TopologyError

# TransformerLens: name after "blocks.{i}." -> canonical per-block hook name
_TL_BLOCK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "ln1.hook_normalized": "attn_in",
    "hook_attn_in": "attn_in",
    "ln2.hook_normalized": "mlp_in",
    # TransformerLens' hook_mlp_in is the residual stream fed to ln2 (pre-norm); canonical mlp_in
    # is post-norm, so hook_mlp_in is resid_mid (the parallel case has no resid_mid: refused).
    "hook_mlp_in": "resid_mid",
    "mlp.hook_post": "mlp_hidden",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
}
_TL_GLOBAL = {
    "hook_embed": "embed",
    "ln_final.hook_normalized": "unembed_in",
}
# Architectures whose TransformerLens hook_attn_out / hook_mlp_out are taken after a post-norm.
POST_NORM_ARCHITECTURES = frozenset({"gemma2", "gemma3", "gemma3_text", "olmo2"})

_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_point_from_transformerlens(name: str, *, architecture: str | None = None) -> str:
    """``"blocks.5.ln2.hook_normalized"`` -> ``"5.mlp_in"``.

    ``architecture`` (a ``model_type`` such as ``"gemma2"``) is optional: for post-norm
    architectures TransformerLens' ``hook_attn_out``/``hook_mlp_out`` sit after the post-norm and
    translate to ``attn_out_normed``/``mlp_out_normed``; without it they map to ``attn_out``/``mlp_out``.
    """
    if name in _TL_GLOBAL:
        return _TL_GLOBAL[name]
    m = _TL_RE.match(name)
    if m is not None and m.group(2) in _TL_BLOCK:
        hook = _TL_BLOCK[m.group(2)]
        if architecture in POST_NORM_ARCHITECTURES and hook in ("attn_out", "mlp_out"):
            hook += "_normed"
        return f"{int(m.group(1))}.{hook}"
    raise TopologyError(
        f"TransformerLens hook {name!r} has no canonical hook point",
        hint="supported: "
        + ", ".join(_TL_GLOBAL)
        + ", blocks.{i}."
        + ", blocks.{i}.".join(_TL_BLOCK)
        + " (attention internals such as hook_z/hook_pattern and hook_pos_embed are not hook points)",
    )


_BLOCK_LIST_NAMES = ("layers", "h", "blocks", "layer")
_MODULE_RE = re.compile(r"^(?:.*\.)?(?:" + "|".join(_BLOCK_LIST_NAMES) + r")\.(\d+)(?:\.(.+))?$")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_NAMES = ("self_attn", "attn", "attention")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
# block-relative paths of pre-MLP norms whose meaning is unambiguous across architectures
_MLP_PRE_NORMS = ("ln_2", "pre_feedforward_layernorm")
_ATTN_PRE_NORMS = ("ln_1", "input_layernorm")


def hook_point_from_module_path(path: str, role: Literal["input", "output"]) -> str:
    """``("layers.5.mlp", "input")`` -> ``"5.mlp_in"``; ``("model.layers.5", "output")`` -> ``"5.resid_post"``.

    Accepts any prefix before the block list (``model.``, ``transformer.``, ``gpt_neox.``,
    ``base_model.model.``) and block lists named ``layers``, ``h``, ``blocks`` or ``layer``.
    """
    if role not in ("input", "output"):
        raise TopologyError(f"role must be 'input' or 'output', got {role!r}")
    m = _MODULE_RE.match(path)
    if m is not None:
        i, rest = int(m.group(1)), m.group(2)
        hook: str | None = None
        if rest is None:
            hook = "resid_pre" if role == "input" else "resid_post"
        elif rest in _MLP_NAMES:
            hook = "mlp_in" if role == "input" else "mlp_out"
        elif rest in _ATTN_NAMES:
            hook = "attn_in" if role == "input" else "attn_out"
        elif (
            "." in rest
            and rest.split(".", 1)[0] in _MLP_NAMES
            and rest.split(".", 1)[1] in _DOWN_NAMES
        ):
            hook = "mlp_hidden" if role == "input" else "mlp_out"
        elif rest in _MLP_PRE_NORMS:
            hook = "resid_mid" if role == "input" else "mlp_in"
        elif rest in _ATTN_PRE_NORMS:
            hook = "resid_pre" if role == "input" else "attn_in"
        if hook is not None:
            return f"{i}.{hook}"
        if rest == "post_attention_layernorm":
            raise TopologyError(
                f"{path!r} means different things per architecture (pre-MLP norm in Llama, "
                "post-attention norm in Gemma 2 / OLMo 2)",
                hint="resolve it on a loaded model: topology_of(model).hook_point_of_module(path, role)",
            )
    raise TopologyError(
        f"module path {path!r} ({role}) does not name a canonical hook point",
        hint="recognised: <prefix.>{layers|h|blocks}.{i} (resid_pre/resid_post), ...{i}.{mlp|feed_forward} "
        "(mlp_in/mlp_out), ...{i}.{self_attn|attn|attention} (attn_in/attn_out), ...{i}.mlp.<down proj> "
        "input (mlp_hidden), ...{i}.{ln_1|input_layernorm|ln_2|pre_feedforward_layernorm}",
    )
