"""Running the app under uvicorn: in the foreground (``fmoe serve``) or in a thread on a free port
(tests, embedding)."""

from __future__ import annotations

import threading
import time
from typing import Any


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "info") -> Any:
    import uvicorn

    # timeout_graceful_shutdown: a stream still open at Ctrl-C is cut after this long
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3, access_log=False
    )


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread; ``port=0`` picks a free port (``url`` has it)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level))  # off the main thread: no signals
        self.app = app
        self.thread = threading.Thread(target=self.server.run, name="fmoe-uvicorn", daemon=True)
        self.host = host
        self.port = port

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
