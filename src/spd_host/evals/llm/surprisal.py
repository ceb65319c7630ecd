"""The surprisal suite (delphi's surprisal scorer): does reading the label make a causal LM
less surprised by the windows on which the component fires?

For every window, the LM reads a short prefix that describes a feature, then the window's
text; the window's loss is the mean cross-entropy of its tokens after the first (the first
token's loss is not counted, as delphi's scorer does). The prefix names either the label or a
null description (``null_description``, delphi's "Various unrelated sentences."). A window's
score is the loss decrease the label brings (null loss - label loss); a component's score is
the AUROC of that decrease separating its activating windows from windows on which it does
not fire (chance 0.5), and ``difference`` the mean decrease on activating minus on
non-activating windows. delphi also puts three worked examples into its prefix; this prefix
has none (set ``--model`` to a stronger LM for a stronger judge).

The LM is a local directory or a model in the local Hugging Face cache; by default the
decomposition's own base model and tokenizer (a weak judge, but present everywhere: the
documented baseline on the demo). A prefix longer than the LM's context is cut from the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spd_host.adapter import DecompositionAdapter
from spd_host.evals.llm.hf_local import local_model_dir, pick_device
from spd_host.evals.llm.local_scorer import LocalScorerResult, ScoreTexts, run_local_scorer
from spd_host.evals.llm.scorer_configs import SurprisalConfig

INTRO = (
    "Below is a description of a feature of a language model, followed by a passage of text "
    "in which that feature may be active.\n"
)


def prefix_text(description: str) -> str:
    return f"{INTRO}Description: {description}\nText:\n"


def window_losses(
    model: Any,
    tokenizer: Any,
    prefix: str,
    texts: Sequence[str],
    *,
    batch_size: int,
    device: str,
) -> list[float]:
    """Mean cross-entropy of each text's tokens after its first, the LM having read ``prefix``
    (0.0 for a text of fewer than two tokens)."""
    import torch
    import torch.nn.functional as F

    max_len = _context(model)
    pre = _ids(tokenizer, prefix)
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        rows, spans = [], []
        for text in texts[i : i + batch_size]:
            win = _ids(tokenizer, text)[: max_len - 1]
            p = pre[-(max_len - len(win)) :] if len(pre) + len(win) > max_len else pre
            rows.append(p + win)
            spans.append((len(p), len(win)))
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = F.log_softmax(logits.double(), dim=-1).cpu()
        for j, (start, n) in enumerate(spans):
            if n < 2:
                out.append(0.0)
                continue
            # logits at t predict token t + 1: window tokens 1..n-1 sit at start+1 .. start+n-1
            targets = ids[j, start + 1 : start + n]
            lp = logp[j, start : start + n - 1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out.append(float(-lp.mean()))
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _context(model: Any) -> int:
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 1:
            return v
    return 2048


def lm_scorer(model: Any, tokenizer: Any, config: SurprisalConfig, device: str) -> ScoreTexts:
    def score(label: str, texts: Sequence[str]) -> list[float]:
        bs = config.batch_size
        null_prefix = prefix_text(config.null_description)
        null = window_losses(model, tokenizer, null_prefix, texts, batch_size=bs, device=device)
        with_label = window_losses(
            model, tokenizer, prefix_text(label), texts, batch_size=bs, device=device
        )
        return [a - b for a, b in zip(null, with_label, strict=True)]

    return score


def run_surprisal(adapter: DecompositionAdapter, config: SurprisalConfig) -> LocalScorerResult:
    notes: list[str] = []
    if config.model is None:
        name = f"base model of {adapter.decomposition_id}"
        notes.append(
            "scored with the decomposition's own base model (the default; a weak judge): "
            "pass --model for a stronger local LM"
        )
    else:
        name = config.model

    def make() -> ScoreTexts:
        device = pick_device(config.device)
        if config.model is None:
            model = adapter.load_base_model()
            device = str(next(model.parameters()).device)
            tokenizer = adapter.load_tokenizer()
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = local_model_dir(config.model, "causal LM")
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
            model = model.to(device).eval()  # type: ignore[arg-type]
        return lm_scorer(model, tokenizer, config, device)

    return run_local_scorer(
        "surprisal",
        adapter,
        config,
        model_name=name,
        baseline=False,
        make_scorer=make,
        settings={"null_description": config.null_description, "intro": INTRO},
        notes=notes,
    )
