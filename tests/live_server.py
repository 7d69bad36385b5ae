"""An ASGI app served for real on 127.0.0.1 in a thread, for the server tests (test_serve, test_web): the
library's own `serve.probe.serving`, as the generator the tests' fixtures `yield from`."""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.serve.probe import serving as _serving


def serving(app) -> Iterator[str]:
    """`app` on a free 127.0.0.1 port in a thread: yields its URL once it listens, stops it after."""
    with _serving(app) as url:
        yield url
