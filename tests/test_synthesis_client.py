"""The synthesis chat client against a real scripted HTTP server on 127.0.0.1."""

import asyncio
import base64
import io
import logging
import time

import pytest
from chat_server import ChatServer, Failure
from PIL import Image

from mme5.synthesis.client import ChatClient, ChatError, ClientConfig

KEY = "sk-test-DO-NOT-LEAK-8f3a91c2"
KEY_ENV = "MME5_TEST_CHAT_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def config(server: ChatServer, **overrides) -> ClientConfig:
    settings = dict(model="test-mllm", base_url=server.base_url, api_key_env=KEY_ENV, timeout_s=5.0,
                    backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=4)
    return ClientConfig(**(settings | overrides))


def complete(server: ChatServer, calls: int = 1, **overrides):
    """Run `calls` concurrent completions through one client; returns (results, client)."""

    async def main():
        async with ChatClient(config(server, **overrides)) as client:
            results = await asyncio.gather(*(client.complete(f"prompt {i}") for i in range(calls)))
            return results, client

    return asyncio.run(main())


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_happy_path_sends_image_and_schema_and_accounts_cost():
    schema = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
    image = png_bytes()

    async def main(server):
        prices = {"input_usd_per_million": 2.5, "output_usd_per_million": 10.0}
        async with ChatClient(config(server, **prices)) as client:
            result = await client.complete("describe", [image], system="be brief", json_schema=schema)
            return result, client.total

    with ChatServer(content='{"query": "a red square"}', prompt_tokens=120, completion_tokens=30) as server:
        result, total = asyncio.run(main(server))
    assert result.content == '{"query": "a red square"}'
    assert (result.usage.input_tokens, result.usage.output_tokens) == (120, 30)
    assert result.usage.cost_usd == pytest.approx((120 * 2.5 + 30 * 10.0) / 1e6)
    assert total == result.usage
    assert result.attempts == 1 and 0 < result.latency_s <= result.elapsed_s
    request = server.requests[0]
    assert request["model"] == "test-mllm"
    assert request["messages"][0] == {"role": "system", "content": "be brief"}
    text, image_part = request["messages"][1]["content"]
    assert text == {"type": "text", "text": "describe"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image
    assert request["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"


def test_response_format_can_be_left_out_for_servers_that_reject_it():
    async def main(server):
        async with ChatClient(config(server)) as client:
            await client.complete("answer in JSON", json_schema={"type": "object"}, use_response_format=False)

    with ChatServer() as server:
        asyncio.run(main(server))
    assert "response_format" not in server.requests[0]


def test_429_waits_for_retry_after():
    with ChatServer() as server:
        server.script.append(Failure(429, headers={"Retry-After": "1"}))
        start = time.monotonic()
        [result], _ = complete(server)
    assert result.attempts == 2
    assert time.monotonic() - start >= 0.95
    assert server.times[1] - server.times[0] >= 0.95  # backoff alone would wait at most 0.05 s


def test_500_then_success_is_retried():
    with ChatServer() as server:
        server.script.extend([Failure(500), Failure(503)])
        [result], _ = complete(server)
    assert result.attempts == 3 and len(server.requests) == 3


def test_timeout_is_retried():
    with ChatServer() as server:
        server.script.append(Failure(hang=True))
        [result], _ = complete(server, timeout_s=0.3)
    assert result.attempts == 2
    assert result.elapsed_s >= 0.3


def test_garbled_body_is_retried():
    with ChatServer() as server:
        server.script.append(Failure(garbled=True))
        [result], _ = complete(server)
    assert result.attempts == 2 and result.content == '{"ok": true}'


@pytest.mark.parametrize("body", ['{"object": "error"}', '{"choices": []}', '[1, 2]',
                                  '{"choices": [{"message": {"role": "assistant", "content": null}}]}'])
def test_json_that_is_not_a_completion_is_retried(body):
    with ChatServer(content="fine") as server:
        server.script.append(Failure(status=200, body=body))
        (result,), client = complete(server)
    assert result.content == "fine" and result.attempts == 2 and client.calls == 1


def test_400_is_not_retried():
    with ChatServer() as server:
        server.script.append(Failure(400, body='{"error": {"message": "bad image"}}'))
        with pytest.raises(ChatError, match="not retryable") as error:
            complete(server)
    assert error.value.status_code == 400 and error.value.attempts == 1
    assert len(server.requests) == 1


def test_gives_up_after_max_attempts():
    with ChatServer() as server:
        server.script.extend([Failure(500)] * 5)
        with pytest.raises(ChatError, match="gave up after 3 attempts"):
            complete(server, max_attempts=3)
    assert len(server.requests) == 3


def test_concurrency_is_bounded():
    with ChatServer(latency_s=0.1) as server:
        results, client = complete(server, calls=12, max_concurrency=3)
    assert server.max_in_flight == 3
    assert client.calls == 12 and client.total.input_tokens == 12 * 120


def test_requests_per_minute_limit_spaces_requests():
    # 600/min = 10/s with a burst of 10: the 15 requests need at least 0.5 s.
    with ChatServer() as server:
        start = time.monotonic()
        complete(server, calls=15, requests_per_minute=600)
    assert time.monotonic() - start >= 0.45
    assert server.times[-1] - server.times[0] >= 0.45


def test_tokens_per_minute_limit_spaces_requests():
    # Each call is charged ~1000 tokens up front; 60 000/min = 1000/s, so 3 calls need about 2 s.
    with ChatServer() as server:
        start = time.monotonic()
        complete(server, calls=3, tokens_per_minute=60_000)
    assert time.monotonic() - start >= 0.9


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ChatError, match=KEY_ENV):
        ChatClient(ClientConfig(model="m", api_key_env=KEY_ENV))


def test_api_key_never_leaks(caplog):
    caplog.set_level(logging.DEBUG)
    errors = []
    with ChatServer() as server:
        server.script.extend([Failure(429, headers={"Retry-After": "0"}), Failure(401), Failure(500),
                              Failure(500)])
        for _ in range(2):
            with pytest.raises(ChatError) as error:
                complete(server, max_attempts=2)
            errors.append(error.value)

        async def reprs():
            async with ChatClient(config(server)) as client:
                return repr(client) + str(client) + repr(client.config)

        text = asyncio.run(reprs())
    assert len(caplog.records) > 0
    for error in errors:
        chain = error
        while chain is not None:
            text += str(chain) + repr(chain) + repr(getattr(chain, "body", ""))
            chain = chain.__cause__ or chain.__context__
    text += caplog.text + "".join(repr(r.args) + r.getMessage() for r in caplog.records)
    assert KEY not in text
    assert KEY[-8:] not in text


def test_connections_are_kept_alive_and_reused():
    """48 calls in 3 waves at concurrency 16: the client opens about 16 connections (one per slot, spread
    over its connection pools), not 48, and the server's replies carry keep-alive (HTTP/1.1)."""

    async def main(server):
        async with ChatClient(config(server, max_concurrency=16)) as client:
            for wave in range(3):
                await asyncio.gather(*(client.complete(f"prompt {wave}.{i}") for i in range(16)))

    with ChatServer(latency_s=0.05) as server:
        asyncio.run(main(server))
    assert len(server.requests) == 48 and server.max_in_flight == 16
    assert len(server.connections) <= 20, server.connections
    assert all(h.get("connection", "keep-alive").lower() == "keep-alive" for h in server.headers)
