"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    python -m ladder_jax serve --checkpoint runs/tiny-... [overrides] [--port 8000 --max-running 8]

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, /health and /metrics (Prometheus). Prompts are tokenized as
transformers does (BOS only when the tokenizer adds one; chat messages through the model's chat
template), generation stops at every end id of generation_config.json and at the request's stop
strings. Sampling settings (temperature, top_p, top_k, seed) are per request; temperature 0 is
greedy. `n` samples share one prefill; `logprobs`/`top_logprobs` come from every decode step;
with an API key, /v1 wants `Authorization: Bearer <key>`. docs/serving.md lists every field.

One engine thread runs the decode loop; request handlers hand it requests and receive tokens
through an asyncio queue. A request the model cannot serve gets a 400 with a one-line message;
a client that disconnects has its request cancelled and its row and KV pages freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import random
import threading
import time
import uuid

import numpy as np
import prometheus_client as prom
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from . import engine as E
from .decode import DecodeError, Sampling
from .errors import LadderError
from .tokenizer import ChatTemplateError

MAX_N = 8  # samples per request
MAX_LOGPROBS = E.MAX_LOGPROBS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class Body(BaseModel):
    """Fields every generation request shares; unknown fields are refused (400). Ranges are
    checked in `Server.prepare` and by the engine, each with a message that says what to send."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(
        default=None, description="new tokens at most (default: 16 or max_completion_tokens)"
    )
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CompletionBody(Body):
    prompt: str
    logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class BadRequest(LadderError):
    """A request the server refuses (HTTP 400); the message says what to change."""


class Unauthorized(LadderError):
    """A /v1 request without the server's API key (HTTP 401)."""


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class TextOut:
    """The text of a request's tokens, cut at the first stop string. `push` runs on the engine's
    thread and returns (text that is safe to send now, whether to go on): the tail that could
    still begin a stop string, or an unfinished character, is held back.

    Detokenization is incremental, as vLLM's: each token decodes only the window of ids from
    `prefix` (the start of the last text emitted) on, and the new text is what that window adds
    to the text of ids[prefix:read]. A window whose text ends in an unfinished character (U+FFFD)
    emits nothing and grows until the character completes. Stop strings are searched in the
    unsent text only (what is held back plus the new piece), so a token costs the same at any
    output length."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to text already taken
        self.unsent = ""  # text taken from the ids and not yet sent
        self.ended = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        seen = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self.unsent += text[len(seen) :]
            self.prefix, self.read = self.read, len(self.ids)
        cut = min((i for i in (self.unsent.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.unsent, self.ended = self.unsent[:cut], True
            return self.flush(), False
        send = max(len(self.unsent) - self.hold, 0)
        new, self.unsent = self.unsent[:send], self.unsent[send:]
        return new, True

    def flush(self) -> str:
        """Everything not sent yet: at the end, an unfinished character too (as U+FFFD)."""
        if not self.ended:
            seen = self.tokenizer.decode(self.ids[self.prefix : self.read])
            self.unsent += self.tokenizer.decode(self.ids[self.prefix :])[len(seen) :]
            self.prefix = self.read = len(self.ids)
            self.ended = True
        new, self.unsent = self.unsent, ""
        return new


class Metrics:
    """Prometheus metrics under vLLM's names with a `ladder_jax:` prefix, in a registry of the
    server's own: requests running and waiting and the KV cache's share in use (read when
    scraped), time to first token, inter-token and end-to-end latency, tokens and finished
    requests (counted as requests go)."""

    def __init__(self, engine: E.Engine, model_name: str):
        self.registry = prom.CollectorRegistry()
        label = {"model_name": model_name}

        def metric(kind, name, doc, **kw):
            labels = ["model_name", *kw.pop("labels", ())]
            return kind(f"ladder_jax:{name}", doc, labels, registry=self.registry, **kw)

        for name, doc, read in [
            ("num_requests_running", "Requests decoding.", lambda: engine.busy_slots),
            ("num_requests_waiting", "Requests waiting for a row and pages.", lambda: engine.waiting_requests),
            (
                "kv_cache_usage_perc",
                "KV cache usage, 1 is all: the share of the KV cache's pages held by requests.",
                lambda: engine.pages_in_use / engine.total_pages,
            ),
        ]:
            metric(prom.Gauge, name, doc).labels(**label).set_function(read)
        self.registry.register(EngineCounters(engine, model_name))
        seconds = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0]
        self.first_token = metric(
            prom.Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=seconds
        ).labels(**label)
        self.inter_token = metric(
            prom.Histogram, "inter_token_latency_seconds", "Time between tokens of a request.", buckets=seconds
        ).labels(**label)
        self.e2e = metric(
            prom.Histogram, "e2e_request_latency_seconds", "Request latency.", buckets=[*seconds, 80.0, 160.0]
        ).labels(**label)
        self.prompt_tokens = metric(prom.Counter, "prompt_tokens", "Prompt tokens of the requests.").labels(**label)
        self.generation_tokens = metric(prom.Counter, "generation_tokens", "Tokens generated.").labels(**label)
        self.success = metric(prom.Counter, "request_success", "Finished requests.", labels=["finished_reason"])
        self.label = label

    def text(self) -> bytes:
        return prom.generate_latest(self.registry)


class EngineCounters:
    """The engine's own running counts as Prometheus counters, read when scraped: vLLM's
    prefix_cache_queries and prefix_cache_hits (prompt tokens looked up in the prefix cache,
    and found there; their ratio is the hit rate)."""

    def __init__(self, engine: E.Engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        for name, doc, value in [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", self.engine.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", self.engine.prefix_hits),
        ]:
            family = CounterMetricFamily(f"ladder_jax:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class Sample:
    """One of a request's `n` samples as the handler sees it: the engine request, its text, and
    the timing the metrics record (on the engine's thread)."""

    def __init__(self, server: Server, index: int, request: E.Request, text: TextOut, start: float):
        self.index, self.request, self.text = index, request, text
        self.metrics, self.start, self.last = server.metrics, start, None

    def record_token(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.first_token.observe(now - self.start)
        else:
            self.metrics.inter_token.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc()

    def record_end(self, reason: str) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        reason = {"cancelled": "abort"}.get(reason, reason)  # vLLM's word for it
        self.metrics.success.labels(**self.metrics.label, finished_reason=reason).inc()


class Server:
    """The FastAPI app (`self.app`) and the engine thread behind it. With `api_key`, every /v1
    request must send `Authorization: Bearer <api_key>` (401 otherwise); /health and /metrics
    stay open, as vLLM's."""

    def __init__(self, engine: E.Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.created = int(time.time())
        self.thread: threading.Thread | None = None
        self.metrics = Metrics(engine, model_name)
        self.app = self.build_app()

    # -- the engine thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self.engine.serve_forever, name="ladder-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.engine.stop()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # -- requests

    def prepare(self, body: Body, chat: bool) -> tuple[list[int], int, Sampling, list[str], int | None]:
        """(prompt ids, max new tokens, sampling, stop strings, logprobs: None or how many most
        likely tokens), or BadRequest for what the engine does not check itself."""
        if body.model != self.model_name:
            raise BadRequest(f"model '{body.model}' is not served here; use '{self.model_name}' (GET /v1/models)")
        if not 1 <= body.n <= MAX_N:
            raise BadRequest(f"n={body.n}; give 1..{MAX_N} samples")
        if body.stream_options is not None and not body.stream:
            raise BadRequest("stream_options is only allowed with stream: true")
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            name = "top_logprobs"
            messages = [m.model_dump() for m in body.messages]
            prompt = self.tokenizer.encode(self.tokenizer.render_chat(messages))
        else:
            logprobs, name = body.logprobs, "logprobs"
            if not body.prompt:
                raise BadRequest("prompt is empty; give some text to continue")
            prompt = self.tokenizer.encode_prompt(body.prompt)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"{name}={logprobs}; give 0..{MAX_LOGPROBS}")
        max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        max_tokens = 16 if max_tokens is None else max_tokens
        seed = random.randrange(2**31) if body.seed is None else body.seed
        top_k = 0 if body.top_k == -1 else body.top_k  # vLLM's "off"
        sampling = Sampling(body.temperature, top_k, body.top_p, seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise BadRequest("stop strings must not be empty")
        return prompt, max_tokens, sampling, stops, logprobs

    async def generate(self, body: Body, chat: bool):
        """Submit the request's samples (one prefill for all). Events arrive on the returned queue:
        (sample index, text, [(token, TokenLogprobs)] if asked) per token, and at the end
        (index, the text held back, [], finish reason)."""
        start = time.perf_counter()
        prompt, max_tokens, sampling, stops, logprobs = self.prepare(body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        samples = []
        for i in range(body.n):
            seeded = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**31)
            request = E.Request(prompt, max_tokens, seeded, self.tokenizer.stop_ids, logprobs=logprobs)
            samples.append(Sample(self, i, request, TextOut(self.tokenizer, stops), start))

        for sample in samples:

            def on_token(token, s=sample):
                s.record_token()
                piece, go_on = s.text.push(token)
                scored = [(token, s.request.token_logprobs[-1])] if logprobs is not None else []
                loop.call_soon_threadsafe(events.put_nowait, (s.index, piece, scored))
                return go_on

            def on_done(reason, s=sample):
                s.record_end(reason)
                loop.call_soon_threadsafe(events.put_nowait, (s.index, s.text.flush(), [], reason))

            sample.request.on_token, sample.request.on_done = on_token, on_done
        self.engine.submit_group([s.request for s in samples])  # DecodeError (400) if it cannot be served
        self.metrics.prompt_tokens.inc(len(prompt))
        return samples, events, len(prompt), logprobs is not None

    def token(self, token: int, logprob: float) -> dict:
        """A token as chat's logprobs show it: text, log p and UTF-8 bytes."""
        data = getattr(self.tokenizer, "decode_bytes", None)
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(data([token]) if data else text.encode())}

    def chat_logprobs(self, tokens: list[int], entries: list[E.TokenLogprobs]) -> dict:
        return {
            "content": [
                {**self.token(t, e.logprob), "top_logprobs": [self.token(i, lp) for i, lp in e.top]}
                for t, e in zip(tokens, entries, strict=True)
            ]
        }

    def completion_logprobs(self, tokens: list[int], entries: list[E.TokenLogprobs], offset: int) -> dict:
        """The completions API's logprobs: tokens' texts, their log p, the most likely tokens of
        each position (the chosen one with them, as OpenAI's) and each token's text offset."""
        texts = [self.tokenizer.decode([t]) for t in tokens]
        offsets = (offset + np.cumsum([0, *map(len, texts)])[:-1]).tolist()
        top = [{self.tokenizer.decode([i]): lp for i, lp in [*e.top, (t, e.logprob)]} for t, e in zip(tokens, entries)]
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ladder_jax", docs_url=None, redoc_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid(_, exc: RequestValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            return error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

        for kind in (BadRequest, DecodeError, ChatTemplateError):

            @app.exception_handler(kind)
            async def refused(_, exc):
                return error(400, str(exc))

        @app.exception_handler(Unauthorized)
        async def unauthorized(_, exc):
            return error(401, str(exc), "authentication_error")

        def authorize(raw: Request) -> None:
            if self.api_key is None:
                return
            sent = raw.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
                what = "wrong" if sent else "missing"
                raise Unauthorized(f"{what} API key; send the header 'Authorization: Bearer <the server's --api-key>'")

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

        @app.get("/health")
        async def health():
            e = self.engine
            return {
                "status": "ok",
                "busy_slots": e.busy_slots,
                "slots": e.slots,
                "kv_pages_in_use": e.pages_in_use,
                "kv_pages_cached": e.cached_pages,
                "prefix_cache_hit_rate": e.prefix_hit_rate,
            }

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @v1.get("/models")
        async def models():
            return {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ladder_jax"}],
            }

        @v1.post("/completions")
        async def completions(body: CompletionBody, raw: Request):
            return await self.respond(body, raw, chat=False)

        @v1.post("/chat/completions")
        async def chat_completions(body: ChatBody, raw: Request):
            return await self.respond(body, raw, chat=True)

        app.include_router(v1)
        return app

    async def respond(self, body: Body, raw: Request, chat: bool):
        samples, events, prompt_tokens, want_logprobs = await self.generate(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        sent = [0] * len(samples)  # characters each sample has sent (completions' text offsets)

        def choice(index, text, scored, reason, delta=False):
            """`scored`: (token, TokenLogprobs) of the tokens behind `text` when logprobs are asked."""
            tokens, entries = [t for t, _ in scored], [e for _, e in scored]
            if not chat:
                logprobs = self.completion_logprobs(tokens, entries, sent[index]) if want_logprobs else None
                sent[index] += len(text)
                return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
            key = "delta" if delta else "message"
            return {
                "index": index,
                key: {"role": "assistant", "content": text},
                "logprobs": self.chat_logprobs(tokens, entries) if want_logprobs else None,
                "finish_reason": reason,
            }

        def usage():
            n = sum(len(s.request.tokens) for s in samples)
            cached = {"cached_tokens": samples[0].request.cached_tokens}  # found in the prefix cache
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
                "prompt_tokens_details": cached,
            }

        def record(choices, **extra):
            obj = kind + (".chunk" if chat and body.stream else "")
            return {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                **extra,
            }

        def cancel():  # no-op once done; frees the rows and pages if the client went away
            for s in samples:
                s.request.cancel()

        if not body.stream:
            pieces, scored = [[] for _ in samples], [[] for _ in samples]
            reasons = [None] * len(samples)
            try:
                while None in reasons:
                    index, piece, new, *end = await events.get()
                    pieces[index].append(piece)
                    scored[index] += new
                    if end:
                        reasons[index] = finish(end[0])
                choices = [choice(i, "".join(pieces[i]), scored[i], reasons[i]) for i in range(len(samples))]
                return record(choices, usage=usage())
            finally:
                cancel()

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def stream():
            held = [[] for _ in samples]  # log-probabilities of tokens whose text is held back
            done = 0
            try:
                while done < len(samples):
                    index, piece, new, *end = await events.get()
                    held[index] += new
                    if piece or end:
                        reason = finish(end[0]) if end else None
                        chunk = record([choice(index, piece, held[index], reason, delta=True)])
                        held[index] = []
                        yield f"data: {json.dumps({**chunk, 'usage': None} if include_usage else chunk)}\n\n"
                    done += bool(end)
                if include_usage:
                    yield f"data: {json.dumps(record([], usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel()  # the client disconnected (or we are done): free the rows and pages

        return StreamingResponse(stream(), media_type="text/event-stream")


def finish(reason: str) -> str:
    """OpenAI's finish reasons: "stop" (an end id or stop string) or "length"."""
    return "length" if reason == "length" else "stop"


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    server.start()
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="info")
    finally:
        server.stop()


@contextlib.contextmanager
def serving_in_thread(server: Server, host: str = "127.0.0.1", port: int = 0):
    """Serve in a background thread (port 0: a free one) and yield the base URL; stop on exit.
    For tests and benchmarks that talk to the server from the same process. Idle connections stay
    open a minute, not uvicorn's 5 s: such a caller pauses between requests (to compile a
    reference, say), and a pooled connection the server closes as the client reuses it fails that
    request with "Server disconnected"."""
    import uvicorn

    server.start()
    config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", timeout_keep_alive=60)
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        while not web.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.05)
        yield f"http://{host}:{web.servers[0].sockets[0].getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(timeout=30)
        server.stop()
