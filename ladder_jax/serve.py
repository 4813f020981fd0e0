"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    python -m ladder_jax serve --checkpoint runs/tiny-... [overrides] [--port 8000 --slots 8]

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
"stream": true), GET /v1/models and /health. Prompts are tokenized as transformers does (BOS only
when the tokenizer adds one; chat messages through the model's chat template), generation stops
at every end id of generation_config.json and at the request's stop strings. Sampling settings
(temperature, top_p, top_k, seed) are per request; temperature 0 is greedy.

One engine thread runs the decode loop; request handlers hand it requests and receive tokens
through an asyncio queue. A request the model cannot serve gets a 400 with a one-line message;
a client that disconnects has its request cancelled and its slot freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from . import engine as E
from .decode import DecodeError, Sampling
from .errors import LadderError
from .tokenizer import ChatTemplateError


class Body(BaseModel):
    """Fields every generation request shares; unknown fields are refused (400)."""

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
    n: Literal[1] = 1
    user: str | None = None


class CompletionBody(Body):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class BadRequest(LadderError):
    """A request the server refuses (HTTP 400); the message says what to change."""


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class TextOut:
    """The text of a request's tokens, cut at the first stop string. `push` runs on the engine's
    thread and returns (text that is safe to send now, whether to go on): the tail that could
    still begin a stop string, or an unfinished character, is held back."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.flush(), False
        end = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        new, self.sent = self.text[self.sent : max(end, self.sent)], max(end, self.sent)
        return new, True

    def flush(self) -> str:
        new, self.sent = self.text[self.sent :], len(self.text)
        return new


class Server:
    """The FastAPI app (`self.app`) and the engine thread behind it."""

    def __init__(self, engine: E.Engine, tokenizer, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())
        self.thread: threading.Thread | None = None
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

    def prepare(self, body: Body, chat: bool) -> tuple[list[int], int, Sampling, list[str]]:
        if body.model != self.model_name:
            raise BadRequest(f"model '{body.model}' is not served here; use '{self.model_name}' (GET /v1/models)")
        if chat:
            messages = [m.model_dump() for m in body.messages]
            prompt = self.tokenizer.encode(self.tokenizer.render_chat(messages))
        else:
            if not body.prompt:
                raise BadRequest("prompt is empty; give some text to continue")
            prompt = self.tokenizer.encode_prompt(body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        max_tokens = 16 if max_tokens is None else max_tokens
        seed = random.randrange(2**31) if body.seed is None else body.seed
        sampling = Sampling(body.temperature, body.top_k, body.top_p, seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise BadRequest("stop strings must not be empty")
        return prompt, max_tokens, sampling, stops

    async def generate(self, body: Body, chat: bool):
        prompt, max_tokens, sampling, stops = self.prepare(body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        text = TextOut(self.tokenizer, stops)

        def on_token(token):
            piece, go_on = text.push(token)
            loop.call_soon_threadsafe(events.put_nowait, piece)
            return go_on

        def on_done(reason):
            loop.call_soon_threadsafe(events.put_nowait, (text.flush(), reason))

        request = E.Request(prompt, max_tokens, sampling, self.tokenizer.stop_ids, on_token, on_done)
        self.engine.submit(request)  # DecodeError (400) if it cannot be served
        return request, events, len(prompt)

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

        @app.get("/health")
        async def health():
            return {"status": "ok", "busy_slots": self.engine.busy_slots, "slots": self.engine.slots}

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ladder_jax"}],
            }

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, raw: Request):
            return await self.respond(body, raw, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatBody, raw: Request):
            return await self.respond(body, raw, chat=True)

        return app

    async def respond(self, body: Body, raw: Request, chat: bool):
        request, events, prompt_tokens = await self.generate(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"

        def choice(text, reason, delta=False):
            if not chat:
                return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}

        def usage():
            n = len(request.tokens)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

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

        if not body.stream:
            pieces = []
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, tuple):
                        pieces.append(event[0])
                        return record([choice("".join(pieces), finish(event[1]))], usage=usage())
                    pieces.append(event)
            finally:
                request.cancel()  # no-op once done; frees the slot if the client went away

        async def stream():
            try:
                while True:
                    event = await events.get()
                    done = isinstance(event, tuple)
                    piece = event[0] if done else event
                    if piece or done:
                        reason = finish(event[1]) if done else None
                        yield f"data: {json.dumps(record([choice(piece, reason, delta=True)]))}\n\n"
                    if done:
                        yield "data: [DONE]\n\n"
                        return
            finally:
                request.cancel()  # the client disconnected (or we are done): free the slot

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
    For tests and benchmarks that talk to the server from the same process."""
    import uvicorn

    server.start()
    web = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning"))
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
