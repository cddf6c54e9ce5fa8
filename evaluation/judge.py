"""An LLM judge through any OpenAI-compatible `/chat/completions` endpoint (GPT-4, vLLM, a local server).

Configured from the environment, so keys never sit in a config or a command line:
`EVAL_JUDGE_URL` (e.g. https://api.openai.com/v1), `EVAL_JUDGE_MODEL` (e.g. gpt-4-0613) and
`EVAL_JUDGE_API_KEY` (falls back to `OPENAI_API_KEY`; may be empty for a local server). Without a URL and a
model there is no judge, and judge-scored benchmarks report "not scored".
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass


class JudgeError(RuntimeError):
    """The judge endpoint failed (network, HTTP status, malformed reply)."""


@dataclass(frozen=True)
class Judge:
    url: str
    model: str
    api_key: str = ""
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> "Judge | None":
        url, model = os.environ.get("EVAL_JUDGE_URL", ""), os.environ.get("EVAL_JUDGE_MODEL", "")
        if not url or not model:
            return None
        return cls(url.rstrip("/"), model, os.environ.get("EVAL_JUDGE_API_KEY", os.environ.get("OPENAI_API_KEY", "")))

    def describe(self) -> str:
        return f"{self.model} at {self.url}"

    def complete(self, prompt: str, temperature: float = 0.0, max_tokens: int = 16) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as err:
            raise JudgeError(f"judge {self.describe()}: {type(err).__name__}: {err}") from None
