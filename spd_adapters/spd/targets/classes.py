"""Which ``pretrained_model_class`` strings name one of Goodfire's own target models.

A class path is only ever matched as a string against this table; nothing is imported. Goodfire's
code has kept these models under several packages over time (``simple_stories_train.models``,
``spd.pretrain.models``, ``param_decomp.pretrain.models``, ``param_decomp.experiments.lm.pretrain
.models``); the module and class names did not change. ``spd.pretrain.models.LlamaSimple`` (the
package re-export) is accepted too.
"""

from __future__ import annotations

from spd_host.errors import FormatError

PACKAGES = (
    "spd.pretrain.models",
    "param_decomp.pretrain.models",
    "param_decomp.experiments.lm.pretrain.models",
    "simple_stories_train.models",
)
#: module file -> class (== ``model_type`` in ``model_config.yaml``)
MODULES = {
    "llama_simple": "LlamaSimple",
    "llama_simple_mlp": "LlamaSimpleMLP",
    "gpt2_simple": "GPT2Simple",
}
SUPPORTED = tuple(f"{PACKAGES[0]}.{m}.{c}" for m, c in MODULES.items())


def target_model_type(class_path: str) -> str | None:
    """``model_type`` of a Goodfire target class path; None when the path is not Goodfire's.

    A path inside one of Goodfire's model packages that is not one of the supported classes
    (e.g. their ``gpt2.GPT2`` or ``llama.Llama``) is a :class:`FormatError`, not None: it is
    Goodfire's, just not (yet) implemented here.
    """
    for package in PACKAGES:
        if not class_path.startswith(package + "."):
            continue
        module, _, cls = class_path[len(package) + 1 :].rpartition(".")
        if (module and MODULES.get(module) == cls) or (not module and cls in MODULES.values()):
            return cls
        raise FormatError(
            f"pretrained_model_class {class_path!r}: this Goodfire target model is not supported",
            hint=f"supported Goodfire targets: {', '.join(SUPPORTED)} (or the same under "
            f"{', '.join(PACKAGES[1:])})",
        )
    return None
