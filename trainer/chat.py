"""A client of any OpenAI-compatible chat-completions server: llama.cpp's server, vLLM, Ollama, a
hosted API. Standard library only (urllib): one request per call, safe to share between threads.

    client = ChatClient(ChatServer("http://127.0.0.1:8080", model="SmolLM2"), timeout=30)
    text = client.complete([{"role": "user", "content": "Hi"}], max_tokens=20)

The URL: one that ends in /chat/completions is used as given; one that ends in /v1 gets
/chat/completions; any other gets /v1/chat/completions (http://host:8080 -> http://host:8080/v1/
chat/completions, the path every such server answers).

Failures raise `ChatError` with one line that says what happened: the server cannot be reached,
did not answer in time, answered with an HTTP error, or answered something that is not a chat
completion. Connection errors, timeouts, 429 and 5xx are retried with exponential backoff (a
Retry-After header is honoured up to MAX_BACKOFF_S); other 4xx (a wrong model name, a bad key)
are not: asking again gives the same answer.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from trainer.errors import ConfigError

BACKOFF_S = 0.5  # the first wait before a retry; doubled each time, with jitter
MAX_BACKOFF_S = 30.0
SNIPPET = 160  # characters of a bad answer quoted in an error


class ChatError(RuntimeError):
    """A request that failed: the message is one line, fit to print beside the latent."""


def completions_url(url: str) -> str:
    """The chat-completions endpoint of `url` (see the module's docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--llm-url {url!r}: give the server's http(s) address, e.g. http://127.0.0.1:8080 "
                          "or https://api.openai.com/v1")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return url
    base = url.split("?", 1)[0].rstrip("/")
    return f"{base}/chat/completions" if path.endswith("/v1") else f"{base}/v1/chat/completions"


@dataclass(frozen=True)
class ChatServer:
    """Where to ask and whom: the server's address as given, the model name it knows, a key."""

    url: str
    model: str
    api_key: str | None = None

    def __post_init__(self):
        if not self.model.strip():
            raise ConfigError("--llm-model: give the model name the server knows (e.g. the one /v1/models lists)")
        completions_url(self.url)

    @property
    def endpoint(self) -> str:
        return completions_url(self.url)

    def __repr__(self) -> str:  # never the key
        return f"ChatServer({self.endpoint!r}, model={self.model!r})"


class ChatClient:
    def __init__(self, server: ChatServer, timeout: float = 60.0, retries: int = 3, backoff: float = BACKOFF_S):
        if not timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"--retries must be 0 or more, got {retries}")
        self.server, self.timeout, self.retries, self.backoff = server, timeout, retries, backoff

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        """The assistant's answer to `messages` (greedy: temperature 0)."""
        body = json.dumps({"model": self.server.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0, "stream": False}).encode()
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Retry as e:
                if attempt == self.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    raise ChatError(f"{e}{tries}") from None
                time.sleep(e.wait if e.wait is not None else self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff * 2**attempt) * (0.5 + random.random() / 2)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.server.api_key:
            headers["Authorization"] = f"Bearer {self.server.api_key}"
        request = urllib.request.Request(self.server.endpoint, data=body, headers=headers, method="POST")
        where = self.server.endpoint
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e.read().decode(errors="replace"))
            message = f"{where} answered HTTP {e.code}" + (f": {detail}" if detail else "")
            if e.code == 429 or e.code >= 500:
                raise _Retry(message, _retry_after(e.headers.get("Retry-After"))) from None
            raise ChatError(message) from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"{where} did not answer within {self.timeout:g} s (--timeout)") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"{where} did not answer within {self.timeout:g} s (--timeout)") from None
            raise _Retry(f"cannot reach {where}: {reason} (is the server running?)") from None
        except (ConnectionError, OSError) as e:  # reset or closed mid-answer
            raise _Retry(f"{where} dropped the connection: {e}") from None
        except http.client.HTTPException as e:  # not HTTP at all, or an answer cut short
            raise _Retry(f"{where} answered something that is not HTTP, or cut its answer short "
                         f"({type(e).__name__}: {_snippet(str(e))})") from None
        return chat_content(raw, where)


def chat_content(raw: bytes, where: str = "the server") -> str:
    """The message text of a chat-completions answer, or ChatError saying why it is not one."""
    try:
        answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ChatError(f"{where} answered something that is not JSON: {_snippet(raw.decode(errors='replace'))!r}") from None
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ChatError(f"{where} answered JSON that is not a chat completion (no choices[0].message.content): "
                        f"{_snippet(json.dumps(answer))!r}") from None
    if not isinstance(content, str):
        raise ChatError(f"{where} answered a message whose content is not text: {_snippet(json.dumps(content))!r}")
    return content


class _Retry(Exception):
    """A failure worth asking again (the message says what it was)."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


def _retry_after(value: str | None) -> float | None:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value else None
    except ValueError:  # an HTTP date: back off as usual
        return None


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…"
