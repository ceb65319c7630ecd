"""A local explainer: a Hugging Face causal LM run in this process, no network, no key.

``--provider local --model PATH`` loads the model and tokenizer from a local directory (or a
model already in the Hugging Face cache: ``local_files_only``, nothing is downloaded), renders
the strategy's system and user prompts with the tokenizer's chat template, and generates
greedily. The engine is vLLM's offline ``LLM`` when vLLM is installed and a CUDA device is
present (with the label schema as a structured-output constraint), else transformers
``generate``; ``SPD_HOST_LOCAL_ENGINE=transformers|vllm`` forces one.

transformers has no schema constraint, so the schema is also stated in the system prompt and
the answer is the first balanced JSON object in the generated text
(:func:`extract_json_object`), parsed as strictly as any provider's. Generations run one at a
time in a worker thread (the model is not re-entrant); the runner's concurrency then only
overlaps prompt building with generation. Calls are free (``pricing`` is zero), so the cost
cap never stops a local run. The offline PMI baseline (``--provider offline``) stays the
documented floor: this is an LLM, and its labels are not marked as baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spd_host.autointerp.answer import parse_reply
from spd_host.autointerp.providers.base import (
    ClientOptions,
    Completion,
    CompletionRequest,
    PermanentError,
    Pricing,
    Provider,
)
from spd_host.errors import ConfigError

ENGINE_ENV = "SPD_HOST_LOCAL_ENGINE"


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """The answer format, said in words (transformers cannot enforce a schema)."""
    return (
        "\n\nAnswer with one JSON object and nothing else, matching this JSON schema:\n"
        + json.dumps(schema, sort_keys=True)
    )


def extract_json_object(text: str) -> str:
    """The first balanced ``{...}`` in ``text`` (strings and escapes respected), else ``text``
    unchanged so that the strict parser reports what was wrong."""
    start = text.find("{")
    while start != -1:
        depth, in_str, escaped = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return text


def chat_messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_chat(tokenizer: Any, system: str, user: str) -> str:
    """The prompt through the tokenizer's chat template; a template without a system role
    (it raises) gets the system prompt folded into the user turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the local model's tokenizer has no chat template",
            hint="use an instruction-tuned model whose tokenizer_config.json has a chat_template",
        )
    try:
        text = tokenizer.apply_chat_template(
            chat_messages(system, user), tokenize=False, add_generation_prompt=True
        )
    except Exception:  # e.g. jinja TemplateError "System role not supported"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{system}\n\n{user}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    return str(text)


def _engine() -> str:
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced in ("transformers", "vllm"):
        return forced
    if forced:
        raise ConfigError(f"{ENGINE_ENV}={forced!r}: expected 'transformers' or 'vllm'")
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm" if torch.cuda.is_available() else "transformers"


class _InProcessClient:
    """One generation at a time in a worker thread; the answer parsed from the text."""

    _lock: asyncio.Lock

    def _generate(self, request: CompletionRequest) -> tuple[str, int, int]:
        raise NotImplementedError

    async def complete(self, request: CompletionRequest) -> Completion:
        async with self._lock:
            try:
                generated, n_in, n_out = await asyncio.to_thread(self._generate, request)
            except ConfigError:
                raise
            except Exception as err:  # a model that cannot run is not worth retrying
                raise PermanentError(
                    f"local: generation failed: {type(err).__name__}: {err}"
                ) from err
        raw = json.dumps({"generated": generated})
        found = extract_json_object(generated)
        truncated = n_out >= request.max_output_tokens and found == generated
        answer, data = parse_reply(
            found,
            truncated=truncated,
            answer_format=request.answer_format,
            raw=raw,
            input_tokens=n_in,
            output_tokens=n_out,
        )
        return Completion(answer=answer, data=data, raw=raw, input_tokens=n_in, output_tokens=n_out)

    async def aclose(self) -> None:
        return None


class TransformersClient(_InProcessClient):
    """transformers ``generate`` (greedy) with the chat template. ``generate_kwargs`` are
    passed to ``generate`` (e.g. a logits processor that constrains decoding)."""

    def __init__(self, model: str, *, generate_kwargs: Mapping[str, Any] | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
        except OSError as err:
            raise ConfigError(
                f"provider 'local': cannot load model {model!r} from local files: {err}",
                hint="--model must be a local model directory (config.json, weights, tokenizer) "
                "or a model already in the Hugging Face cache; nothing is downloaded",
            ) from None
        self._model.eval()
        self._generate_kwargs = dict(generate_kwargs or {})
        self._lock = asyncio.Lock()

    def _generate(self, request: CompletionRequest) -> tuple[str, int, int]:
        system = request.system + schema_instruction(request.schema)
        text = render_chat(self._tokenizer, system, request.prompt)
        enc = self._tokenizer(text, return_tensors="pt", add_special_tokens=False)
        eos = self._tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_output_tokens,
            "do_sample": False,
            "pad_token_id": self._tokenizer.pad_token_id
            if self._tokenizer.pad_token_id is not None
            else eos,
        }
        kwargs.update(self._generate_kwargs)
        with self._torch.inference_mode():
            out = self._model.generate(**enc, **kwargs)
        n_in = int(enc["input_ids"].shape[1])
        new = out[0, n_in:]
        return str(self._tokenizer.decode(new, skip_special_tokens=True)), n_in, int(new.shape[0])


class VllmClient(_InProcessClient):
    """vLLM's offline engine, greedy, with the schema as a structured-output constraint.
    Not exercised by the test suite (no vLLM on the CPU machines)."""

    def __init__(self, model: str) -> None:
        from vllm import LLM

        self._llm = LLM(model=model)
        self._tokenizer = self._llm.get_tokenizer()
        self._lock = asyncio.Lock()

    def _generate(self, request: CompletionRequest) -> tuple[str, int, int]:
        from vllm import SamplingParams

        try:  # vLLM >= 0.10
            from vllm.sampling_params import StructuredOutputsParams

            constraint: dict[str, Any] = {
                "structured_outputs": StructuredOutputsParams(json=dict(request.schema))
            }
        except ImportError:  # older vLLM
            from vllm.sampling_params import GuidedDecodingParams

            constraint = {"guided_decoding": GuidedDecodingParams(json=dict(request.schema))}
        params = SamplingParams(temperature=0.0, max_tokens=request.max_output_tokens, **constraint)
        text = render_chat(
            self._tokenizer, request.system + schema_instruction(request.schema), request.prompt
        )
        (result,) = self._llm.generate([text], params, use_tqdm=False)
        out = result.outputs[0]
        return out.text, len(result.prompt_token_ids or []), len(out.token_ids)


def make_client(options: ClientOptions) -> TransformersClient | VllmClient:
    if not options.model:
        raise ConfigError(
            "provider 'local' needs --model PATH (a local Hugging Face model directory)",
            hint="e.g. --provider local --model ~/models/Qwen2.5-0.5B-Instruct",
        )
    model = (
        str(Path(options.model).expanduser())
        if Path(options.model).expanduser().exists()
        else options.model
    )
    if _engine() == "vllm":
        return VllmClient(model)
    return TransformersClient(model)


PROVIDER = Provider(
    name="local",
    description="a Hugging Face causal LM in this process (transformers, or vLLM when installed); no network",
    make_client=make_client,
    default_model="",
    api_key_env=None,
    key_required=False,
    default_pricing=Pricing(input_per_mtok=0.0, output_per_mtok=0.0),
)
