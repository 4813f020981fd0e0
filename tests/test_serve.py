"""The OpenAI-compatible server, in-process on a loopback port, driven by the official `openai`
client: completions and chat, streamed and not, 32 concurrent mixed requests whose greedy results
equal their single-request results, bad input answered with a 400, a disconnect freeing its slot."""

import concurrent.futures
import http.client
import json
import time
import urllib.parse

import openai
import pytest

from ladder_jax import serve
from ladder_jax.cli import main
from ladder_jax.engine import Engine
from ladder_jax.tokenizer import ByteTokenizer

from .test_decode import model_on

NAME = "tiny-test"
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def server(devices):
    """The engine of test_engine's shapes (2 slots of 32 positions: no new compiles) behind
    uvicorn on a free loopback port, in a thread; stopped at the end."""
    cfg, mesh, params = model_on("ladder", 2, 4)
    tokenizer = ByteTokenizer()
    tokenizer.chat_template = CHAT
    app = serve.Server(Engine(cfg.model, mesh, params, slots=2, cache_len=32), tokenizer, NAME)
    with serve.serving_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=120)


def post(url, path, body: bytes, stream=False):
    """A raw POST over the standard library: (connection, response) for bodies the client would not send."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("POST", path, body, {"content-type": "application/json"})
    return connection, connection.getresponse()


def complete(client, prompt, **kw):
    return client.completions.create(model=NAME, prompt=prompt, **kw)


def test_completions_chat_streaming_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    address = urllib.parse.urlsplit(server[1])
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read())["status"] == "ok"
    connection.close()
    whole = complete(client, "Hello", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == 6  # BOS and five bytes
    pieces = [c.choices[0].text for c in complete(client, "Hello", max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    text = whole.choices[0].text
    stop = text[3:5]
    cut = complete(client, "Hello", max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    # The chat template's text, tokenized without a BOS, continues as that plain text does.
    raw = server[0].engine.submit(serve.E.Request(list(b"<user>hi\n<assistant>"), 8))  # to the engine's thread
    assert raw.done.wait(60) and chat.choices[0].message.content == ByteTokenizer().decode(raw.tokens)
    chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    sampled = [
        complete(client, "Hello", max_tokens=8, temperature=1.0, top_p=0.9, seed=5).choices[0].text for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed fixes the draws


def test_concurrent_mixed_requests_equal_their_single_request_results(client):
    prompts = ["Hello", "def f(x):", "a", "import os\n", "naïve", "0123456789", "The", "xyz "]
    jobs = [(prompts[i % 8], 4 + (i * 5) % 13, 0.0 if i % 2 == 0 else 0.9, i) for i in range(32)]

    def one(job):
        prompt, n, temperature, seed = job
        result = complete(
            client,
            prompt,
            max_tokens=n,
            temperature=temperature,
            seed=seed,
            extra_body={"top_k": 20 if seed % 4 == 1 else 0},
        )
        return result.choices[0].text, result.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(one, jobs))
    alone = [one(job) for job in jobs[:12]]
    assert together[:12] == alone
    assert all(n == job[1] for (_, n), job in zip(together, jobs))


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "JSON"),
        (json.dumps({"model": NAME, "prompt": "x", "frobnicate": 1}), "frobnicate: Extra inputs are not permitted"),
        (json.dumps({"model": NAME, "prompt": "x" * 40, "max_tokens": 4}), "above the engine's 32 positions"),
        (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}), "ask for at least 1 new token"),
        (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 10**9}), "above model.max_seq_len=64"),
        (json.dumps({"model": NAME, "prompt": "x", "temperature": -0.5}), "temperature=-0.5"),
        (json.dumps({"model": "gpt-4", "prompt": "x"}), "model 'gpt-4' is not served here"),
        (json.dumps({"model": NAME, "prompt": ""}), "prompt is empty"),
    ],
)
def test_bad_requests_get_a_400_with_a_message(server, body, message):
    connection, reply = post(server[1], "/v1/completions", body if isinstance(body, bytes) else body.encode())
    text = reply.read().decode()
    connection.close()
    assert reply.status == 400 and message in json.loads(text)["error"]["message"], text


def test_a_client_disconnecting_mid_stream_frees_its_slot(server, client):
    app, url = server
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 26, "temperature": 0, "stream": True}
    cancelled = app.engine.finished["cancelled"]
    connection, reply = post(url, "/v1/completions", json.dumps(body).encode())
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    connection.sock.close()  # the first chunk arrived; hang up
    connection.close()
    for _ in range(200):
        if app.engine.busy_slots == 0:
            break
        time.sleep(0.05)
    assert app.engine.busy_slots == 0 and app.engine.finished["cancelled"] == cancelled + 1
    assert complete(client, "Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3  # still serving


def test_serve_refuses_a_bad_command_line_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err
    assert main(["serve", "--checkpoint", str(tmp_path), "--slots", "0"]) == 2
    assert "give at least 1 slot" in capsys.readouterr().err
