"""An OpenAI-compatible judge endpoint backed by a local Hugging Face model.

It answers `POST /v1/chat/completions` with one token and its top log-probabilities, as
the weighted AlpacaEval judge asks for them, and lists its model at `GET /v1/models`;
`GET /stats` counts the requests it saw. It binds to 127.0.0.1 only. Fault options fail
a fraction of requests (500, 429, ...) or answer malformed, to exercise clients' retries
and error paths.

    python -m dice_core.judge_server --model /path/to/model --port 8000
    python -m dice_core.judge_server --model DIR --port 0 --fail-fraction 0.5 --fail-status 500,429

The server answers exactly one token, the most likely one, whatever `max_tokens` and
`temperature` ask: it is a judge, not a chat server. The key a client sends is accepted
unchecked and never logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from dice_core.judge import completion_from_top, encode_messages, load_protocol, top_next_tokens

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_TOP_LOGPROBS = 20
Malformed = Literal["none", "no-logprobs", "no-labels"]


class BadRequest(Exception):
    """A request the server answers with HTTP 400."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Faults:
    """Failures the server plays on purpose.

    Attributes:
        fail_fraction: Share of chat requests answered with an error status, spread evenly
            (0.5 fails every second request, so no two failures follow each other).
        fail_statuses: Statuses cycled through the failed requests.
        malformed: `no-logprobs` drops the log-probabilities from answers; `no-labels`
            removes the judge's label tokens from the top log-probabilities.
    """

    fail_fraction: float = 0.0
    fail_statuses: tuple[int, ...] = (500,)
    malformed: Malformed = "none"

    def status_for(self, number: int) -> int | None:
        """The error status of chat request `number` (from 1), or None to answer it."""
        failures = math.floor(number * self.fail_fraction)
        if failures == math.floor((number - 1) * self.fail_fraction):
            return None
        return self.fail_statuses[(failures - 1) % len(self.fail_statuses)]


class JudgeEngine:
    """The model behind the endpoint: next-token top log-probabilities of chat messages."""

    def __init__(
        self, model_dir: Path, dtype: str = "float32", max_prompt_tokens: int | None = None
    ):
        """Load the model and its tokenizer.

        Args:
            model_dir: A transformers model folder with a chat template.
            dtype: Weights dtype.
            max_prompt_tokens: Longest prompt accepted (default: the model's context).
        """
        from dice_core.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype)
        context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = max_prompt_tokens or context
        self._lock = threading.Lock()

    def complete(self, messages: list[dict[str, str]], top_logprobs: int) -> tuple[dict, int]:
        """One chat-completion choice and the prompt's token count.

        Raises:
            BadRequest: The prompt is longer than the server accepts.
        """
        ids = encode_messages(self.tokenizer, messages)
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens, more than this server's limit of "
                f"{self.max_prompt_tokens}",
                code="context_length_exceeded",
            )
        with self._lock:
            top = top_next_tokens(
                self.model, [ids], max(top_logprobs, 1), self.tokenizer.pad_token_id
            )
        return completion_from_top(self.tokenizer, top[0]), len(ids)


class JudgeHTTPServer(ThreadingHTTPServer):
    """The HTTP server: engine, faults and request counts shared by handler threads."""

    daemon_threads = True

    def __init__(self, port: int, engine: JudgeEngine, name: str, faults: Faults) -> None:
        super().__init__((HOST, port), _Handler)
        self.engine = engine
        self.name = name
        self.faults = faults
        self.labels = load_protocol().labels
        self.stats: Counter[str] = Counter()
        self.stats_lock = threading.Lock()

    def count(self, *names: str) -> int:
        """Add one to each named counter; the new value of the first."""
        with self.stats_lock:
            for name in names:
                self.stats[name] += 1
            return self.stats[names[0]]


class _Handler(BaseHTTPRequestHandler):
    server: JudgeHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": self.server.name, "object": "model", "owned_by": "local"}
            self._send(200, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") == "/stats":
            with self.server.stats_lock:
                self._send(200, dict(self.server.stats))
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        names = ["requests"] + (["with_key"] if self._has_key() else [])
        number = self.server.count(*names)
        status = self.server.faults.status_for(number)
        if status is not None:
            self.server.count("failed")
            self._error(status, "failure played on purpose", "server_fault")
            return
        try:
            answer = self._answer(json.loads(body or b"{}"))
        except (BadRequest, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            self._error(400, str(error), getattr(error, "code", "invalid_request"))
            return
        self.server.count("answered")
        self._send(200, answer)

    def _has_key(self) -> bool:
        value = self.headers.get("Authorization", "")
        return value.startswith("Bearer ") and len(value) > len("Bearer ")

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("`messages` must be a non-empty list")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        top_logprobs = int(request.get("top_logprobs") or 0)
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        choice, prompt_tokens = self.server.engine.complete(messages, top_logprobs)
        choice = self._apply_malformation(choice, bool(request.get("logprobs")), top_logprobs)
        return {
            "id": f"chatcmpl-{self.server.stats['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.server.name),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 1,
                "total_tokens": prompt_tokens + 1,
            },
        }

    def _apply_malformation(self, choice: dict, logprobs: bool, top_logprobs: int) -> dict:
        """Trim the log-probs to what was asked, then play the malformed-answer fault."""
        content = choice["logprobs"]["content"][0]
        content["top_logprobs"] = content["top_logprobs"][:top_logprobs]
        malformed = self.server.faults.malformed
        if not logprobs or malformed == "no-logprobs":
            choice["logprobs"] = None
        elif malformed == "no-labels":
            labels = self.server.labels
            content["top_logprobs"] = [
                item for item in content["top_logprobs"] if item["token"] not in labels
            ]
        return choice

    def _error(self, status: int, message: str, code: str) -> None:
        self._send(status, {"error": {"message": message, "type": code, "code": code}})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        # The request line and status only: headers, and with them the key, are never logged.
        log.info("%s %s", self.address_string(), format % args)


def _statuses(text: str) -> tuple[int, ...]:
    statuses = tuple(int(part) for part in text.split(",") if part.strip())
    if not statuses or any(not 400 <= status <= 599 for status in statuses):
        raise argparse.ArgumentTypeError(f"expected HTTP error statuses like 500,429, got {text!r}")
    return statuses


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="transformers model folder")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1; 0 picks one")
    parser.add_argument("--name", help="model id at /v1/models (default: the folder name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted")
    parser.add_argument(
        "--fail-fraction", type=float, default=0.0, help="share of requests that fail, in [0, 1]"
    )
    parser.add_argument(
        "--fail-status", type=_statuses, default=(500,), help="statuses of failures: 500,429"
    )
    parser.add_argument("--malformed", choices=["none", "no-logprobs", "no-labels"], default="none")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fail_fraction <= 1.0:
        parser.error(f"--fail-fraction must be in [0, 1], got {args.fail_fraction}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until interrupted.

    Args:
        argv: Command-line arguments (default: sys.argv).
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = JudgeEngine(args.model, args.dtype, args.max_prompt_tokens)
    faults = Faults(args.fail_fraction, args.fail_status, args.malformed)
    name = args.name or args.model.name
    server = JudgeHTTPServer(args.port, engine, name, faults)
    # Clients and tests wait for this line: the model is loaded and the port is open.
    print(f"judge server: {name} on http://{HOST}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
