"""The local explainer on a tiny chat model built here (Llama config, random weights, a BPE
tokenizer with a chat template, saved in the standard Hugging Face layout): the plumbing from
prompt to stored label, with no network. Random weights say nothing useful, so one test forces
a known answer through a logits processor (constrained decoding) and checks it comes back
parsed; another runs the free model through the runner and gets failure rows, not labels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from factories import make_evidence
from helpers import rows

from spd_host.autointerp.answer import ANSWER_SCHEMA
from spd_host.autointerp.config import AutointerpConfig
from spd_host.autointerp.providers.base import CompletionRequest
from spd_host.autointerp.providers.local_provider import (
    TransformersClient,
    extract_json_object,
    render_chat,
    schema_instruction,
)
from spd_host.autointerp.runner import label_components
from spd_host.errors import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ANSWER = {"label": "cat tokens", "confidence": "low", "reasoning": "forced"}


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tiny-chat")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [json.dumps(ANSWER), "The cat sat on the mat.", "<|system|> <|user|> <|assistant|>"]
    tok.train_from_iterator(corpus * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=TEMPLATE
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


class ForceTokens:
    """A logits processor that makes greedy decoding emit ``target`` then EOS."""

    def __init__(self, target: list[int], prompt_len: int, eos: int) -> None:
        self.target, self.prompt_len, self.eos = target, prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        want = self.target[step] if step < len(self.target) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, want] = 0.0
        return forced


def _request(max_tokens: int = 120) -> CompletionRequest:
    return CompletionRequest(
        system="SYSTEM PART",
        prompt="USER PART MARK1",
        schema=ANSWER_SCHEMA,
        max_output_tokens=max_tokens,
        evidence=make_evidence(1),
    )


def test_forced_answer_comes_back_parsed_with_token_counts(tiny_chat_model: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    req = _request()
    prompt = render_chat(tokenizer, req.system + "\n\nAnswer with", req.prompt)
    assert prompt.startswith("<|system|>SYSTEM PART") and prompt.endswith("<|assistant|>")
    # prose around the JSON: the extraction finds the object
    target = tokenizer("Sure! " + json.dumps(ANSWER) + " done", add_special_tokens=False)
    client = TransformersClient(str(tiny_chat_model))
    full = render_chat(tokenizer, req.system + schema_instruction(req.schema), req.prompt)
    n_prompt = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    force = ForceTokens(target["input_ids"], n_prompt, tokenizer.eos_token_id)
    client._generate_kwargs["logits_processor"] = transformers.LogitsProcessorList([force])
    completion = asyncio.run(client.complete(req))
    assert completion.answer.label == "cat tokens" and completion.answer.confidence == "low"
    assert completion.input_tokens == n_prompt
    assert completion.output_tokens == len(target["input_ids"]) + 1  # the answer, then EOS
    assert json.loads(completion.raw)["generated"].startswith("Sure! {")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ('noise {"a": "}{", "b": {"c": 1}} tail', '{"a": "}{", "b": {"c": 1}}'),
        ('x {"q": "say \\"hi\\" }"} y', '{"q": "say \\"hi\\" }"}'),
        ("no object here", "no object here"),
        ('{"unclosed": 1', '{"unclosed": 1'),
    ],
)
def test_json_extraction(text: str, want: str) -> None:
    assert extract_json_object(text) == want


def test_runner_with_a_random_model_records_failures_offline(
    tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = tmp_path / "l.db"
    config = AutointerpConfig(
        provider="local", model=str(tiny_chat_model), max_output_tokens=16, max_attempts=1,
        cost_cap_usd=0.0,  # free calls: a zero cap never stops a local run
    )  # fmt: skip
    report = label_components(
        [make_evidence(1), make_evidence(2)],
        config,
        db_path=db,
        harvest_id="h",
        decomposition_id="t:d",
    )
    assert (report.n_labelled, report.n_failed, report.spent_usd) == (0, 2, 0.0)
    for row in rows(db):
        assert row.status == "failed" and "malformed" in (row.error or "")
        assert row.input_tokens > 0 and 0 < row.output_tokens <= 16


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load model"):
        TransformersClient(str(tmp_path / "nope"))
    config = AutointerpConfig(provider="local")
    with pytest.raises(ConfigError, match="needs --model PATH"):
        label_components(
            [make_evidence(1)],
            config,
            db_path=tmp_path / "l.db",
            harvest_id="h",
            decomposition_id="t:d",
        )
