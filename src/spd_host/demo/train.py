"""Reproducible trainer for the bundled demo model and its tokenizer.

``python -m spd_host.demo.train --out DIR --seed 0`` trains, on the Tiny Shakespeare corpus shipped
in ``spd_host/demo/corpus``:

1. a byte-level BPE tokenizer (the ``tokenizers`` library, vocabulary 2048, one special token
   ``<|endoftext|>`` used as BOS/EOS/UNK), saved as a Hugging Face fast-tokenizer directory;
2. a GPT-2 architecture model (``transformers.GPT2LMHeadModel``: Conv1D projections, fused
   ``c_attn``), 4 layers, d_model 128, 4 heads, 256 positions, tied embeddings,

and writes both to ``DIR`` with ``save_pretrained(safe_serialization=True)`` plus ``training.json``
(seed, steps, final train/held-out loss, the unigram baseline, the corpus sha256).

The token stream is the corpus encoded as one document followed by ``<|endoftext|>``, exactly what
``spd_host.data`` produces for the source ``"demo"``; the last tenth of it is held out
(``spd_host.data.heldout_start``) and never trained on, so ``TokenDatasetSpec(split="heldout")`` is
a fair evaluation set for the shipped model at any sequence length.

Determinism: every random draw (init, window sampling, dropout) comes from ``--seed``; the run
uses ``torch.use_deterministic_algorithms(True)`` and a fixed thread count (``--threads``, default 2),
so the same seed, thread count and torch build reproduce the same weights bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from spd_host.data import heldout_start
from spd_host.demo import demo_corpus_path

SPECIAL_TOKEN = "<|endoftext|>"


class TrainConfig(BaseModel):
    """Every knob of a demo training run (the defaults are the shipped model's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    vocab_size: int = 2048
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.1
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.05
    threads: int = 1
    max_corpus_chars: int | None = None
    """Truncate the corpus (for fast tests of the trainer itself)."""
    eval_batch_size: int = 64
    train_eval_chunks: int = 512
    """How many (evenly spaced) train chunks the final train loss is measured on."""


class TrainResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    config: TrainConfig
    corpus_sha256: str
    n_params: int
    n_train_tokens: int
    n_heldout_tokens: int
    final_train_loss: float
    final_heldout_loss: float
    unigram_heldout_loss: float
    """Cross-entropy of the held-out tokens under the train-split unigram distribution (add-one)."""
    unigram_entropy: float
    """Entropy of the unigram distribution of the whole token stream (nats)."""
    log_vocab: float
    train_seconds: float
    losses: list[float]
    """Training loss every 50 steps (and at the last step)."""
    torch_version: str
    transformers_version: str
    tokenizers_version: str
    python_version: str


def train_tokenizer(
    text: str, vocab_size: int, model_max_length: int
):  # -> PreTrainedTokenizerFast
    """Byte-level BPE on ``text``, wrapped as a transformers fast tokenizer (GPT-2 conventions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * cosine)


@torch.no_grad()
def mean_token_loss(
    model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int
) -> float:
    """Mean next-token cross-entropy over the non-overlapping ``seq_len`` chunks of ``tokens``."""
    n_seq = tokens.numel() // seq_len
    chunks = tokens[: n_seq * seq_len].view(n_seq, seq_len)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, n_seq, batch_size):
        batch = chunks[i : i + batch_size]
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_losses(
    train: torch.Tensor, heldout: torch.Tensor, vocab_size: int
) -> tuple[float, float]:
    """(held-out cross-entropy under the add-one train unigram, entropy of the full-stream unigram)."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    heldout_ce = float(-logp[heldout].mean())
    full = torch.bincount(torch.cat([train, heldout]), minlength=vocab_size).double()
    p = full[full > 0] / full.sum()
    return heldout_ce, float(-(p * p.log()).sum())


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    corpus: Path | None = None,
    progress: bool = True,
    log_every: bool = False,
) -> TrainResult:
    """Train tokenizer and model per ``cfg`` and save both (plus ``training.json``) to ``out``."""
    import tokenizers
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)

    corpus = corpus or demo_corpus_path()
    raw = corpus.read_bytes()
    text = raw.decode("utf-8")
    if cfg.max_corpus_chars is not None:
        text = text[: cfg.max_corpus_chars]

    tokenizer = train_tokenizer(text, cfg.vocab_size, cfg.n_positions)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    stream = torch.tensor(ids, dtype=torch.long)
    split = heldout_start(stream.numel())
    train_tokens, heldout_tokens = stream[:split], stream[split:]
    vocab = len(tokenizer)

    model_cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    max_start = train_tokens.numel() - cfg.seq_len
    offsets = torch.arange(cfg.seq_len)

    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("training demo model", total=cfg.steps)
        for step in range(cfg.steps):
            starts = torch.randint(0, max_start + 1, (cfg.batch_size,), generator=gen)
            batch = train_tokens[starts[:, None] + offsets]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == cfg.steps - 1:
                losses.append(round(loss.item(), 4))
                bar.update(task, description=f"training demo model (loss {loss.item():.3f})")
                if log_every:
                    print(
                        f"step {step}/{cfg.steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s",
                        flush=True,
                    )
            bar.advance(task)
    train_seconds = time.perf_counter() - t0
    model.eval()

    # the train loss on an evenly spaced sample of train chunks (the held-out loss uses all of them)
    n_chunks = train_tokens.numel() // cfg.seq_len
    pick = torch.linspace(0, n_chunks - 1, min(n_chunks, cfg.train_eval_chunks)).long()
    sample = train_tokens[: n_chunks * cfg.seq_len].view(n_chunks, cfg.seq_len)[pick].reshape(-1)
    final_train = mean_token_loss(model, sample, cfg.seq_len, cfg.eval_batch_size)
    final_heldout = mean_token_loss(model, heldout_tokens, cfg.seq_len, cfg.eval_batch_size)
    uni_ce, uni_h = unigram_losses(train_tokens, heldout_tokens, vocab)

    result = TrainResult(
        config=cfg,
        corpus_sha256=hashlib.sha256(raw).hexdigest(),
        n_params=n_params,
        n_train_tokens=train_tokens.numel(),
        n_heldout_tokens=heldout_tokens.numel(),
        final_train_loss=round(final_train, 5),
        final_heldout_loss=round(final_heldout, 5),
        unigram_heldout_loss=round(uni_ce, 5),
        unigram_entropy=round(uni_h, 5),
        log_vocab=round(math.log(vocab), 5),
        train_seconds=round(train_seconds, 1),
        losses=losses,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        tokenizers_version=tokenizers.__version__,
        python_version=platform.python_version(),
    )

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out / "tokenizer_config.json")
    (out / "training.json").write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    return result


def _portable_tokenizer_config(path: Path) -> None:
    """Name the generic fast-tokenizer class, which transformers 4.x and 5.x both resolve.

    transformers 5 writes ``TokenizersBackend``, a class 4.x does not have; the tokenizer itself is
    fully described by ``tokenizer.json`` either way.
    """
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(
        prog="python -m spd_host.demo.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus", type=Path, default=None, help="text file (default: the bundled corpus)"
    )
    for name, field in TrainConfig.model_fields.items():
        if name == "seed":
            continue
        flag = "--" + name.replace("_", "-")
        kind = float if field.annotation is float else int
        parser.add_argument(flag, type=kind, default=field.default, dest=name)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--log", action="store_true", help="print the loss every 50 steps")
    args = vars(parser.parse_args(argv))
    out, corpus, quiet, log = (
        args.pop("out"),
        args.pop("corpus"),
        args.pop("quiet"),
        args.pop("log"),
    )
    cfg = TrainConfig(**args)
    result = train(cfg, out, corpus=corpus, progress=not quiet, log_every=log)
    summary = {
        k: getattr(result, k)
        for k in (
            "n_params",
            "train_seconds",
            "final_train_loss",
            "final_heldout_loss",
            "unigram_heldout_loss",
            "unigram_entropy",
            "log_vocab",
        )
    }
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
