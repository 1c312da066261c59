"""The FastAPI application and `xfusion-serve serve`: load the checkpoint, warm up, run the engine loop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Engine
from ..model.checkpoint import EMBEDDED_CHECKPOINT, text_tower_parameters
from .guard import Guard
from .openai_images import router as openai_images_router
from .openai_routes import router as openai_router
from .routes import router
from .serving import APIError, error_response
from .state import ServerConfig, ServerState, compute_threads

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"  # the playground page: plain files, no build step


def create_app(config: ServerConfig | None = None, engine: Engine | None = None) -> FastAPI:
    """The app; `engine` lets tests and embedders pass one already loaded."""
    state = ServerState(config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load(engine)
        log.info("serving %s", state.checkpoint)
        yield
        state.close()

    app = FastAPI(title="xfusion-serve", lifespan=lifespan)
    app.state.server = state
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(openai_images_router)
    # The playground is public (it holds no data; its key field sends the key on each API call it makes).
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.add_middleware(Guard, api_keys=state.config.api_keys, max_body_bytes=state.config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            sent = request.scope.get("state", {}).get("sent_content_type")
            told = f"; it was sent as Content-Type {sent!r} and read as JSON" if sent else ""
            return error_response(APIError(422, f"the body is not valid JSON ({first.get('ctx', {}).get('error')}){told}"))
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error_response(APIError(422, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        message = str(err.detail)
        if message == "There was an error parsing the body":  # what FastAPI says for any undecodable JSON
            message = "the body could not be parsed as JSON (invalid UTF-8, nesting too deep or a number too long)"
        return error_response(APIError(err.status_code, message, headers=err.headers))

    return app


def serve(config: ServerConfig) -> None:
    """Serves until SIGTERM (drained) or SIGINT. Process-wide settings are made here, not in create_app: the
    compute threads (state.compute_threads)."""
    import torch
    import uvicorn

    threads = compute_threads(config, text_tower_parameters(config.checkpoint or EMBEDDED_CHECKPOINT))
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("compute threads: %d", torch.get_num_threads())
    app = create_app(config)

    class DrainingServer(uvicorn.Server):
        """SIGTERM drains: the server stays up, answering 503 to new requests (and /ready) while the running
        ones finish, for at most drain_timeout; then uvicorn stops and the process exits 0. A second signal
        (or Ctrl-C) stops at once, uvicorn's own way."""

        def handle_exit(self, sig, frame):
            state = app.state.server
            if sig != signal.SIGTERM or not state.ready:
                return super().handle_exit(sig, frame)
            state.ready = False
            threading.Thread(target=self._drain, args=(sig, frame), name="xfusion-drain", daemon=True).start()

        def _drain(self, sig, frame) -> None:
            state, deadline = app.state.server, time.monotonic() + config.drain_timeout
            while time.monotonic() < deadline and state.engine is not None and state.engine.alive:
                running, waiting = state.engine.load()
                if running + waiting + state.admitting == 0:
                    break
                time.sleep(0.05)
            super().handle_exit(sig, frame)
            # a drained shutdown is a clean exit (0), not death by the signal
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                  access_log=config.access_log, timeout_graceful_shutdown=config.drain_timeout)).run()
