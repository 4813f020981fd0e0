"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    python -m ladder_jax serve --checkpoint runs/tiny-... [overrides] [--port 8000 --max-running 8]

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, vLLM's POST /tokenize and /detokenize and GET /tokenizer_info
(lm-eval's remote tokenizer), GET /health and /metrics (Prometheus). Prompts are tokenized as
transformers does (BOS only when the tokenizer adds one; chat messages through the model's chat
template), generation stops at every end id of generation_config.json and at the request's stop
strings. Sampling settings (temperature, top_p, top_k, seed) are per request; temperature 0 is
greedy. `n` samples share one prefill; `logprobs`/`top_logprobs` come from every decode step,
and with `echo` from the prefill for the prompt's tokens too (what lm-eval's local-completions
scores with); with an API key, /v1 and the tokenizer endpoints want `Authorization: Bearer <key>`. docs/serving.md lists every field.

One engine thread runs the decode loop; request handlers hand it requests and receive tokens
through an asyncio queue. A request the model cannot serve gets a 400 with a one-line message;
a client that disconnects has its request cancelled and its row and KV pages freed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hmac
import json
import random
import socket
import threading
import time
import uuid

import prometheus_client as prom
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import engine as E
from .decode import DecodeError, Sampling
from .errors import LadderError
from .tokenizer import ChatTemplateError

MAX_N = 8  # samples per request
MAX_LOGPROBS = E.MAX_LOGPROBS


class BadRequest(LadderError):
    """A request the server refuses (HTTP 400); the message says what to change."""


class NotFound(LadderError):
    """A model the server does not serve (HTTP 404)."""


class Unauthorized(LadderError):
    """A /v1 request without the server's API key (HTTP 401)."""


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object; `code` is the HTTP status, as vLLM's."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class Body(BaseModel):
    """Fields every generation request shares. As OpenAI's, every field may be null (its default)
    and a value of the wrong type is refused, not converted; unknown fields are refused (400).
    Ranges are checked in `Server.prepare` and by the engine, each with a message that says what
    to send. Some OpenAI fields the server does not implement are taken at the value that changes
    nothing, which clients send by default (`NEUTRAL`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(
        default=None, description="new tokens at most (default: 16 for completions, the rest of the context for chat)"
    )
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None  # vLLM's: run to max_tokens past the end ids (benchmark clients send it)


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        """The content as the chat template reads it: text parts joined by newlines (as vLLM's)."""
        if self.content is None:
            if self.role != "assistant":
                raise BadRequest(f"messages[{i}] has no content; only an assistant message may leave it out")
            return ""
        if isinstance(self.content, str):
            return self.content
        other = [p.type for p in self.content if p.type != "text" or p.text is None]
        if other:
            raise BadRequest(f"messages[{i}] has a '{other[0]}' content part; this model takes text parts only")
        return "\n".join(p.text for p in self.content)


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    return_token_strs: bool | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


# OpenAI fields the server takes only at the value that changes nothing: (the values it takes, what to send).
NEUTRAL = {
    "frequency_penalty": ((0,), "leave it out or send 0"),
    "presence_penalty": ((0,), "leave it out or send 0"),
    "logit_bias": (({},), "leave it out or send {}"),
    "suffix": (("",), "leave it out"),
    "response_format": (({"type": "text"},), 'leave it out or send {"type": "text"}'),
    "tools": (([],), "leave it out: this server does not call tools"),
    "tool_choice": (("none", "auto"), 'leave it out or send "none"'),
}


@dataclasses.dataclass
class Prepared:
    """A request as the engine takes it: each prompt's ids (and its text, for echo), the new
    tokens each sample may make (and the field that said so), samples per prompt, the sampling, stop
    strings and logprobs (None or how many most likely), of the new tokens and (echo) of the prompt."""

    prompts: list[list[int]]
    texts: list[str]
    max_tokens: int
    limit: str
    n: int
    sampling: Sampling
    stops: list[str]
    logprobs: int | None
    prompt_logprobs: int | None = None
    stop_ids: frozenset[int] = frozenset()


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
        self.ended = self.cut = False  # cut: a stop string ended the text
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.starts: list[int] = []  # where each token's text begins in the whole text
        self.sent = 0  # characters sent
        self.pending = 0  # characters of the window past the text taken (unfinished: U+FFFD)

    def push(self, token: int) -> tuple[str, bool]:
        self.starts.append(self.sent + len(self.unsent) + self.pending)
        self.ids.append(token)
        seen = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.pending = len(text) - len(seen)
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self.unsent += text[len(seen) :]
            self.prefix, self.read, self.pending = self.read, len(self.ids), 0
        cut = min((i for i in (self.unsent.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.unsent, self.ended, self.cut = self.unsent[:cut], True, True
            return self.flush(), False
        send = max(len(self.unsent) - self.hold, 0)
        new, self.unsent = self.unsent[:send], self.unsent[send:]
        self.sent += len(new)
        return new, True

    def flush(self) -> str:
        """Everything not sent yet: at the end, an unfinished character too (as U+FFFD)."""
        if not self.ended:
            seen = self.tokenizer.decode(self.ids[self.prefix : self.read])
            self.unsent += self.tokenizer.decode(self.ids[self.prefix :])[len(seen) :]
            self.prefix = self.read = len(self.ids)
            self.ended = True
        new, self.unsent = self.unsent, ""
        self.sent += len(new)
        return new

    def behind(self) -> int:
        """How many tokens the text sent so far stands for: those whose text begins in it, and at
        the end every token unless a stop string cut the text (the tokens from the cut on are not
        part of it, as their log-probabilities are not)."""
        if self.ended and not self.cut:
            return len(self.ids)
        return bisect.bisect_left(self.starts, self.sent)


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
    and found there; their ratio is the hit rate) and num_preemptions."""

    def __init__(self, engine: E.Engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        for name, doc, value in [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", self.engine.prefix_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", self.engine.prefix_hits),
            ("num_preemptions", "Requests preempted for want of KV cache pages.", self.engine.preemptions),
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
    and tokenizer request must send `Authorization: Bearer <api_key>` (401 otherwise); /health
    and /metrics stay open, as vLLM's."""

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

    def check_model(self, model: str | None) -> None:
        if model != self.model_name:
            raise NotFound(f"model '{model}' is not served here; use '{self.model_name}' (GET /v1/models)")

    def prepare(self, body: Body, chat: bool) -> Prepared:
        """The request as the engine takes it, or BadRequest (NotFound) for what the engine does
        not check itself."""
        self.check_model(body.model)
        n = body.n if body.n is not None else 1
        if not 1 <= n <= MAX_N:
            raise BadRequest(f"n={n}; give 1..{MAX_N} samples")
        for field, (takes, fix) in NEUTRAL.items():
            value = getattr(body, field, None)
            if value is not None and value not in takes:
                raise BadRequest(f"{field}={json.dumps(value)} is not supported; {fix}")
        if body.stream_options is not None and not body.stream:
            raise BadRequest("stream_options is only allowed with stream: true")
        if body.seed is not None and not 0 <= body.seed < 2**31:
            raise BadRequest(f"seed={body.seed}; give 0..{2**31 - 1}")
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            name = "top_logprobs"
            texts = [self.render_chat(body.messages)]
            prompts = [self.encode(self.tokenizer.encode, texts[0], "messages")]
        else:
            if body.best_of not in (None, n):
                raise BadRequest(f"best_of={body.best_of} is not supported; leave it out or send n ({n})")
            logprobs, name = body.logprobs, "logprobs"
            prompts, texts = self.completion_prompts(body.prompt)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"{name}={logprobs}; give 0..{MAX_LOGPROBS}")
        # As vLLM: max_completion_tokens wins; unset, a completion makes 16 and a chat reply up to
        # the end of the positions a request may hold.
        limit = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        max_tokens = getattr(body, limit)
        if max_tokens == 0 and (chat or not body.echo):
            raise BadRequest(
                f"{limit}=0 makes nothing; ask for at least 1 new token (0 only with echo: the prompt alone)"
            )
        if max_tokens is None and not chat:
            max_tokens = 16
        elif max_tokens is None:
            max_tokens = self.engine.cache_len - len(prompts[0])
            if max_tokens < 1:
                raise BadRequest(
                    f"the messages take {len(prompts[0])} tokens, all of the {self.engine.cache_len} positions "
                    "a request may hold; shorten them"
                )
        top_k = {None: 0, -1: 0}.get(body.top_k, body.top_k)  # -1: vLLM's "off"
        sampling = Sampling(
            1.0 if body.temperature is None else body.temperature,
            top_k,
            1.0 if body.top_p is None else body.top_p,
            random.randrange(2**31) if body.seed is None else body.seed,
        )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise BadRequest("stop strings must not be empty")
        scored = logprobs if not chat and body.echo else None  # echo with logprobs scores the prompt too
        stop_ids = frozenset() if body.ignore_eos else self.tokenizer.stop_ids
        return Prepared(prompts, texts, max_tokens, limit, n, sampling, stops, logprobs, scored, stop_ids)

    def render_chat(self, messages: list[Message]) -> str:
        """The chat template's text of the messages, ending with the assistant's turn."""
        return self.tokenizer.render_chat(
            [
                {"role": m.role, "content": m.text(i)} | ({"name": m.name} if m.name is not None else {})
                for i, m in enumerate(messages)
            ]
        )

    def tokenize(self, body: TokenizeBody) -> dict:
        """vLLM's /tokenize answer: the ids of a prompt (with the tokenizer's special tokens unless
        told otherwise, as a completion's prompt is encoded) or of chat messages (without)."""
        if body.model is not None:
            self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give either prompt (text) or messages (chat), not both or neither")
        if body.prompt is not None:
            special = body.add_special_tokens is not False
            encode = self.tokenizer.encode_prompt if special else self.tokenizer.encode
            tokens = self.encode(encode, body.prompt, "prompt")
        else:
            text = self.render_chat(body.messages)
            encode = self.tokenizer.encode_prompt if body.add_special_tokens else self.tokenizer.encode
            tokens = self.encode(encode, text, "messages")
        strs = [self.tokenizer.decode([t]) for t in tokens] if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": self.engine.cache_len, "tokens": tokens, "token_strs": strs}

    def detokenize(self, body: DetokenizeBody) -> dict:
        if body.model is not None:
            self.check_model(body.model)
        vocab = self.engine.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"tokens has token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info, what lm-eval's remote tokenizer reads: the special tokens'
        texts (None where the tokenizer has none, as the byte-level one), the chat template and
        the positions a request may hold."""
        special = getattr(self.tokenizer, "special", {})
        return {
            "tokenizer_class": type(self.tokenizer).__name__,
            **{key: special.get(key) for key in ("bos_token", "eos_token", "pad_token")},
            "chat_template": self.tokenizer.chat_template,
            "model_max_length": self.engine.cache_len,
        }

    def encode(self, encode, text: str, where: str) -> list[int]:
        try:
            return encode(text)
        except UnicodeError:
            raise BadRequest(
                f"{where} is not valid Unicode (a lone surrogate such as \\ud800?); send UTF-8 text"
            ) from None

    def completion_prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """A completion's prompts, as OpenAI takes them (a string, a list of strings, token ids or
        a list of those): their token ids and their texts."""
        one = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], int))
        items = [prompt] if one else prompt
        if not items:
            raise BadRequest("prompt is empty; give some text to continue")
        prompts, texts = [], []
        for i, item in enumerate(items):
            where = "prompt" if one else f"prompt[{i}]"
            if not item:
                raise BadRequest(f"{where} is empty; give some text to continue")
            if isinstance(item, str):
                prompts.append(self.encode(self.tokenizer.encode_prompt, item, where))
                texts.append(item)
                continue
            vocab = self.engine.cfg.vocab_size
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise BadRequest(f"{where} has token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
            prompts.append(list(item))
            texts.append(self.tokenizer.decode(item))
        return prompts, texts

    async def generate(self, body: Body, chat: bool) -> tuple[list[Sample], asyncio.Queue, Prepared]:
        """Submit the request's samples, `n` per prompt (one prefill for each prompt's). Events
        arrive on the returned queue: (choice index, text, [(token, TokenLogprobs, its text's
        start)] if asked, tokens behind the text sent) per token, and at the end (index, the text
        held back, [], tokens behind the whole text, finish reason)."""
        start = time.perf_counter()
        p = self.prepare(body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        samples = []
        for i in range(len(p.prompts) * p.n):
            seeded = dataclasses.replace(p.sampling, seed=(p.sampling.seed + i) % 2**31)
            request = E.Request(
                p.prompts[i // p.n],
                max(p.max_tokens, 1),  # echo with max_tokens 0: the prefill's token is dropped (on_token)
                seeded,
                p.stop_ids,
                logprobs=p.logprobs,
                prompt_logprobs=p.prompt_logprobs,
            )
            sample = Sample(self, i, request, TextOut(self.tokenizer, p.stops), start)

            def on_token(token, s=sample):
                if p.max_tokens == 0:  # the prompt alone (scored by the prefill, with logprobs)
                    return False
                s.record_token()
                piece, go_on = s.text.push(token)
                scored = [(token, s.request.token_logprobs[-1], s.text.starts[-1])] if p.logprobs is not None else []
                loop.call_soon_threadsafe(events.put_nowait, (s.index, piece, scored, s.text.behind()))
                return go_on

            def on_done(reason, s=sample):
                s.record_end(reason)
                rest = s.text.flush()
                loop.call_soon_threadsafe(events.put_nowait, (s.index, rest, [], s.text.behind(), reason))

            request.on_token, request.on_done = on_token, on_done
            samples.append(sample)
        submitted = []
        try:
            for s in samples:
                self.engine.check(s.request)  # each prompt's, before any is submitted
            for k in range(len(p.prompts)):  # one group per prompt: it shares its prefill
                submitted += self.engine.submit_group([s.request for s in samples[k * p.n : (k + 1) * p.n]])
        except DecodeError as e:
            for r in submitted:
                r.cancel()
            raise BadRequest(str(e).replace("max_new_tokens", p.limit)) from None
        self.metrics.prompt_tokens.inc(sum(map(len, p.prompts)))
        return samples, events, p

    def token(self, token: int, logprob: float) -> dict:
        """A token as chat's logprobs show it: text, log p and UTF-8 bytes."""
        data = getattr(self.tokenizer, "decode_bytes", None)
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(data([token]) if data else text.encode())}

    def chat_logprobs(self, scored: list) -> dict:
        """Chat's logprobs of `scored`: (token, TokenLogprobs, start) each."""
        return {
            "content": [
                {**self.token(t, e.logprob), "top_logprobs": [self.token(i, lp) for i, lp in e.top]}
                for t, e, _ in scored
            ]
        }

    def completion_logprobs(self, scored: list, offset: int) -> dict:
        """The completions API's logprobs of `scored`: tokens' texts, their log p, the most likely
        tokens of each position (the chosen one with them, as OpenAI's) and where each token's
        text begins (`offset` on from its place in the completion: an echoed prompt's length)."""
        return {
            "tokens": [self.tokenizer.decode([t]) for t, _, _ in scored],
            "token_logprobs": [e.logprob for _, e, _ in scored],
            "top_logprobs": [self.top_by_text([*e.top, (t, e.logprob)]) for t, e, _ in scored],
            "text_offset": [offset + start for _, _, start in scored],
        }

    def top_by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """OpenAI's top_logprobs, keyed by token text; of tokens with the same text (bytes of an
        unfinished character all read U+FFFD) the most likely is kept, so that the largest value
        is the most likely token's, which clients such as lm-eval compare the chosen one with."""
        out: dict[str, float] = {}
        for token, logprob in sorted(top, key=lambda pair: -pair[1]):
            out.setdefault(self.tokenizer.decode([token]), logprob)
        return out

    def prompt_logprobs(self, request: E.Request) -> dict:
        """The completions API's logprobs of an echoed prompt (vLLM's): its first token has none."""
        text = TextOut(self.tokenizer, [])
        for token in request.prompt:
            text.push(token)
        first, *rest = request.prompt_token_logprobs
        scored = self.completion_logprobs(list(zip(request.prompt[1:], rest, text.starts[1:])), 0)
        scored["tokens"].insert(0, self.tokenizer.decode(request.prompt[:1]))
        scored["token_logprobs"].insert(0, first)
        scored["top_logprobs"].insert(0, first)
        scored["text_offset"].insert(0, text.starts[0])
        return scored

    def build_app(self) -> FastAPI:
        app = FastAPI(title="ladder_jax", docs_url=None, redoc_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid(_, exc: RequestValidationError):
            first = exc.errors()[0]
            if first.get("type") == "json_invalid":
                why = first.get("ctx", {}).get("error", "")
                return error(400, f"the body is not valid JSON ({why}); send one JSON object")
            message, field = validation_message(exc.errors())
            return error(400, message, param=field)

        for kind in (BadRequest, DecodeError, ChatTemplateError):

            @app.exception_handler(kind)
            async def refused(_, exc):
                return error(400, str(exc))

        @app.exception_handler(NotFound)
        async def not_found(_, exc):
            return error(404, str(exc), param="model")

        @app.exception_handler(Unauthorized)
        async def unauthorized(_, exc):
            return error(401, str(exc), "authentication_error")

        @app.exception_handler(StarletteHTTPException)
        async def http_error(raw: Request, exc: StarletteHTTPException):
            return error(exc.status_code, f"{exc.detail}: {raw.method} {raw.url.path}; {ENDPOINTS}")

        @app.exception_handler(Exception)
        async def internal(_, exc: Exception):  # a bug: the log has the traceback, the client one line
            return error(500, f"internal error ({type(exc).__name__}); the server's log says more", "server_error")

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

        # vLLM's tokenizer endpoints, at the root where lm-eval's remote tokenizer looks for them.
        tokenizer = APIRouter(dependencies=[Depends(authorize)])

        @tokenizer.post("/tokenize")
        async def tokenize(body: TokenizeBody):
            return self.tokenize(body)

        @tokenizer.post("/detokenize")
        async def detokenize(body: DetokenizeBody):
            return self.detokenize(body)

        @tokenizer.get("/tokenizer_info")
        async def tokenizer_info():
            return self.tokenizer_info()

        app.include_router(v1)
        app.include_router(tokenizer)
        return app

    async def respond(self, body: Body, raw: Request, chat: bool):
        samples, events, p = await self.generate(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        echo = [p.texts[s.index // p.n] if getattr(body, "echo", None) else "" for s in samples]
        scored = [[] for _ in samples]  # (token, TokenLogprobs, start) of each sample's tokens, if asked
        given = [0] * len(samples)  # of those, how many a choice carried already
        first = [True] * len(samples)  # no choice of the sample sent yet

        def choice(index, text, behind, reason):
            """A choice (or a chunk of one): `text`, and the log-probabilities of the tokens behind
            it, those from `given[index]` up to `behind`."""
            tokens, given[index] = scored[index][given[index] : behind], max(given[index], behind)
            opens, first[index] = first[index], False
            logprobs = None
            if not chat:
                if p.logprobs is not None:
                    logprobs = self.completion_logprobs(tokens, len(echo[index]))
                if p.prompt_logprobs is not None and opens:  # the echoed prompt's come first
                    prompt = self.prompt_logprobs(samples[index].request)
                    logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
                text = echo[index] + text if opens else text
                return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
            if p.logprobs is not None:
                logprobs = self.chat_logprobs(tokens)
            key = "delta" if body.stream else "message"
            content = {"role": "assistant", "content": text} if opens else {"content": text}
            return {"index": index, key: content, "logprobs": logprobs, "finish_reason": reason}

        def usage():
            n = sum(len(s.request.tokens) for s in samples) if p.max_tokens else 0
            prompt_tokens = sum(map(len, p.prompts))  # each prompt once, however many samples it has
            cached = sum(s.request.cached_tokens for s in samples[:: p.n])  # found in the prefix cache
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached},
            }

        def record(choices, **extra):
            obj = kind + (".chunk" if chat and body.stream else "")
            return {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": choices, **extra}

        def cancel():  # no-op once done; frees the rows and pages if the client went away
            for s in samples:
                s.request.cancel()

        if not body.stream:
            pieces = [[] for _ in samples]
            ends: list[tuple[str, int] | None] = [None] * len(samples)  # (finish reason, tokens behind the text)

            async def collect():
                while None in ends:
                    index, piece, new, behind, *end = await events.get()
                    pieces[index].append(piece)
                    scored[index] += new
                    if end:
                        ends[index] = (end[0], behind)

            try:
                if not await unless_disconnected(collect(), raw):
                    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
            finally:
                cancel()
            if any(reason == "error" for reason, _ in ends):
                return error(500, ENGINE_FAILED, "server_error")
            choices = [choice(i, "".join(pieces[i]), ends[i][1], finish(ends[i][0], p)) for i in range(len(samples))]
            return record(choices, usage=usage())

        include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)

        async def stream():
            done = failed = 0
            try:
                while done < len(samples) and not failed:
                    index, piece, new, behind, *end = await events.get()
                    scored[index] += new
                    failed = bool(end) and end[0] == "error"
                    if failed:  # as vLLM: an error event, then the end of the stream
                        yield f"data: {json.dumps(error_body(500, ENGINE_FAILED, 'server_error'))}\n\n"
                    elif piece or end:
                        chunk = record([choice(index, piece, behind, finish(end[0], p) if end else None)])
                        yield f"data: {json.dumps({**chunk, 'usage': None} if include_usage else chunk)}\n\n"
                    done += bool(end)
                if include_usage and not failed:
                    yield f"data: {json.dumps(record([], usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel()  # the client disconnected (or we are done): free the rows and pages

        return StreamingResponse(stream(), media_type="text/event-stream")


ENDPOINTS = (
    "the server has POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, "
    "POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics"
)
ENGINE_FAILED = "the engine failed while generating this request (the server's log says why); send it again"


# What a field of several forms takes, said when a value fits none of them.
FORMS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string, a list of text parts, or null (an assistant's)",
}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one line, the field) for pydantic's errors. A value that fits none of a field's forms
    has an error per form, each under the form's name (`prompt.list[int].0`): the one that got
    furthest is said, at its path without the form's name, with the forms the field takes."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [p for p in first.get("loc", ()) if p != "body"]
    forms = [p for p in loc if isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "none"))]
    path = ""
    for p in loc:
        if p not in forms:
            path += f"[{p}]" if isinstance(p, int) else f".{p}" if path else p
    if not forms:
        first = errors[0]
        path = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return (f"{path}: {first.get('msg')}" if path else str(first.get("msg"))), path or None
    field = next((p for p in reversed(loc[: loc.index(forms[0])]) if isinstance(p, str)), path)
    hint = f"; {field} takes {FORMS[field]}" if field in FORMS else ""
    return f"{path}: {first.get('msg')}{hint}", path


def finish(reason: str, p: Prepared) -> str:
    """OpenAI's finish reasons: "stop" (an end id or stop string) or "length" (max_tokens, 0
    included)."""
    return "length" if reason == "length" or p.max_tokens == 0 else "stop"


async def unless_disconnected(work, raw: Request) -> bool:
    """Await `work` (a coroutine) unless the client hangs up first (then cancel it, as vLLM's
    `with_cancellation`); whether it ended. Once the body is read, the next ASGI message is the
    disconnect."""

    async def hangup():
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        return False
    task.result()  # its exception, if any
    return True


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; on `sock` if given (bound already, see `bind`), else on host:port."""
    import uvicorn

    server.start()
    try:
        uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="info")).run([sock] if sock else None)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C's signal again once it has shut down (as uvicorn.run)
        pass
    finally:
        server.stop()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for `serve`: bound before the model loads and compiles, so an
    address in use (or no such host) is said at once, and the port stays ours meanwhile."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LadderError(f"--host {host}: {e.strerror}; give an address of this machine, such as 127.0.0.1") from None
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LadderError(
            f"cannot listen on {host}:{port} ({e.strerror}); give another --port or stop what holds it"
        ) from None
    return sock


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
