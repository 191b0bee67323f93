"""A real OpenAI-compatible chat-completions server for the tests and bench/explain.py: an HTTP
server (the standard library's, one thread per request) on a free loopback port, answering
POST /v1/chat/completions and GET /v1/models as llama.cpp's server and vLLM do.

What it answers is a function of the request's JSON:

- `SmolLM2Chat`: the bundled SmolLM2-135M-Instruct through transformers, its chat template,
  greedy, a few new tokens (the quality of its answers does not matter; the protocol does);
- `fixed_answers(delay)`: after `delay` seconds, a fixed valid answer to saescope's prompts;
- `failing_after(answer, m, mode)`: `answer` for the first m requests, then HTTP 500, or text
  that is not JSON, or a JSON that is not a chat completion, or silence past any timeout.

    with chat_server(fixed_answers(0.2)) as url:
        ...  # url = "http://127.0.0.1:PORT"
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server sends: a chat completion of `content`, or `status` with `body` as it is."""

    content: str | None = None
    status: int = 200
    body: bytes | None = None


Answer = Callable[[dict], "Reply | str"]


def completion(content: str, model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }).encode()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: Answer, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.answer = answer
        self.requests: list[dict] = []  # every chat request's JSON, in arrival order
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet tests
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "test", "object": "model"}]}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        try:
            request = json.loads(body)
            request["messages"][0]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            self._send(400, b'{"error": {"message": "not a chat request"}}')
            return
        request["_headers"] = dict(self.headers)
        with self.server.lock:
            self.server.requests.append(request)
        reply = self.server.answer(request)
        reply = Reply(content=reply) if isinstance(reply, str) else reply
        body = reply.body if reply.body is not None else completion(reply.content or "", request.get("model", ""))
        self._send(reply.status, body)

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass


@contextmanager
def chat_server(answer: Answer, port: int = 0) -> Iterator[ChatServer]:
    """The server running in a thread of this process; closed afterwards."""
    server = ChatServer(answer, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ------------------------------------------------------------ what it answers


def excerpts(request: dict) -> int:
    """How many numbered excerpts saescope's detection prompt shows (0 for the explanation's)."""
    user = request["messages"][-1]["content"]
    found = re.search(r"list of (\d+) numbers", user)
    return int(found[1]) if found else 0


def fixed_answers(delay: float = 0.0) -> Answer:
    """After `delay` s, "Explanation: ..." to the explanation prompt and [1, 0, 1, 0, ...] with
    one number per excerpt to the detection prompt."""
    def answer(request: dict) -> Reply:
        time.sleep(delay)
        n = excerpts(request)
        if n:
            return Reply("[" + ", ".join("1" if i % 2 == 0 else "0" for i in range(n)) + "]")
        return Reply("Explanation: names in Python source code")

    return answer


def failing_after(answer: Answer, m: int, mode: str = "500", hang: float = 5.0) -> Answer:
    """`answer` for the first m requests, then failures of one kind for every request after:
    "500" (an HTTP error), "garbage" (text that is not JSON), "not-chat" (JSON without choices),
    "hang" (no answer for `hang` seconds, then an empty reply)."""
    count = {"n": 0}
    lock = threading.Lock()

    def failing(request: dict) -> Reply | str:
        with lock:
            count["n"] += 1
            n = count["n"]
        if n <= m:
            return answer(request)
        if mode == "500":
            return Reply(status=500, body=b'{"error": {"message": "the model crashed"}}')
        if mode == "garbage":
            return Reply(body=b"<html>Bad gateway, sort of</html>")
        if mode == "not-chat":
            return Reply(body=b'{"result": "ok"}')
        if mode == "hang":
            time.sleep(hang)
            return Reply(body=b"")
        raise ValueError(mode)

    return failing


class SmolLM2Chat:
    """The bundled SmolLM2-135M-Instruct answering through its chat template, greedy, at most
    `max_new_tokens` new tokens (fewer when the request asks for fewer); one generation at a time."""

    def __init__(self, max_new_tokens: int = 24):
        from trainer.model import BUNDLED_MODEL, shared_model

        self.model = shared_model(BUNDLED_MODEL, "cpu", fast=False)
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> Reply:
        import torch

        tokenizer, lm = self.model.tokenizer, self.model.causal_lm
        messages = [{"role": m["role"], "content": m["content"]} for m in request["messages"]]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        new = min(self.max_new_tokens, int(request.get("max_tokens") or self.max_new_tokens))
        with self.lock, torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
        return Reply(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def main() -> None:
    """`python -m tests.llm_server [--port 8080] [--fixed SECONDS]`: serve until interrupted
    (SmolLM2, or fixed answers after SECONDS), e.g. to try `saescope explain` by hand."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--fixed", type=float, help="fixed answers after this many seconds instead of SmolLM2")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    answer = fixed_answers(args.fixed) if args.fixed is not None else SmolLM2Chat(args.max_new_tokens)
    server = ChatServer(answer, args.port)
    print(f"serving chat completions at {server.url}/v1/chat/completions", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
