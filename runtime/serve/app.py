"""The HTTP server: an ASGI app (Starlette) for uvicorn. ``create_app(load, ...)`` starts serving at
once and loads the model in a thread (``GET /health`` is 503 until it is loaded); one worker
thread then owns the engine (runtime/serve/worker.py). docs/SERVING.md describes every endpoint.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fmoe.errors import FmoeError
from fmoe.runtime.engine.prefix_cache import PrefixCache
from fmoe.runtime.serve import anthropic_api, openai_api
from fmoe.runtime.serve.common import RequestError, ServerState
from fmoe.runtime.serve.worker import QueueFull, Worker

log = logging.getLogger("fmoe.serve")

MAX_BODY_BYTES = 32 << 20  # a request body larger than this is refused (413) before it is read
RETRY_AFTER = "2"  # seconds a client refused with 503 should wait
PAGE = Path(__file__).parent / "static" / "index.html"

Handler = Callable[[Request, ServerState, dict[str, Any]], Awaitable[Response]]


def create_app(
    load: Callable[[], Any],
    *,
    model_id: str,
    api_key: str | None = None,
    thinking: bool = True,
    max_queue: int = 16,
    prefix_cache_bytes: int = 2 << 30,
    max_tokens_default: int = 4096,
    on_load_error: Callable[[str], None] | None = None,
    owns_engine: bool = True,
) -> Starlette:
    """The app. ``load()`` returns the engine (an Engine, or an object with its interface); it runs
    in a thread when the app starts, and the engine is closed when it stops (``owns_engine``)."""
    state = ServerState(
        model_id=model_id,
        api_key=api_key,
        thinking=thinking,
        max_queue=max_queue,
        max_tokens_default=max_tokens_default,
    )

    def load_in_background() -> None:
        try:
            engine = load()
        except Exception as exc:  # FmoeError: one line; anything else: logged with its traceback
            state.load_error = str(exc) if isinstance(exc, FmoeError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, FmoeError):
                log.exception("loading the model failed")
            if on_load_error is not None:
                on_load_error(state.load_error)
            return
        state.sampling_defaults = _generation_defaults(engine)
        cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        state.engine = engine
        state.worker = Worker(engine, max_queue=max_queue, prefix_cache=cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_in_background, name="fmoe-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            loader.join(timeout=0)
            if state.worker is not None:
                state.worker.close()
            if owns_engine and state.engine is not None and hasattr(state.engine, "close"):
                state.engine.close()

    routes = [
        Route("/", lambda r: _page(), methods=["GET"]),
        Route("/health", lambda r: _health(state), methods=["GET"]),
        Route("/metrics", _guard(state, "openai", _metrics, body=False, needs_model=False), methods=["GET"]),
        Route("/v1/models", _guard(state, "openai", _models, body=False), methods=["GET"]),
        Route("/v1/chat/completions", _guard(state, "openai", openai_api.chat_completions), methods=["POST"]),
        Route("/v1/completions", _guard(state, "openai", openai_api.completions), methods=["POST"]),
        Route("/v1/messages", _guard(state, "anthropic", anthropic_api.messages), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        api = _api_of(request.url.path)
        message = "no such route" if exc.status_code == 404 else f"{request.method} is not allowed here"
        state.metrics.response(api, exc.status_code)
        return _error(api, exc.status_code, f"{request.method} {request.url.path}: {message}")

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.fmoe = state
    return app


def _api_of(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def _error(api: str, status: int, message: str, *, param: str | None = None) -> Response:
    response: Response = (anthropic_api.error if api == "anthropic" else openai_api.error)(status, message, param=param)
    if status == 503:
        response.headers["Retry-After"] = RETRY_AFTER
    return response


def _authorized(request: Request, key: str | None) -> bool:
    if key is None:
        return True
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def _guard(
    state: ServerState, api: str, handler: Handler, *, body: bool = True, needs_model: bool = True
) -> Callable[[Request], Awaitable[Response]]:
    """A route: key, readiness, a JSON object body, then ``handler``; every failure in the API's
    error envelope (a mistake in the request is a 400, never a traceback)."""

    async def endpoint(request: Request) -> Response:
        response = await _answer(request)
        state.metrics.response(api, response.status_code)
        return response

    async def _answer(request: Request) -> Response:
        if not _authorized(request, state.api_key):
            return _error(api, 401, "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)")
        if needs_model and not state.ready:
            if state.load_error is not None:
                return _error(api, 500, f"the model failed to load: {state.load_error}")
            return _error(api, 503, "the model is still loading; retry shortly")
        doc: dict[str, Any] = {}
        if body:
            try:
                size = int(request.headers.get("content-length") or 0)
            except ValueError:
                size = 0
            if size > MAX_BODY_BYTES:
                return _error(api, 413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES}")
            try:
                raw = await request.body()
            except ClientDisconnect:  # gone before its request arrived whole: nobody to answer
                return Response(status_code=499)
            try:
                parsed = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return _error(api, 400, "the request body is not valid JSON")
            if not isinstance(parsed, dict):
                return _error(api, 400, "the request body must be a JSON object")
            doc = parsed
        try:
            return await handler(request, state, doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _location(first.get("loc", ()))
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            return _error(api, 400, f"{where}: {first.get('msg')}{more}", param=where or None)
        except RequestError as exc:
            return _error(api, exc.status, str(exc), param=exc.param)
        except FmoeError as exc:  # the chat template refused the messages, a bad token id, ...
            return _error(api, 400, str(exc))
        except QueueFull:
            return _error(api, 503, f"the server is busy ({state.max_queue} requests waiting); retry later")
        except Exception:
            log.exception("request failed")
            return _error(api, 500, "internal error (see the server log)")

    return endpoint


def _location(loc: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _page() -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def _health(state: ServerState) -> Response:
    if state.ready:
        return JSONResponse({"status": "ok", "model": state.model_id})
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER})


async def _metrics(request: Request, state: ServerState, body: dict[str, Any]) -> Response:
    return PlainTextResponse(state.metrics.render(state), media_type="text/plain; version=0.0.4")


async def _models(request: Request, state: ServerState, body: dict[str, Any]) -> Response:
    return await openai_api.models(request, state)


def _generation_defaults(engine: Any) -> dict[str, Any]:
    """Sampling defaults from the model's generation_config.json (as the model's authors advise),
    else greedy-free plain sampling (temperature 1)."""
    defaults: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    path = Path(getattr(engine, "packed_dir", "") or "") / "generation_config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        doc = {}
    if isinstance(doc, dict) and doc.get("do_sample", True):
        for key, kind in (("temperature", float), ("top_p", float), ("top_k", int)):
            value = doc.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                defaults[key] = kind(value)
    return defaults


def worker_of(app: Starlette) -> Worker | None:
    """The app's worker (tests, the CLI)."""
    worker: Worker | None = app.state.fmoe.worker
    return worker
