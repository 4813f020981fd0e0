"""The OpenAI-compatible server, in-process on a loopback port, driven by the official `openai`
client: completions and chat, streamed and not, 32 concurrent mixed requests whose greedy results
equal their single-request results, log-probabilities equal to a full forward's log-softmax, n
samples from one prefill, usage in streams, an API key, Prometheus metrics, bad input answered
with a 4xx, a disconnect freeing its slot."""

import concurrent.futures
import http.client
import json
import socket
import time
import urllib.parse

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ladder_jax import model as M
from ladder_jax import serve
from ladder_jax.cli import main, parser
from ladder_jax.engine import Engine
from ladder_jax.tokenizer import ByteTokenizer

from .conftest import free_ports, save_run
from .test_decode import NEW, model_on

NAME = "tiny-test"
KEY = "sk-test"
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def server(devices):
    """The engine of test_engine's shapes (2 slots of 32 positions: no new compiles) behind
    uvicorn on a free loopback port, in a thread; stopped at the end."""
    cfg, mesh, params = model_on("ladder", 2, 4)
    tokenizer = ByteTokenizer()
    tokenizer.chat_template = CHAT
    app = serve.Server(Engine(cfg.model, mesh, params, max_running=2, cache_len=32), tokenizer, NAME, api_key=KEY)
    with serve.serving_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url, path, body: bytes, key=KEY):
    """A raw POST over the standard library: (connection, response) for bodies the client would not send."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    connection.request("POST", path, body, headers)
    return connection, connection.getresponse()


def get(url, path, key=None) -> str:
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("GET", path, headers={"authorization": f"Bearer {key}"} if key else {})
    reply = connection.getresponse()
    text = reply.read().decode()
    connection.close()
    assert reply.status == 200, text
    return text


def complete(client, prompt, **kw):
    return client.completions.create(model=NAME, prompt=prompt, **kw)


def test_completions_chat_streaming_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert json.loads(get(server[1], "/health"))["status"] == "ok"
    whole = complete(client, "Hello", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == 6  # BOS and five bytes
    assert whole.usage.prompt_tokens_details.cached_tokens == 0  # no full page of 16 to cache
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


CHAT_BODY = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "the body is not valid JSON (Expecting property name"),
        (json.dumps({"model": NAME, "prompt": "x", "n": 9}), "n=9; give 1..8 samples"),
        (json.dumps({"model": NAME, "prompt": "x", "n": 3}), "3 samples of one prompt but the engine has 2 slots"),
        (json.dumps({"model": NAME, "prompt": "x", "logprobs": 21}), "logprobs=21; give 0..20"),
        (json.dumps({"model": NAME, "prompt": "x", "logprobs": -1}), "logprobs=-1; give 0..20"),
        (json.dumps({**CHAT_BODY, "logprobs": True, "top_logprobs": 21}), "top_logprobs=21; give 0..20"),
        (json.dumps({**CHAT_BODY, "top_logprobs": 2}), "top_logprobs needs logprobs: true"),
        (json.dumps({"model": NAME, "prompt": "x", "top_k": 260}), "top_k=260; give 0 (off) or 1..259"),
        (json.dumps({"model": NAME, "prompt": "x", "top_p": 1.5}), "top_p=1.5"),
        (
            json.dumps({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}),
            "only allowed with stream",
        ),
        (json.dumps({"model": NAME, "prompt": "x", "frobnicate": 1}), "frobnicate: Extra inputs are not permitted"),
        (json.dumps({"model": NAME, "prompt": "x" * 40, "max_tokens": 4}), "above the engine's 32 positions"),
        (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}), "max_tokens=0 makes nothing; ask for at least 1"),
        (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 10**9}), "above model.max_seq_len=64"),
        (json.dumps({"model": NAME, "prompt": "x", "temperature": -0.5}), "temperature=-0.5"),
        (json.dumps({"model": NAME, "prompt": ""}), "prompt is empty"),
        (json.dumps({"model": NAME, "prompt": [[1], []]}), "prompt[1] is empty"),
        (json.dumps({"model": NAME, "prompt": [65, 300]}), "prompt has token id 300 outside the vocabulary 0..258"),
        (json.dumps({"model": NAME, "prompt": "x\ud800"}), "prompt is not valid Unicode"),
        (
            json.dumps({"model": NAME, "prompt": "x", "temperature": "0.5"}),
            "temperature: Input should be a valid number",
        ),
        (json.dumps({"model": NAME, "prompt": "x", "n": 2.0}), "n: Input should be a valid integer"),
        (json.dumps({"model": NAME, "prompt": "x", "seed": -1}), "seed=-1; give 0..2147483647"),
        (
            json.dumps({"model": NAME, "prompt": "x", "frequency_penalty": 0.5}),
            "frequency_penalty=0.5 is not supported",
        ),
        (
            json.dumps({"model": NAME, "prompt": "x", "logit_bias": {"65": 5}}),
            'logit_bias={"65": 5.0} is not supported',
        ),
        (
            json.dumps({"model": NAME, "prompt": "x", "best_of": 2}),
            "best_of=2 is not supported; leave it out or send n",
        ),
        (json.dumps({**CHAT_BODY, "response_format": {"type": "json_object"}}), "response_format="),
        (json.dumps({**CHAT_BODY, "messages": [{"role": "user"}]}), "messages[0] has no content"),
        (
            json.dumps({**CHAT_BODY, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0] has a 'image_url' content part; this model takes text parts only",
        ),
        (json.dumps({**CHAT_BODY, "max_tokens": 40}), "plus max_tokens=40 is"),
    ],
)
def test_bad_requests_get_a_400_with_a_message(server, body, message):
    path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
    connection, reply = post(server[1], path, body if isinstance(body, bytes) else body.encode())
    text = reply.read().decode()
    connection.close()
    error = json.loads(text)["error"]["message"]
    assert reply.status == 400 and message in error and "\n" not in error, text


def request(url, method, path, body: dict | None = None):
    """(status, JSON body) of a raw request with the API key."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    reply = connection.getresponse()
    data = json.loads(reply.read())
    connection.close()
    return reply.status, data


def test_errors_have_openais_shape_and_status(server):
    url = server[1]
    for method, path, body, status, words in [
        ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model 'gpt-4' is not served here"),
        ("POST", "/v1/embeddings", {"input": "x"}, 404, "Not Found: POST /v1/embeddings; the server has POST"),
        ("GET", "/v1/completions", None, 405, "Method Not Allowed: GET /v1/completions; the server has"),
        ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "top_p": None, "stop": 3}, 400, "stop"),
    ]:
        got, data = request(url, method, path, body)
        assert got == status and set(data["error"]) == {"message", "type", "param", "code"}, data
        assert data["error"]["code"] == status and words in data["error"]["message"], data
    assert (
        request(url, "POST", "/v1/completions", {"model": NAME, "prompt": "x", "seed": "1"})[1]["error"]["param"]
        == "seed"
    )


def test_openai_fields_at_their_defaults_and_nulls_are_taken(server, client):
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": None, "stream": None}
    neutral |= {"temperature": None, "top_p": None, "top_k": None, "user": "u", "stop": None, "logprobs": None}
    plain = complete(client, "Hello", max_tokens=6, temperature=0, seed=2)
    seeded = {"model": NAME, "prompt": "Hello", "max_tokens": 6, "seed": 2}
    status, data = request(server[1], "POST", "/v1/completions", {**seeded, **neutral, "best_of": 1, "suffix": ""})
    assert (
        status == 200 and data["choices"][0]["text"] == complete(client, "Hello", max_tokens=6, seed=2).choices[0].text
    )
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    want = client.chat.completions.create(**chat).choices[0].message.content
    chat_neutral = {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "logprobs": None}
    status, data = request(server[1], "POST", "/v1/chat/completions", {**chat, **chat_neutral})
    assert status == 200 and data["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert plain.choices[0].text != ""


def test_prompts_as_lists_token_ids_and_echo_as_openai_takes_them(server, client):
    tokens = ByteTokenizer().encode_prompt("Hello")
    one = complete(client, "Hello", max_tokens=5, temperature=0)
    assert complete(client, tokens, max_tokens=5, temperature=0).choices[0].text == one.choices[0].text
    other = complete(client, "a", max_tokens=5, temperature=0).choices[0].text
    batch = complete(client, ["Hello", "a"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [one.choices[0].text] * 2 + [other] * 2
    assert batch.usage.prompt_tokens == 6 + 2 and batch.usage.completion_tokens == 20
    assert complete(client, [tokens], max_tokens=5, temperature=0).choices[0].text == one.choices[0].text
    echoed = complete(client, "Hello", max_tokens=5, temperature=0, echo=True).choices[0].text
    assert echoed == "Hello" + one.choices[0].text
    pieces = [c.choices[0].text for c in complete(client, "Hello", max_tokens=5, temperature=0, echo=True, stream=True)]
    assert pieces[0].startswith("Hello") and "".join(pieces) == echoed


def test_ignore_eos_runs_past_an_end_id_to_max_tokens(server, client, monkeypatch):
    first = server[0].engine.submit(serve.E.Request(ByteTokenizer().encode_prompt("Hello"), 1))
    assert first.done.wait(60)
    monkeypatch.setattr(server[0].tokenizer, "stop_ids", frozenset(first.tokens))  # the first token ends it
    ended = complete(client, "Hello", max_tokens=4, temperature=0)
    assert ended.choices[0].text == "" and ended.choices[0].finish_reason == "stop"
    on = complete(client, "Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert on.usage.completion_tokens == 4 and on.choices[0].finish_reason == "length"


def test_chat_takes_text_parts_names_and_replies_to_the_end_of_the_context(server, client):
    def reply(messages, **kw):
        return client.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw)

    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    said = reply([{"role": "user", "content": parts, "name": "ann"}], max_tokens=4).choices[0].message.content
    assert said == reply([{"role": "user", "content": "h\ni"}], max_tokens=4).choices[0].message.content
    empty = reply([{"role": "assistant", "content": None}], max_tokens=4).choices[0].message.content
    assert empty == reply([{"role": "assistant", "content": ""}], max_tokens=4).choices[0].message.content
    full = reply([{"role": "user", "content": "hi"}])  # no max_tokens: up to the engine's 32 positions
    assert full.usage.prompt_tokens == len(b"<user>hi\n<assistant>")
    if full.choices[0].finish_reason == "length":
        assert full.usage.prompt_tokens + full.usage.completion_tokens == 32
    chunks = list(reply([{"role": "user", "content": "hi"}], max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.choices[0].delta.role is None for c in chunks[1:])
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1


def test_logprobs_of_a_stop_cut_text_are_those_of_its_tokens(server, client):
    whole = complete(client, "Hello", max_tokens=12, temperature=0, logprobs=0).choices[0]
    text = whole.text
    stop = next(text[i : i + 2] for i in range(3, 10) if text[i : i + 2].isascii() and text.find(text[i : i + 2]) == i)
    cut = complete(client, "Hello", max_tokens=12, temperature=0, logprobs=0, stop=stop).choices[0]
    assert cut.text == text[: text.index(stop)] and "".join(cut.logprobs.tokens) == cut.text
    assert cut.logprobs.token_logprobs == whole.logprobs.token_logprobs[: len(cut.logprobs.tokens)]
    assert cut.logprobs.text_offset == whole.logprobs.text_offset[: len(cut.logprobs.tokens)]
    for token, offset in zip(whole.logprobs.tokens, whole.logprobs.text_offset):
        assert text[offset : offset + len(token)] == token  # a token's text stands at its offset
    chunks = list(complete(client, "Hello", max_tokens=12, temperature=0, logprobs=0, stop=stop, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == cut.logprobs.tokens


def test_a_client_hanging_up_on_a_whole_response_cancels_it(server, client, monkeypatch):
    app, url = server
    step = app.engine.step

    def slow_step():  # so the request cannot end before the hang-up is seen
        time.sleep(0.05)
        step()

    monkeypatch.setattr(app.engine, "step", slow_step)
    before = dict(app.engine.finished)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 26, "temperature": 0}
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    for _ in range(200):  # until it decodes
        if app.engine.busy_slots:
            break
        time.sleep(0.02)
    connection.sock.close()
    for _ in range(200):
        if app.engine.busy_slots == 0:
            break
        time.sleep(0.05)
    assert app.engine.finished["cancelled"] == before.get("cancelled", 0) + 1
    assert app.engine.finished["length"] == before.get("length", 0) and app.engine.pages_in_use == 0
    monkeypatch.undo()
    assert complete(client, "Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3


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
    assert app.engine.pages_in_use == 0
    assert complete(client, "Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3  # still serving


def test_serve_refuses_a_bad_command_line_in_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-running", "0"]) == 2
    assert "give at least 1 running request" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--page-size", "0"]) == 2
    assert "--page-size 0" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk 0" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--kv-memory", "0"]) == 2
    assert "--kv-memory 0.0: give the share of each device's memory to fill, in (0, 1]" in capsys.readouterr().err
    vllm = ["--max-num-seqs", "4", "--max-model-len", "64", "--block-size", "8", "--gpu-memory-utilization", "0.5"]
    vllm += ["--no-enable-prefix-caching", "--served-model-name", "m"]  # vLLM's names, taken as ours
    args = parser().parse_args(["serve", "--checkpoint", str(tmp_path), *vllm])
    assert (args.max_running, args.max_len, args.page_size, args.kv_memory) == (4, 64, 8, 0.5)
    assert not args.prefix_cache and args.model_name == "m"
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusals, in one line too
        main(["serve", "--checkpoint", str(tmp_path), "--port", "abc"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2 and err.startswith("error: argument --port: invalid int value") and err.count("\n") == 1
    )
    with socket.socket() as held:  # said before anything loads
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in capsys.readouterr().err
    run = save_run(tmp_path / "run", *model_on("ladder", 2, 4)[::2])
    (port,) = free_ports(1)
    assert main(["serve", "--checkpoint", str(run), "--port", str(port), "--kv-pages", "1", "--max-len", "32"]) == 2
    assert "--kv-pages 1: 1 pages per data shard, fewer than the 2 pages of 16 positions one request of 32" in (
        capsys.readouterr().err
    )


def test_a_missing_or_wrong_api_key_gets_a_401_and_the_server_goes_on(server, client):
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 1}).encode()
    for key, word in [(None, "missing"), ("sk-wrong", "wrong")]:
        connection, reply = post(server[1], "/v1/completions", body, key=key)
        error = json.loads(reply.read())["error"]
        connection.close()
        assert reply.status == 401 and error["message"].startswith(f"{word} API key") and "\n" not in error["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[1] + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert complete(client, "x", max_tokens=2, temperature=0).usage.completion_tokens == 2


def full_log_softmax(app, tokens):
    """log-softmax (float64, NumPy) of a full forward's logits after each of `tokens`: the reference."""
    cfg, mesh, params = app.engine.cfg, app.engine.mesh, app.engine.params
    rows = np.array([tokens, tokens], np.int32)  # the data axis holds 2 rows
    logits = np.asarray(M.forward_fn(cfg, mesh)(params, rows, M.default_positions(rows)))[0, :, : cfg.vocab_size]
    logits = logits.astype(np.float64)
    return (
        logits
        - logits.max(-1, keepdims=True)
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    )


def test_logprobs_equal_a_full_forwards_log_softmax_streamed_or_not(server, client):
    app = server[0]
    messages = [{"role": "user", "content": "hi"}]
    kw = dict(model=NAME, messages=messages, max_tokens=6, temperature=0.8, seed=3, logprobs=True, top_logprobs=4)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    ids = [t.bytes[0] if t.bytes else None for t in whole]
    assert None not in ids  # byte tokens: one byte each
    reference = full_log_softmax(app, list(b"<user>hi\n<assistant>") + ids)[-len(ids) - 1 : -1]
    for token, id_, want in zip(whole, ids, reference):
        assert abs(token.logprob - want[id_]) < 1e-4
        best = np.argsort(-want, kind="stable")[:4]
        assert [t.bytes[0] for t in token.top_logprobs] == best.tolist()
        np.testing.assert_allclose([t.logprob for t in token.top_logprobs], want[best], atol=1e-4)
    chunks = client.chat.completions.create(**kw, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.bytes, t.logprob) for t in streamed] == [(t.bytes, t.logprob) for t in whole]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    greedy = complete(client, "Hello", max_tokens=5, temperature=0, logprobs=2).choices[0].logprobs
    assert len(greedy.tokens) == len(greedy.token_logprobs) == len(greedy.top_logprobs) == 5
    for chosen, top in zip(greedy.token_logprobs, greedy.top_logprobs):
        assert chosen == max(top.values()) and len(top) <= 3  # greedy picks the most likely; 2 and the chosen


def test_echo_with_logprobs_scores_the_prompt_and_lm_eval_reads_it_as_a_full_forward(server, client, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    app, url = server
    pad = app.engine.cfg.pad_id

    def reference(ids):  # padded to one length: one compile; causal, so the padding changes nothing before it
        return full_log_softmax(app, ids + [pad] * (24 - len(ids)))[: len(ids)]

    kw = dict(max_tokens=3, temperature=0, echo=True, logprobs=2)
    whole = complete(client, "Hello", **kw).choices[0]
    scored = whole.logprobs
    prompt = ByteTokenizer().encode_prompt("Hello")  # BOS and five bytes, then three new tokens
    assert len(scored.tokens) == 9 and "".join(scored.tokens[:6]) == "Hello" == whole.text[:5]
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None  # nothing before the first
    assert scored.text_offset[:7] == [0, 0, 1, 2, 3, 4, 5]  # BOS has no text; the first new token follows
    want = reference(prompt)
    np.testing.assert_allclose(scored.token_logprobs[1:6], want[np.arange(5), prompt[1:]], atol=1e-4)
    for top, row in zip(scored.top_logprobs[1:6], want):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(row.max(), abs=1e-4)
    chunks = list(complete(client, "Hello", **kw, stream=True))
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == scored.token_logprobs
    # max_tokens 0 with echo: the prompt alone and its log-probabilities (OpenAI's old scoring call).
    alone = complete(client, "Hello", **{**kw, "max_tokens": 0}).choices[0]
    assert alone.text == "Hello" and alone.finish_reason == "length"
    assert alone.logprobs.token_logprobs == scored.token_logprobs[:6]
    assert complete(client, "Hello", **{**kw, "max_tokens": 0}).usage.completion_tokens == 0
    # lm-eval's loglikelihood over HTTP: echo, logprobs 1, max_tokens 1, the server's own tokenizer.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    lm = LocalCompletionsAPI(
        base_url=url + "/v1/completions", model=NAME, tokenizer_backend="remote", auth_token=KEY, max_length=32
    )
    pairs = [("Hello", " world"), ("def f(x):", " return x")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, got):
        ids, n = list((context + continuation).encode()), len(continuation)
        want = reference(ids)[len(ids) - n - 1 : len(ids) - 1]
        assert loglikelihood == pytest.approx(want[np.arange(n), ids[-n:]].sum(), abs=1e-3)
        assert greedy == bool((want.argmax(-1) == ids[-n:]).all())
    # A rolling log-likelihood starts from the prefix token: the byte-level tokenizer's BOS has no
    # text for lm-eval to look up, so it is given (without it lm-eval sent a null, told as such).
    lm = LocalCompletionsAPI(
        base_url=url + "/v1/completions",
        model=NAME,
        tokenizer_backend="remote",
        auth_token=KEY,
        max_length=32,
        custom_prefix_token_id=256,
    )
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Hello world",), 0)])
    ids = [256, *b"Hello world"]
    assert rolling == pytest.approx(reference(ids)[np.arange(len(ids) - 1), ids[1:]].sum(), abs=1e-3)
    connection, reply = post(url, "/v1/completions", json.dumps({"model": NAME, "prompt": [[None, 72]]}).encode())
    message = json.loads(reply.read())["error"]["message"]
    assert reply.status == 400 and message.startswith("prompt[0][0]: Input should be a valid integer; prompt takes")


def test_tokenizer_endpoints_answer_as_vllms(server):
    url = server[1]

    def call(path, body):
        connection, reply = post(url, path, json.dumps(body).encode())
        answer = json.loads(reply.read())
        connection.close()
        return reply.status, answer

    assert call("/tokenize", {"prompt": "Hi"}) == (
        200,
        {"count": 3, "max_model_len": 32, "tokens": [256, 72, 105], "token_strs": None},
    )
    status, answer = call("/tokenize", {"prompt": "Hi", "add_special_tokens": False, "return_token_strs": True})
    assert answer["tokens"] == [72, 105] and answer["token_strs"] == ["H", "i"]
    status, answer = call("/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert answer["tokens"] == list(b"<user>hi\n<assistant>")
    assert call("/detokenize", {"tokens": [256, 72, 105]}) == (200, {"prompt": "Hi"})
    status, answer = call("/detokenize", {"tokens": [72, 9999]})
    assert status == 400 and "token id 9999 outside the vocabulary" in answer["error"]["message"]
    status, answer = call("/tokenize", {"prompt": "a", "messages": []})
    assert status == 400 and "either prompt" in answer["error"]["message"]
    info = json.loads(get(url, "/tokenizer_info", key=KEY))
    assert info["eos_token"] is None and info["model_max_length"] == 32 and info["chat_template"] == CHAT


def test_n_samples_share_one_prefill_and_streams_carry_usage(server, client):
    engine = server[0].engine
    prefills = engine.prefills
    kw = dict(prompt="Hello", max_tokens=8, temperature=1.0, seed=5)
    two = complete(client, n=2, **kw)
    assert engine.prefills == prefills + 1
    texts = [c.text for c in sorted(two.choices, key=lambda c: c.index)]
    assert texts[0] == complete(client, **kw).choices[0].text and texts[0] != texts[1]
    assert two.usage.prompt_tokens == 6 and two.usage.completion_tokens == 16
    chunks = list(complete(client, n=2, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert ["".join(c.choices[0].text for c in chunks[:-1] if c.choices[0].index == i) for i in (0, 1)] == texts


def metric_values(url) -> dict:
    return {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(get(url, "/metrics"))
        for s in family.samples
    }


def test_metrics_report_latencies_requests_and_cache_use_in_prometheus_text(server, client):
    url = server[1]
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 20, "temperature": 0, "stream": True}
    before = metric_values(url)
    connection, reply = post(url, "/v1/completions", json.dumps(body).encode())
    assert reply.readline().startswith(b"data: ")  # the request is in a slot now
    during = metric_values(url)
    reply.read()
    connection.close()
    assert during[("ladder_jax:num_requests_running", None)] == 1
    # 4 pages of 16 positions (2 per data shard); 6 prompt tokens and up to 20 new hold 1 or 2.
    assert during[("ladder_jax:kv_cache_usage_perc", None)] in (0.25, 0.5)
    assert during[("ladder_jax:num_requests_waiting", None)] == 0
    after = metric_values(url)
    assert after[("ladder_jax:num_requests_running", None)] == 0
    assert after[("ladder_jax:kv_cache_usage_perc", None)] == 0
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert after[(f"ladder_jax:{name}_count", None)] > before[(f"ladder_jax:{name}_count", None)]
        assert after[(f"ladder_jax:{name}_bucket", "+Inf")] == after[(f"ladder_jax:{name}_count", None)]
    tokens = "ladder_jax:generation_tokens_total", None
    assert after[tokens] == before[tokens] + 20
    engine = server[0].engine  # the prefix cache's counts, as the engine has them (tests/test_engine.py checks those)
    assert after[("ladder_jax:prefix_cache_queries_total", None)] == engine.prefix_queries >= 6
    assert after[("ladder_jax:prefix_cache_hits_total", None)] == engine.prefix_hits
    assert after[("ladder_jax:num_preemptions_total", None)] == engine.preemptions
    assert json.loads(get(url, "/health"))["prefix_cache_hit_rate"] == engine.prefix_hit_rate


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, recording how many ids each decode call reads."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def decode(self, ids) -> str:
        self.reads.append(len(ids))
        return super().decode(ids)


def streamed(text_out, tokens) -> tuple[list[str], bool]:
    """The pieces `push` sends for `tokens` (stopping where it says so) and the flush at the end."""
    pieces, go_on = [], True
    for t in tokens:
        piece, go_on = text_out.push(t)
        pieces.append(piece)
        if not go_on:
            break
    return pieces + [text_out.flush()], go_on


def test_text_out_streams_multibyte_characters_whole_and_cuts_stop_strings_exactly():
    text = "aé€😀 naïve 😀€"
    tokens = list(text.encode())
    pieces, go_on = streamed(serve.TextOut(ByteTokenizer(), []), tokens)
    assert "".join(pieces) == text and go_on
    assert all("\ufffd" not in p for p in pieces) and pieces[:4] == ["a", "", "é", ""]
    for stop in ["😀", "ïv", "€", "e 😀", "a", "naïve 😀€!", "\ufffd"]:  # stops that start inside a character's bytes
        pieces, go_on = streamed(serve.TextOut(ByteTokenizer(), [stop, "zz"]), tokens)
        cut = text.find(stop)
        assert "".join(pieces) == (text if cut < 0 else text[:cut]) and go_on == (cut < 0), stop
        sent = "".join(pieces[:-1])  # before the end, never a character of the stop string
        assert cut < 0 or len(sent) <= cut
    # An unfinished character at the end comes out as U+FFFD, as a full decode gives it.
    pieces, _ = streamed(serve.TextOut(ByteTokenizer(), []), tokens[:-2])
    assert "".join(pieces) == ByteTokenizer().decode(tokens[:-2]) and pieces[-1].endswith("\ufffd")


def test_text_out_decodes_a_window_per_token_whatever_the_output_length():
    words = ("héllo wörld, 😀 " * 400).encode()  # 8,800 byte tokens
    tokenizer = CountingTokenizer()
    pieces, _ = streamed(serve.TextOut(tokenizer, ["\n\n"]), list(words))
    assert "".join(pieces) == words.decode()
    assert max(tokenizer.reads) <= 8  # the last character taken and the one coming: 4 bytes each at most
    assert len(tokenizer.reads) <= 2 * len(words) + 2


def drop_after_two_chunks(url, prompt):
    """A streamed completion whose client hangs up after two chunks."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": True}
    connection, reply = post(url, "/v1/completions", json.dumps(body).encode())
    chunks = 0
    while chunks < 2:
        line = reply.readline()
        assert line, "the stream ended before two chunks"
        chunks += line.startswith(b"data: ")
    connection.sock.close()
    connection.close()
    return None


def test_under_load_with_dropped_streams_every_other_request_gets_its_solo_output(server, client):
    # 128 requests, 32 at a time; every fourth is streamed and dropped by its client after two chunks
    app, url = server
    prompts = ["Hello", "def f(x):", "a", "import os\n", "naïve", "0123456789", "The", "xyz "]
    jobs = [(prompts[i % 8], 3 + i % 5) for i in range(128)]
    solo = {job: complete(client, job[0], max_tokens=job[1], temperature=0).choices[0].text for job in set(jobs)}
    cancelled = app.engine.finished["cancelled"]

    def one(i):
        if i % 4 == 3:
            return drop_after_two_chunks(url, jobs[i][0])
        return complete(client, jobs[i][0], max_tokens=jobs[i][1], temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(128)))
    assert [g for i, g in enumerate(got) if i % 4 != 3] == [solo[j] for i, j in enumerate(jobs) if i % 4 != 3]
    for _ in range(200):  # the dropped ones end at their next step
        if app.engine.pages_in_use == 0 and app.engine.busy_slots == 0:
            break
        time.sleep(0.05)
    assert app.engine.pages_in_use == 0 and app.engine.busy_slots == 0
    assert app.engine.finished["cancelled"] > cancelled  # hung-up streams were ended, not run to their end
    assert complete(client, "Hello", max_tokens=3, temperature=0).choices[0].text == solo[("Hello", 3)]


def test_serve_over_two_processes_with_tensor_spanning_both_answers_as_one_process(tmp_path, devices):
    # 2 processes x 4 CPU devices over gloo, tensor 8 across both: process 0 takes the requests,
    # both step the engine; greedy, stop strings, seeded samples and a dropped stream, then SIGINT
    import signal
    import subprocess
    import sys

    from ladder_jax import decode

    from .conftest import start_two_processes

    cfg, mesh, params = model_on("ladder", 1, 8)
    run = save_run(tmp_path / "run", cfg, params)
    port, coordinator = free_ports(2)
    cmd = [sys.executable, "-m", "ladder_jax", "serve", "--checkpoint", str(run), "--port", str(port)]
    cmd += ["--max-running", "4", "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{coordinator}"]
    cmd += ["--num-processes", "2", "--model-name", NAME, "--no-precompile", "mesh.tensor=8"]
    procs = start_two_processes(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                get(url, "/health")
                break
            except OSError:
                assert all(p.poll() is None for p in procs), procs[0].stdout.read().decode()[-3000:]
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        tok = ByteTokenizer()
        prompts = ["Hello", "naïve", "x"]
        solo = decode.generate(cfg, mesh, params, [tok.encode_prompt(p) for p in prompts], NEW).tokens
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: complete(client, p, max_tokens=NEW, temperature=0), prompts))
        assert [g.choices[0].text for g in got] == [tok.decode(t) for t in solo]
        text = tok.decode(solo[0])
        stop = text[5:7]  # cut where the first greedy output has these two characters
        cut = complete(client, "Hello", max_tokens=NEW, temperature=0, stop=[stop]).choices[0]
        assert (cut.text, cut.finish_reason) == (text[: text.index(stop)], "stop")
        seeded = decode.Sampling(0.9, 0, 1.0, 7)
        drawn = decode.generate(cfg, mesh, params, [tok.encode_prompt("Hello")], NEW, sampling=seeded).tokens[0]
        assert complete(client, "Hello", max_tokens=NEW, temperature=0.9, seed=7).choices[0].text == tok.decode(drawn)
        stream = complete(client, "naïve", max_tokens=NEW, temperature=0, stream=True)
        next(iter(stream))
        stream.close()  # dropped: the engine cancels it on every process
        assert complete(client, "x", max_tokens=4, temperature=0).choices[0].text == tok.decode(solo[2][:4])
        assert json.loads(get(url, "/health"))["kv_pages_in_use"] == 0
    finally:
        procs[0].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=60)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]


def test_an_engine_failure_is_a_500_or_an_error_event_never_a_finished_text(server, client, monkeypatch):
    app, url = server
    step, failed = app.engine.step, []

    def failing_step():  # the first step with the request in a row fails, once
        if app.engine.busy_slots and not failed:
            failed.append(1)
            raise RuntimeError("a device error")
        step()

    body = {"model": NAME, "prompt": "Hello", "max_tokens": 20, "temperature": 0}
    monkeypatch.setattr(app.engine, "step", failing_step)
    status, data = request(url, "POST", "/v1/completions", body)
    assert status == 500 and data["error"]["type"] == "server_error" and "engine failed" in data["error"]["message"]
    failed.clear()
    connection, reply = post(url, "/v1/completions", json.dumps({**body, "stream": True}).encode())
    events = [line for line in reply.read().decode().splitlines() if line.startswith("data: ")]
    connection.close()
    assert "engine failed" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert complete(client, "Hello", max_tokens=3, temperature=0).usage.completion_tokens == 3
