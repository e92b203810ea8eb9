"""The OpenAI-compatible policy backend: evaluate a served checkpoint (e.g. `vllm serve`).

Prompts go out as token ids (the completions API accepts a list of ints) so the conversation
stays token-in; with vLLM's ``return_tokens_as_token_ids`` the sampled ids and their log-probs
come back token-out. A server that returns only text (and maybe per-token log-probs without
ids) is still usable for evaluation: its text is re-tokenised once, and log-probs are reported
as NaN when they cannot be aligned with those ids — fine for pass@k, not for training.

With ``weights_folder`` set (server mode: a vLLM server started with ``VLLM_SERVER_DEV_MODE=1``
that can read that folder), :meth:`OpenAIPolicy.update_weights` pushes new weights into the
server (:func:`agent.vllm_server.push_weights`) and resets its prefix cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from agent.policy import Generation, finish_reason


class OpenAIPolicy:
    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        tokenizer,
        temperature: float = 1.0,
        top_p: float = 1.0,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 16,
        weights_folder: str | os.PathLike[str] | None = None,
        weights_dtype: str = "float32",
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        for url in urls or [""]:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must be an http(s) URL, got {url!r}")
        # several replicas of one model (server mode): requests go round-robin over them
        self.base_urls = [url.rstrip("/") for url in urls]
        self.base_url = self.base_urls[0]
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.concurrency = concurrency
        self.weights_folder = weights_folder
        self.weights_dtype = weights_dtype
        self.last_sync_s = 0.0
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.clients = [
            httpx.Client(base_url=url, headers=headers, timeout=timeout) for url in self.base_urls
        ]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        *,
        temperature: float | None = None,
    ) -> list[Generation]:
        temperature = self.temperature if temperature is None else temperature
        n = len(self.clients)

        def one(item: tuple[int, Sequence[int]]) -> Generation:
            i, prompt = item
            return self._one(self.clients[i % n], list(prompt), max_new_tokens, stop, temperature)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, enumerate(prompts)))

    def _one(
        self,
        client: httpx.Client,
        prompt: list[int],
        max_new_tokens: int,
        stop: Sequence[str],
        temperature: float,
    ) -> Generation:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": self.top_p,
            "logprobs": 1,
            "stop": list(stop) or None,
            # vLLM extensions; other servers ignore unknown fields
            "include_stop_str_in_output": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        response = client.post("/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(
                f"{client.base_url}completions answered {response.status_code}: {response.text[:300]}"
            )
        choice = response.json()["choices"][0]
        ids, logprobs = self._tokens(choice)
        reason = finish_reason(choice.get("finish_reason"), choice.get("stop_reason"))
        return Generation(ids, logprobs, reason)

    def _tokens(self, choice: dict) -> tuple[list[int], list[float]]:
        info = choice.get("logprobs") or {}
        tokens = info.get("tokens") or []
        token_logprobs = info.get("token_logprobs") or []
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            ids = [int(t.split(":", 1)[1]) for t in tokens]
            return ids, [float(x) if x is not None else math.nan for x in token_logprobs]
        ids = self.tokenizer.encode(choice.get("text", ""), add_special_tokens=False)
        if len(token_logprobs) == len(ids):
            return ids, [float(x) if x is not None else math.nan for x in token_logprobs]
        return ids, [math.nan] * len(ids)

    def update_weights(self, named_tensors: Iterable) -> None:
        if self.weights_folder is None:
            raise NotImplementedError(
                "the openai backend serves fixed weights unless it is given a weights_folder the "
                "server reads (server mode); evaluate checkpoints with it, or train with hf / vllm"
            )
        import time

        import torch

        from agent.vllm_server import push_weights

        started = time.perf_counter()
        dtype = getattr(torch, self.weights_dtype)
        push_weights(self.base_urls, named_tensors, self.weights_folder, dtype=dtype)
        self.last_sync_s = time.perf_counter() - started
