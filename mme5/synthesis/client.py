"""An async chat-completions client with our own rate limits, retries and cost accounting.

Built on `openai.AsyncOpenAI` (any OpenAI-compatible server: OpenAI, vLLM, SGLang via `base_url`), with the
package's own retries turned off so that one policy decides: retry 429, 5xx, timeouts, connection errors
and unparseable bodies with exponential backoff and full jitter, honouring `Retry-After`; fail fast on
other 4xx. The API key is read from an environment variable and kept out of every repr, log and error.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import httpx2
import openai

from mme5.data.schema import image_extension
from mme5.settings import at_least, positive, required_settings, unknown_settings

log = logging.getLogger(__name__)

POOL_CONNECTIONS = 8
"""Connections per HTTP pool; `max_concurrency` is spread over ceil(max_concurrency / 8) pools."""

_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
         "bmp": "image/bmp"}


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server and how hard to push it; holds the key variable's *name*, never the key."""

    model: str
    base_url: str | None = None
    """None: the openai package's default (api.openai.com or $OPENAI_BASE_URL)."""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    """Per attempt; a timed-out attempt is retried."""
    max_concurrency: int = 16
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    """Input + output tokens; a request is charged an estimate up front and corrected from `usage`."""
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0
    """A server's Retry-After above this is capped, so a bogus header cannot stall the run for hours."""
    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0
    max_tokens: int | None = None
    temperature: float | None = None
    unreachable_after: int = 8
    """Consecutive failed connection attempts, across all requests and with no response in between, after
    which the server counts as unreachable and every call raises `ServiceError` (not minutes of retries per
    sample). At least two per concurrent slot, so that one wave of dropped connections is not enough."""
    mode: str = "online"
    """"online": one chat call per sample (`max_concurrency` at once); "batch": the requests go as JSONL
    files to the Batch API (`files` + `batches`) or to `local_batch_command`, answers within hours."""
    batch_max_requests: int = 50_000
    """Requests per batch file (the OpenAI Batch API's limit is 50,000)."""
    batch_max_bytes: int = 190_000_000
    """Bytes per batch file (the API's limit is 200 MB; images are inlined as base64)."""
    batch_discount: float = 0.5
    """Batch price as a share of the online prices above (OpenAI: half)."""
    batch_poll_s: float = 60.0
    """Seconds between two status checks of the batches in flight."""
    local_batch_command: str | None = None
    """Mode batch without the API: a command with {input} and {output}, e.g. "vllm run-batch -i {input} -o
    {output} --model M", that answers the JSONL file locally (same line formats as the API)."""

    def __post_init__(self) -> None:
        at_least(self, {"max_concurrency": 1, "max_attempts": 1, "max_tokens": 1, "unreachable_after": 1,
                        "batch_max_requests": 1, "batch_max_bytes": 1})
        at_least(self, {"batch_discount": 0, "batch_poll_s": 0})
        positive(self, ("timeout_s", "requests_per_minute", "tokens_per_minute"))
        at_least(self, {"backoff_base_s": 0, "backoff_max_s": 0, "max_retry_after_s": 0,
                        "input_usd_per_million": 0, "output_usd_per_million": 0, "temperature": 0})
        if self.mode not in ("online", "batch"):
            raise ValueError(f"client.mode must be 'online' or 'batch', got {self.mode!r}")
        if self.local_batch_command is not None and not all(
                f"{{{name}}}" in self.local_batch_command for name in ("input", "output")):
            raise ValueError("client.local_batch_command must contain {input} and {output}, got "
                             f"{self.local_batch_command!r}")

    def price(self, input_tokens: int, output_tokens: int) -> float:
        """USD for these tokens in this client's mode (the batch discount applied in mode batch)."""
        cost = (input_tokens * self.input_usd_per_million + output_tokens * self.output_usd_per_million) / 1e6
        return cost * (self.batch_discount if self.mode == "batch" else 1.0)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClientConfig:
        """Settings from a config section: unknown keys refused, a key that looks like a secret with the
        advice to use the environment (nothing has been written yet when this raises)."""
        unknown_settings(values, {f.name for f in fields(cls)}, "client",
                         "export it in the environment variable named by client.api_key_env (default "
                         "OPENAI_API_KEY)")
        required_settings(values, cls, "client")
        return cls(**values)


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cost_usd + other.cost_usd)


@dataclass(frozen=True)
class ChatResult:
    content: str
    usage: Usage
    attempts: int
    latency_s: float
    """Round trip of the successful attempt."""
    elapsed_s: float
    """Whole call: waiting for a slot and the rate limits, failed attempts and backoff included."""


class ChatError(RuntimeError):
    """A call failed for good: a non-retryable error, or retries exhausted. Never carries the API key."""

    def __init__(self, message: str, status_code: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.status_code = status_code
        self.attempts = attempts


class ServiceError(ChatError):
    """The service, not this request, is at fault: credentials or access refused (401, 403), an unknown
    model or endpoint (404), or the server unreachable. Every other call would fail the same way, so a
    caller stops instead of recording the request's sample as failed."""


SERVICE_STATUSES = {401: "authentication refused", 403: "access refused", 404: "unknown model or endpoint"}


@dataclass
class TokenBucket:
    """Allows `per_minute` units a minute, in bursts of at most one second's worth.

    Providers enforce per-minute limits at sub-minute granularity, so spending a minute's quota at once
    earns 429s; a one-second burst keeps the flow even. The level may go negative when a request turns out
    bigger than charged (`adjust`), which delays the following requests by the difference.
    """

    per_minute: float
    level: float = field(init=False)
    updated: float = field(init=False)
    _lock: asyncio.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.per_minute <= 0:
            raise ValueError(f"a rate limit must be > 0 per minute, found {self.per_minute}")
        self.capacity = max(1.0, self.per_minute / 60.0)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    async def acquire(self, amount: float) -> None:
        """Wait until `amount` (capped at the burst size, so a big request cannot wait forever) is free."""
        amount = min(amount, self.capacity)
        async with self._lock:  # first come, first served
            self._refill()
            while self.level < amount:
                await asyncio.sleep((amount - self.level) * 60.0 / self.per_minute)
                self._refill()
            self.level -= amount

    def adjust(self, extra: float) -> None:
        """Charge `extra` more units (or refund, if negative) once the true cost is known."""
        self._refill()
        self.level = min(self.capacity, self.level - extra)


class ChatClient:
    """Sends one chat completion per `complete` call; share one instance among all concurrent tasks."""

    def __init__(self, config: ClientConfig):
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ChatError(f"environment variable {config.api_key_env} (ClientConfig.api_key_env) "
                            "is not set")
        self.config = config
        # Several clients, each with its own keep-alive connection pool, used in turn: the HTTP pool
        # probes every idle connection's socket (poll + getpeername) each time it hands out or takes back a
        # connection, so one pool of 64 connections costs O(64) system calls per request (cProfile, 512
        # requests at c=64: 2.3 s in the pool's bookkeeping with one pool, 0.5 s with pools of 8). Each
        # pool's limits allow more connections than it gets, all kept alive: no request waits for one.
        n_pools = max(1, -(-config.max_concurrency // POOL_CONNECTIONS))
        limits = httpx2.Limits(
            max_connections=max(1000, config.max_concurrency),
            max_keepalive_connections=max(100, config.max_concurrency), keepalive_expiry=30.0)
        # One TLS context for all pools: each builds its own by default, loading the CA bundle (~30 ms).
        tls = httpx2.create_ssl_context()  # the HTTP library of the openai package, its default settings
        self._pools = [
            openai.AsyncOpenAI(api_key=api_key, base_url=config.base_url, timeout=config.timeout_s,
                               max_retries=0,
                               http_client=openai.DefaultAsyncHttpxClient(limits=limits, verify=tls))
            for _ in range(n_pools)]
        self._next_pool = 0
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._connection_failures = 0  # consecutive, across requests; reset by any response
        self._unreachable: str | None = None
        self._requests = TokenBucket(config.requests_per_minute) if config.requests_per_minute else None
        self._tokens = TokenBucket(config.tokens_per_minute) if config.tokens_per_minute else None
        self.total = Usage()
        self.calls = 0

    def __repr__(self) -> str:
        c = self.config
        return f"ChatClient(model={c.model!r}, base_url={c.base_url!r}, api_key_env={c.api_key_env!r})"

    async def close(self) -> None:
        for pool in self._pools:
            await pool.close()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def complete(
        self,
        prompt: str,
        images: Sequence[bytes] = (),
        *,
        system: str | None = None,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "output",
        use_response_format: bool = True,
    ) -> ChatResult:
        """One completion of `prompt` with `images` (encoded file bytes) attached after the text.

        With `json_schema`, the request asks for strict structured output through `response_format`;
        servers that reject `response_format` need `use_response_format=False`, and then the prompt itself
        must carry the JSON instruction.
        """
        request = chat_body(self.config, prompt, images, system=system, json_schema=json_schema,
                            schema_name=schema_name, use_response_format=use_response_format)
        estimate = _estimate_tokens(prompt, system, len(images), self.config.max_tokens)
        start = time.monotonic()
        for attempt in range(1, self.config.max_attempts + 1):
            if self._unreachable is not None:
                raise ServiceError(self._unreachable, attempts=attempt - 1)
            try:
                async with self._slots:
                    if self._requests:
                        await self._requests.acquire(1)
                    if self._tokens:
                        await self._tokens.acquire(estimate)
                    sent = time.monotonic()
                    # The request is already plain JSON: posting it directly skips the typed-params
                    # transform of `chat.completions.create`, which walked every base64 image string and
                    # cost ~2.5 ms of CPU per call (the bottleneck at high concurrency).
                    self._next_pool = (self._next_pool + 1) % len(self._pools)
                    # `cast_to=object`: the parsed JSON as is. Building the typed ChatCompletion model
                    # (pydantic construction of every nested object) cost ~0.35 ms of CPU a call (cProfile,
                    # c=64); we need two fields of it, read and checked in `content_and_usage`.
                    data = await self._pools[self._next_pool].post("/chat/completions", body=request,
                                                                   cast_to=object)
                    latency = time.monotonic() - sent
                self._connection_failures = 0
                content, usage = content_and_usage(data)
            except Exception as e:  # classified by _retry_wait; kinds it does not know are re-raised
                wait = self._retry_wait(e, attempt)
                if wait is None:
                    raise
                log.warning("chat attempt %d/%d failed (%s); retrying in %.2fs", attempt,
                            self.config.max_attempts, _describe(e), wait)
                await asyncio.sleep(wait)
                continue
            usage = self._account(usage, estimate)
            return ChatResult(content, usage, attempt, latency, time.monotonic() - start)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_wait(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying `error`; None when the error kind is not ours to handle.

        Raises ChatError for failures that retrying cannot fix, or once the attempts are used up.
        """
        status = getattr(error, "status_code", None)
        if isinstance(error, openai.APIStatusError):
            self._connection_failures = 0
            if status in SERVICE_STATUSES:
                raise ServiceError(f"chat completion to model {self.config.model!r} at "
                                   f"{self.config.base_url or 'the default endpoint'}: "
                                   f"{SERVICE_STATUSES[status]} ({_describe(error)})",
                                   status_code=status, attempts=attempt) from error
            retryable = status == 429 or status >= 500
        else:
            # Timeouts, dropped connections, and 200s whose body is not a chat completion (a proxy hiccup).
            retryable = isinstance(error, openai.APIConnectionError | openai.APIResponseValidationError
                                   | ValueError | LookupError | AttributeError | TypeError)
            if not retryable:
                return None
            if isinstance(error, openai.APIConnectionError):
                self._connection_failures += 1
                if self._connection_failures >= max(self.config.unreachable_after,
                                                    2 * self.config.max_concurrency):
                    self._unreachable = (
                        f"server {self.config.base_url or 'at the default endpoint'} unreachable: "
                        f"{self._connection_failures} connection attempts in a row failed across requests "
                        f"(last: {_describe(error)})")
                    raise ServiceError(self._unreachable, attempts=attempt) from error
        if not retryable or attempt >= self.config.max_attempts:
            why = "not retryable" if not retryable else f"gave up after {attempt} attempts"
            raise ChatError(f"chat completion to model {self.config.model!r} failed ({why}): "
                            f"{_describe(error)}", status_code=status, attempts=attempt) from error
        retry_after = _retry_after(error)
        if retry_after is not None:
            return min(retry_after, self.config.max_retry_after_s)
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0.0, ceiling)  # full jitter: spreads out clients that failed together

    def _account(self, usage: dict[str, Any], estimate: float) -> Usage:
        input_tokens = int(usage.get("prompt_tokens") or 0)
        output_tokens = int(usage.get("completion_tokens") or 0)
        if self._tokens:
            self._tokens.adjust(input_tokens + output_tokens - estimate)
        result = Usage(input_tokens, output_tokens, self.config.price(input_tokens, output_tokens))
        self.total += result
        self.calls += 1
        return result


def chat_body(config: ClientConfig, prompt: str, images: Sequence[bytes] = (), *, system: str | None = None,
              json_schema: dict[str, Any] | None = None, schema_name: str = "output",
              use_response_format: bool = True) -> dict[str, Any]:
    """The JSON body of one chat completion: the same for an online call and a batch file's line."""
    body: dict[str, Any] = {"model": config.model, "messages": build_messages(prompt, images, system)}
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if json_schema is not None and use_response_format:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema_name, "schema": json_schema, "strict": True},
        }
    return body


def content_and_usage(data: Any) -> tuple[str, dict[str, Any]]:
    """The answer text and the `usage` object of a chat-completion body; ValueError if it is not one."""
    if not isinstance(data, dict):
        raise ValueError("the response body is not a JSON object")
    content = data["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError("the response has no message content")
    usage = data.get("usage")
    return content, usage if isinstance(usage, dict) else {}


def build_messages(prompt: str, images: Sequence[bytes], system: str | None = None) -> list[dict[str, Any]]:
    """Chat messages with the images as base64 data URLs in `image_url` content parts."""
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    for image in images:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


@functools.lru_cache(maxsize=32)
def data_url(image: bytes) -> str:
    """The base64 data URL of an encoded image. Cached (the 32 most recent): an image can recur across
    samples (a small pool, popular neighbours), and the pipeline hands the same bytes object for the same
    pool image (whose hash Python keeps), so a repeat costs a lookup instead of base64 again."""
    mime = _MIME.get(image_extension(image), "image/jpeg")
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def _estimate_tokens(prompt: str, system: str | None, num_images: int, max_tokens: int | None) -> float:
    """A rough up-front charge for the token bucket: ~4 characters a token, ~800 tokens an image."""
    return (len(prompt) + len(system or "")) / 4 + 800 * num_images + (max_tokens or 1000)


def _retry_after(error: Exception) -> float | None:
    """The server's Retry-After in seconds, if it sent one as a number (HTTP dates are ignored)."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _describe(error: Exception) -> str:
    """The error kind and status without the response body, which a server may fill with anything."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}" + (f" (HTTP {status})" if status is not None else "")
