"""The OpenAI-compatible HTTP server: routes, streaming, errors.

    POST /v1/completions        text or token-id prompts (one or a batch), n choices, SSE streaming
    POST /v1/chat/completions   messages through the model's chat template
    GET  /v1/models, /health, /metrics (Prometheus)

Errors are OpenAI error objects {"error": {"message", "type", "param", "code"}}: 400 for a bad
request (the field in `param`, `model` for a model not served here), 404 for an unknown route, 429
with Retry-After when the server is full, 500 only for an engine fault and only to the requests it
touched (a stream already under way gets an error event instead). A client that disconnects aborts
its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moejax.engine.sampling import RequestError
from moejax.serve.engine_loop import Delta, EngineLoop, QueueFull, RequestStream
from moejax.serve.metrics import ServerMetrics
from moejax.serve.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from moejax.serve.text import TextStream, chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from moejax.llm import LLM

DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there
_PYDANTIC_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class EngineFault(RuntimeError):
    """The engine failed on an iteration of this request (the server's 500)."""


def error_response(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    """A pydantic error location as the field's name: ('body', 'messages', 0, 'content', 'str') ->
    'messages[0].content' (union member tags dropped)."""
    parts = ""
    for x in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(x, int):
            parts += f"[{x}]"
        elif x.isidentifier() and x.islower() and x not in _PYDANTIC_TAGS:
            parts += f".{x}" if parts else x
    return parts or ("body" if loc[:1] == ("body",) else None)


def create_app(llm: "LLM", *, model_name: str | None = None, max_waiting: int = 64) -> FastAPI:
    """The app serving `llm`'s engine (started with the app, stopped with it). max_waiting: requests
    held beyond the engine's max_num_seqs before answering 429."""
    name = model_name or llm.config.name
    metrics = ServerMetrics(name)
    loop = EngineLoop(llm.engine, metrics, max_waiting=max_waiting)
    max_model_len = llm.engine.scheduler.config.max_model_len

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="moejax", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics = loop, metrics

    # --- errors ----------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _param_of(tuple(first.get("loc", ())))
        metrics.rejected(400)
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "not a field of this request"
        # a union field (prompt, stop, ...): every member type failed (pydantic tags each error with
        # the member after the field); say which types the field accepts
        field = tuple(first.get("loc", ()))[:2]
        members = [e["loc"][2] for e in errors if tuple(e["loc"][:2]) == field and len(e["loc"]) > 2
                   and isinstance(e["loc"][2], str) and _param_of(tuple(e["loc"][:3])) == _param_of(field)]
        if len(set(members)) > 1:
            message = f"expected one of: {', '.join(dict.fromkeys(members))}"
        return error_response(400, f"{param}: {message}" if param else message, param)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        metrics.rejected(400)
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        metrics.rejected(429)
        return error_response(429, str(exc), None, "rate_limit_error", "queue_full",
                              headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(EngineFault)
    async def engine_fault(request: Request, exc: EngineFault):
        return error_response(500, str(exc), None, "internal_server_error", "engine_fault")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, "invalid_request_error",
                              "not_found" if exc.status_code == 404 else None)

    # --- routes ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not loop.alive:
            return error_response(503, f"the engine loop is not running ({loop.error!r})", None,
                                  "internal_server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "moejax",
                                            "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check(body)
        return await _run(body, raw, [llm.encode(p) for p in body.prompts()], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        _check(body)
        text = llm.apply_chat_template(body.conversation(), add_generation_prompt=body.add_generation_prompt)
        return await _run(body, raw, [llm.encode(text, param="messages")], chat=True)

    def _check(body: _Sampling) -> None:
        body.check()
        if body.model not in (None, name):
            raise RequestError(f"model {body.model!r} is not served here; this server serves {name!r}",
                               param="model")

    async def _run(body: _Sampling, raw: Request, prompts: list[list[int]], chat: bool):
        prompt_param = "messages" if chat else "prompt"
        requests = []
        for ids in prompts:
            for choice in range(body.n):
                params = body.sampling_params(len(ids), max_model_len, choice)
                checked = llm.engine.check_request(ids, params, prompt_param=prompt_param,
                                                   max_tokens_param=body.requested_max_tokens()[1])
                requests.append((checked, params))
        streams = loop.submit(requests)
        choices = [_Choice(i, s, TextStream(llm.tokenizer, body.stop_strings), body) for i, s in enumerate(streams)]
        response = _Response(body, chat, name, choices, llm.tokenizer)
        if body.stream:
            return StreamingResponse(_sse(response, loop), media_type="text/event-stream")
        try:
            completed = await _until_done_or_disconnected(response, raw, loop)
        finally:
            _release(response, loop)
        return response.whole() if completed else Response(status_code=499)  # nobody is listening

    return app


class _Choice:
    """One choice of a response: its engine request, its text so far, how it ended."""

    def __init__(self, index: int, stream: RequestStream, text: TextStream, body: _Sampling):
        self.index = index
        self.stream = stream
        self.text = text
        self.num_logprobs = body.num_logprobs()
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.text_offset = 0

    async def next(self, loop: EngineLoop) -> tuple[str, list[int], list]:
        """The next delta as (new text, new token ids, new logprobs); sets finish_reason at the end.
        A stop string ends the choice here and aborts the engine request."""
        delta: Delta = await self.stream.next()
        if delta.finish_reason == "error":
            self.finish_reason = "error"
            raise EngineFault(f"the engine failed on this request: {delta.error}")
        finished = delta.finish_reason is not None
        before = len(self.text.token_ids)
        text = self.text.add(delta.token_ids, finished)
        kept = len(self.text.token_ids) - before  # fewer than came when a stop string ended the text
        token_ids, logprobs = delta.token_ids[:kept], (delta.logprobs or [])[:kept]
        self.token_ids += token_ids
        self.logprobs += logprobs
        if self.text.stopped:
            self.finish_reason = "stop"
            loop.abort(self.stream)
        elif finished:
            self.finish_reason = delta.finish_reason
        return text, token_ids, logprobs

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Response:
    """A completions or chat response, whole or as SSE chunks."""

    def __init__(self, body: _Sampling, chat: bool, model: str, choices: list[_Choice], tokenizer):
        self.body, self.chat, self.model, self.choices, self.tokenizer = body, chat, model, choices, tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = ["" for _ in choices]
        self.prompt_tokens = sum(c.stream.num_prompt_tokens for c in choices[::body.n])  # once per prompt

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _logprobs(self, c: _Choice, token_ids: list[int], logprobs: list) -> dict | None:
        if c.num_logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, logprobs, c.num_logprobs)
        out = completion_logprobs(self.tokenizer, token_ids, logprobs, c.num_logprobs, c.text_offset)
        c.text_offset = out["text_offset"][-1] + len(out["tokens"][-1]) if token_ids else c.text_offset
        return out

    def _extra(self, c: _Choice, token_ids: list[int]) -> dict:
        if not self.body.return_token_ids:
            return {}
        return {"token_ids": token_ids}

    def whole(self) -> dict:
        choices = []
        for c in self.choices:
            text = c.text.text
            logprobs = self._logprobs(c, c.token_ids, c.logprobs)
            extra = self._extra(c, c.token_ids)
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": c.finish_reason, **extra})
            else:
                choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, **extra})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def chunk(self, c: _Choice, text: str, token_ids: list[int], logprobs: list, first: bool) -> dict:
        lp = self._logprobs(c, token_ids, logprobs) if token_ids else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}
        else:
            choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
        choice.update(self._extra(c, token_ids))
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.body.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


async def _deltas(response: _Response, loop: EngineLoop) -> AsyncIterator[tuple[_Choice, str, list, list]]:
    """Every choice's deltas as they come, interleaved."""
    pending = {asyncio.ensure_future(c.next(loop)): c for c in response.choices}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                c = pending.pop(task)
                text, token_ids, logprobs = task.result()
                yield c, text, token_ids, logprobs
                if not c.done:
                    pending[asyncio.ensure_future(c.next(loop))] = c
    finally:
        for task in pending:
            task.cancel()


async def _until_done_or_disconnected(response: _Response, raw: Request, loop: EngineLoop) -> bool:
    """Wait for every choice to finish -> True, or for the client to go away -> False."""
    async def collect():
        async for _ in _deltas(response, loop):
            pass

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            task.result()  # an engine fault raises here
            return True
        if await raw.is_disconnected():
            task.cancel()
            return False


def _release(response: _Response, loop: EngineLoop) -> None:
    """The handler is done: abort what is unfinished (a client gone, a fault in a sibling choice)."""
    for c in response.choices:
        if not c.done:
            loop.abort(c.stream)


async def _sse(response: _Response, loop: EngineLoop) -> AsyncIterator[str]:
    """Server-sent events: a chunk per delta of a choice, then the usage chunk if asked, then [DONE].
    Runs until the client goes away (Starlette cancels it), which aborts what is unfinished."""
    first = {c.index: True for c in response.choices}
    try:
        async for c, text, token_ids, logprobs in _deltas(response, loop):
            if text or token_ids or c.done or first[c.index]:
                yield _event(response.chunk(c, text, token_ids, logprobs, first[c.index]))
                first[c.index] = False
        if response.body.include_usage:
            yield _event(response.usage_chunk())
    except EngineFault as e:
        yield _event({"error": {"message": str(e), "type": "internal_server_error", "param": None,
                                "code": "engine_fault"}})
    finally:
        _release(response, loop)
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# --- running it -------------------------------------------------------------------------------------------

def serve(llm: "LLM", *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_waiting: int = 64, log_level: str = "info") -> None:
    """Serve `llm` until SIGINT / SIGTERM, then return (uvicorn)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after shutting down; return instead, so that a multi-host
            # process 0 reaches JAX's shutdown barrier with its followers rather than dying under them
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    app = create_app(llm, model_name=model_name, max_waiting=max_waiting)
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()


@contextlib.contextmanager
def running_server(llm: "LLM", *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60.0,
                   **app_options) -> Iterator[str]:
    """A server on a background thread of this process (tests, benchmarks) -> its base URL
    (port 0: a free port)."""
    import uvicorn

    app = create_app(llm, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="moejax-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(60)
