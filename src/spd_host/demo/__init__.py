"""The bundled demo: a small GPT-2 trained on Tiny Shakespeare, its tokenizer and its corpus.

The demo exists so that every part of spd-host (harvest, autointerp, evals, every method plugin)
runs end to end on a fresh machine with no downloads. The artefacts in ``assets/`` are produced
by ``python -m spd_host.demo.train --out src/spd_host/demo/assets --seed 0`` and shipped as package
data; ``assets/training.json`` records how (seed, steps, losses, corpus sha256).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "demo"
"""What ``load_base_model``/``load_tokenizer`` accept, and what adapters report as the base model
name of demo decompositions."""

_HERE = Path(__file__).resolve().parent


def demo_model_dir() -> Path:
    """The Hugging Face-format directory of the demo model (config, safetensors, tokenizer files)."""
    return _HERE / "assets"


def demo_corpus_path() -> Path:
    """The Tiny Shakespeare text the demo model and tokenizer were trained on."""
    return _HERE / "corpus" / "tinyshakespeare.txt"


__all__ = ["DEMO_MODEL_NAME", "demo_corpus_path", "demo_model_dir"]
