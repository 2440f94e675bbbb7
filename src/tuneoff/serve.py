"""An OpenAI-compatible HTTP server: one base model, many LoRA adapters, chosen per request.

`model` in a request names the base or an adapter; the base weights are loaded once and adapters
are switched per decoding step under the engine's lock (see `tuneoff.engine`). Every request is
checked against the server's limits first, and a refusal is a 4xx whose message names the limit.
Adapters come only from the command line or the adapters directory; request fields are never
used as paths. Runtime load/unload endpoints exist only when an admin key is configured.
Needs the `serve` extra (FastAPI + uvicorn): import this module only inside `tuneoff serve`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneoff.adapters import (
    adapter_in_dir,
    arm_model,
    base_model_of,
    check_adapter,
    check_adapter_name,
    find_adapter_dir,
    scan_adapters_dir,
)
from tuneoff.engine import SEEDS, Delta, Engine, Sampling, UnknownModel, unicode_problem
from tuneoff.model import ModelError
from tuneoff.runs import UsageError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    max_tokens: int = 512  # cap on max_tokens; also the default when a request gives none
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# --------------------------------------------------------------------------- request schemas


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEEDS.start, le=SEEDS.stop - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadRequest(BaseModel):
    name: str
    path: str | None = None  # relative to the adapters directory; default: the name


# --------------------------------------------------------------------------- checks


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refused past `limit` bytes before it is all read."""
    too_big = f"request body exceeds this server's limit of {limit} bytes (--max-body-bytes)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_big, code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, too_big, code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON body: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the JSON body nests too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    check_text(data)
    return data


def check_text(data: Any) -> None:
    """Refuse a string anywhere in the body that is not valid Unicode: JSON may escape a lone
    surrogate ("\\ud800"), which no tokenizer can encode. Walked without recursion, as deep as
    json.loads nests."""
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        texts = [value] if isinstance(value, str) else []
        texts += list(value) if isinstance(value, dict) else []  # keys, named by their object
        for text in texts:
            problem = unicode_problem(text)
            if problem:
                raise ApiError(400, f"{where or 'body'}: {problem}", where or None, "invalid_value")
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else k, v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{where}.{i}", v) for i, v in reversed(list(enumerate(value)))]


def parse(schema: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where, code="invalid_value") from None


def sampling_of(req: _Request, engine: Engine, limits: Limits, prompt_ids: list[int]) -> Sampling:
    """The request's sampling options, checked against every limit of this server."""
    if not engine.has(req.model):
        served = ", ".join(engine.names())
        raise ApiError(
            404,
            f"model {req.model!r} is not served here; models: {served}",
            "model",
            "model_not_found",
        )
    if req.n != 1:
        raise ApiError(400, "n: only n=1 is supported", "n", "invalid_value")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop: at most 4 non-empty strings", "stop", "invalid_value")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={asked} exceeds this server's limit of {limits.max_tokens} "
            "(--max-tokens-cap)",
            "max_tokens",
            "max_tokens_exceeded",
        )
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    if not prompt_ids:
        raise ApiError(400, f"{where}: the prompt is empty", where, "invalid_value")
    prompt_cap = min(limits.max_prompt_tokens or engine.context, engine.context - 1)
    if len(prompt_ids) > prompt_cap:
        raise ApiError(
            400,
            f"the prompt has {len(prompt_ids)} tokens, over this server's limit of {prompt_cap} "
            "(--max-prompt-tokens / the model's context length)",
            where,
            "prompt_too_long",
        )
    room = engine.context - len(prompt_ids)
    if asked is not None and asked > room:
        raise ApiError(
            400,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({asked}) exceeds the model's "
            f"context length of {engine.context} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    return Sampling(
        max_new_tokens=min(asked or limits.max_tokens, room),
        temperature=req.temperature or 0.0,  # greedy unless a temperature above 0 is asked
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=stops,
    )


def completion_prompt(req: CompletionRequest, engine: Engine) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: only one prompt per request", "prompt", "invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.text_ids(prompt)
    vocab = len(engine.tokenizer)
    if not prompt or not all(0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt", "invalid_value")
    return list(prompt)


def chat_prompt(req: ChatRequest, engine: Engine) -> list[int]:
    messages = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(p.text for p in m.content),
        }
        for m in req.messages
    ]
    return engine.chat_prompt_ids(messages)


# --------------------------------------------------------------------------- responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    body = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}


def _sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def event_stream(
    deltas: Iterator[Delta], head: dict[str, Any], chat: bool, prompt_tokens: int, usage: bool
) -> Iterator[str]:
    """Server-sent events as OpenAI clients read them, ending with `data: [DONE]`."""
    if chat:
        opening = {**_choice(True, "", None, True), "delta": {"role": "assistant", "content": ""}}
        yield _sse({**head, "choices": [opening]})
    try:
        for d in deltas:
            if d.text or d.finish_reason:
                yield _sse({**head, "choices": [_choice(chat, d.text, d.finish_reason, True)]})
            if d.finish_reason and usage:
                yield _sse(
                    {**head, "choices": [], "usage": _usage(prompt_tokens, d.completion_tokens)}
                )
    except UnknownModel as err:  # the adapter was unloaded between the check and the start
        yield _sse({"error": {"message": f"model {err.args[0]!r} was unloaded", "code": "gone"}})
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------- the app


def create_app(
    engine: Engine,
    limits: Limits | None = None,
    admin_key: str | None = None,
    adapters_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app; admin endpoints (POST/DELETE /v1/adapters) only with an admin key."""
    limits = limits or Limits()
    app = FastAPI(title="tuneoff serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        body = {"message": err.message, "type": kind, "param": err.param, "code": err.code}
        return JSONResponse({"error": body}, status_code=err.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": engine.names()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine, n) for n in engine.names()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict[str, Any]:
        if not engine.has(name):
            raise ApiError(404, f"model {name!r} is not served here", "model", "model_not_found")
        return _model_card(engine, name)

    async def generate(request: Request, chat: bool) -> Any:
        data = await read_json(request, limits.max_body_bytes)
        req = parse(ChatRequest if chat else CompletionRequest, data)
        ids = chat_prompt(req, engine) if chat else completion_prompt(req, engine)
        sampling = sampling_of(req, engine, limits, ids)
        kind = "chat.completion" if chat else "text_completion"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind + (".chunk" if chat and req.stream else ""),
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            deltas = engine.generate(req.model, ids, sampling)
            events = event_stream(deltas, head, chat, len(ids), usage)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            done = await run_in_threadpool(engine.complete, req.model, ids, sampling)
        except UnknownModel:
            raise ApiError(
                404, f"model {req.model!r} was unloaded", "model", "model_not_found"
            ) from None
        return {
            **head,
            "choices": [_choice(chat, done.text, done.finish_reason, False)],
            "usage": _usage(len(ids), done.completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    if admin_key:
        _add_admin_routes(app, engine, admin_key, adapters_dir, limits)
    return app


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": 0, "owned_by": "tuneoff"}
    return card if name == engine.base_name else {**card, "parent": engine.base_name}


def _add_admin_routes(
    app: FastAPI, engine: Engine, key: str, root: Path | None, limits: Limits
) -> None:
    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401,
                "admin endpoints need 'Authorization: Bearer <admin key>'",
                None,
                "unauthorized",
            )

    @app.post("/v1/adapters")
    async def load(request: Request) -> dict[str, Any]:
        authorize(request)
        req = parse(LoadRequest, await read_json(request, limits.max_body_bytes))
        if root is None:
            raise ApiError(
                400, "no adapters directory configured (--adapters-dir)", None, "no_adapters_dir"
            )
        try:
            check_adapter_name(req.name)
            path = adapter_in_dir(root, req.path or req.name)
            await run_in_threadpool(engine.load_adapter, req.name, path)
        except ModelError as err:
            raise ApiError(400, str(err), "name", "invalid_adapter") from None
        return {"loaded": req.name, "models": engine.names()}

    @app.delete("/v1/adapters/{name}")
    def unload(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name == engine.base_name:
            raise ApiError(400, "the base model cannot be unloaded", "name", "invalid_value")
        try:
            state = engine.unload_adapter(name)
        except UnknownModel:
            raise ApiError(
                404, f"adapter {name!r} is not loaded", "name", "model_not_found"
            ) from None
        return {state: name, "models": engine.names()}


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    admin_key: str | None = None,
    adapters_dir: Path | None = None,
) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    if host not in LOOPBACK:
        log.warning("listening on %s: reachable from other machines; inference has no auth", host)
    app = create_app(engine, limits, admin_key, adapters_dir)
    uvicorn.run(app, host=host, port=port, log_level="info")


# --------------------------------------------------------------------------- `tuneoff serve`


def _adapter_args(items: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--adapter {item!r}: expected NAME=PATH, e.g. sql=runs/b/lora")
        if name in adapters:
            raise UsageError(f"--adapter {name!r} given twice: choose distinct names")
        adapters[check_adapter_name(name)] = find_adapter_dir(Path(path))
        check_adapter(adapters[name])  # before a model is loaded
    return adapters


def served_models(
    model: str | None, adapter_items: list[str], adapters_dir: str | None
) -> tuple[str, dict[str, Path], Path | None]:
    """The base model, the adapters by name (--adapter NAME=PATH, then every adapter in
    --adapters-dir) and the adapters directory of `tuneoff serve`."""
    adapters = _adapter_args(adapter_items)
    root = Path(adapters_dir) if adapters_dir else None
    for name, path in (scan_adapters_dir(root) if root else {}).items():
        if name in adapters:
            raise UsageError(f"adapter {name!r} is both in --adapter and in {root}: rename one")
        adapters[name] = path
    model = arm_model(model) or (base_model_of(next(iter(adapters.values()))) if adapters else None)
    if not model:
        raise UsageError("pass --model (the base model), or adapters to take it from")
    return model, adapters, root


def server_limits(
    max_tokens_cap: int, max_prompt_tokens: int | None, max_body_bytes: int, port: int
) -> Limits:
    prompt_cap = 1 if max_prompt_tokens is None else max_prompt_tokens  # 0 is an error
    if min(max_tokens_cap, max_body_bytes, prompt_cap) < 1:
        raise UsageError("--max-tokens-cap, --max-prompt-tokens, --max-body-bytes must be >= 1")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be 0 to 65535 (0: any free port)")
    return Limits(max_tokens_cap, max_prompt_tokens, max_body_bytes)


def banner(engine: Engine, host: str, port: int, admin_key: str | None) -> str:
    """What `tuneoff serve` says before it starts listening."""
    admin = "on (TUNEOFF_ADMIN_KEY)" if admin_key else "off (set TUNEOFF_ADMIN_KEY to enable)"
    return (
        f"tuneoff serve: models {', '.join(engine.names())} ({engine.device})\n"
        f"OpenAI-compatible API at http://{host}:{port}/v1; admin endpoints {admin}"
    )
