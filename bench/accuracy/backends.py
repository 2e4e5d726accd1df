"""Where completions come from: one offline vLLM engine with the EM-INF processor, or
an OpenAI-compatible server (``em-inf serve``) through the official ``openai`` client.

Both take the same :class:`Request` list and return :class:`Completion` s in the
same order; each
request carries its own temperature, seed and EM-INF switch, so one engine serves every
setting and the settings' requests share batches.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from bench.accuracy.settings import Setting
from em_inf.config import REQUEST_KEY


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to make.

    Attributes:
        messages: OpenAI-style chat messages.
        setting: the decoding setting (temperature, EM-INF on/off and its values).
        seed: the request's sampling seed, ``None`` for greedy decoding.
        max_tokens: most tokens to generate.
    """

    messages: list[dict[str, str]]
    setting: Setting
    seed: int | None
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class Completion:
    """A response text and why it ended (``"stop"``, or ``"length"`` at max_tokens)."""

    text: str
    finish_reason: str | None


class Backend(Protocol):
    description: dict[str, Any]

    def generate(self, requests: list[Request]) -> list[Completion]: ...

    def close(self) -> None: ...


class OfflineBackend:
    """``vllm.LLM(model, logits_processors=[EMInf], **engine_args)``.

    Args:
        model: a local checkpoint directory or a hub id.
        engine_args: passed to ``vllm.LLM`` unchanged (``tensor_parallel_size``,
            ``dtype``, ``max_model_len``, ``gpu_memory_utilization``...).
    """

    def __init__(self, model: str, engine_args: dict[str, Any]) -> None:
        import vllm

        from em_inf import EMInf

        self.llm = vllm.LLM(model=model, logits_processors=[EMInf], **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.description = {
            "backend": "offline",
            "model": model,
            "engine_args": engine_args,
            "vllm_version": vllm.__version__,
        }

    def _prompt(self, messages: list[dict[str, str]]) -> dict[str, list[int]]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The template already holds any BOS token; do not add another.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return {"prompt_token_ids": ids}

    def generate(self, requests: list[Request]) -> list[Completion]:
        from vllm import SamplingParams

        prompts = [self._prompt(request.messages) for request in requests]
        params = [
            SamplingParams(
                temperature=request.setting.temperature,
                seed=request.seed,
                max_tokens=request.max_tokens,
                extra_args={REQUEST_KEY: request.setting.request_value()},
            )
            for request in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=True)
        return [
            Completion(output.outputs[0].text, output.outputs[0].finish_reason)
            for output in outputs
        ]

    def close(self) -> None:
        del self.llm


class ServerBackend:
    """An OpenAI-compatible server, e.g. ``em-inf serve MODEL``; per-request EM-INF
    settings go in the body as ``{"em_inf": {...}}`` or ``{"em_inf": false}``.

    Args:
        url: the server's base URL (``http://host:port`` or ``.../v1``).
        model: the served model's name; ``None`` takes the first one listed.
        concurrency: requests in flight at once.
    """

    def __init__(
        self,
        url: str,
        model: str | None,
        *,
        api_key: str = "EMPTY",
        concurrency: int = 32,
        timeout: float = 3600.0,
    ) -> None:
        import openai

        base_url = url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)
        self.model = model or self.client.models.list().data[0].id
        self.concurrency = concurrency
        self.description = {
            "backend": "server",
            "url": base_url,
            "model": self.model,
            "concurrency": concurrency,
            "openai_version": openai.__version__,
        }

    def _complete(self, request: Request) -> Completion:
        response = self.client.chat.completions.create(
            model=self.model,
            messages=request.messages,
            temperature=request.setting.temperature,
            max_tokens=request.max_tokens,
            seed=request.seed,
            extra_body={REQUEST_KEY: request.setting.request_value()},
        )
        choice = response.choices[0]
        return Completion(choice.message.content or "", choice.finish_reason)

    def generate(self, requests: list[Request]) -> list[Completion]:
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = pool.map(self._complete, requests)
            return list(tqdm(results, total=len(requests), desc="requests"))

    def close(self) -> None:
        self.client.close()
