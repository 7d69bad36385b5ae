"""An ASGI app served for real on 127.0.0.1 in a thread, for the server tests (test_serve, test_web)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import uvicorn


def serving(app) -> Iterator[str]:
    """`app` on a free 127.0.0.1 port in a thread: yields its URL once /health answers, stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5).close()
            break
        except OSError:
            time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(timeout=10)
