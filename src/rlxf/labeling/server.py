"""Running the labeling app: uvicorn on a listening socket, in a background thread
(:func:`make_server`, for tests and COOL-RLHF) or in the foreground (``rlxf label serve``)."""

from __future__ import annotations

import logging

from rlxf.labeling.app import build_app
from rlxf.labeling.schema import open_engine
from rlxf.runtime.http import is_loopback, listen, start_uvicorn

logger = logging.getLogger("rlxf.labeling")


class RunningLabelServer:
    """The app served in a background thread: ``url`` (``http://host:port``), ``engine``;
    :meth:`stop` ends it."""

    def __init__(self, app, engine, sock, server, thread):
        self.app, self.engine, self._socket, self._server, self._thread = app, engine, sock, server, thread
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()
        self.engine.dispose()


def make_server(db: str, host: str = "127.0.0.1", port: int = 0, **app_options) -> RunningLabelServer:
    """Serve the labeling database ``db`` (path or SQLAlchemy URL) on ``host:port`` (0: a free port)."""
    engine = open_engine(db)
    app = build_app(engine, **app_options)
    sock = listen(host, port, what="rlxf label serve")
    warn_if_exposed(host)
    server, thread = start_uvicorn(app, sock, name="rlxf-label-serve")
    return RunningLabelServer(app, engine, sock, server, thread)


def warn_if_exposed(host: str) -> None:
    if not is_loopback(host):
        logger.warning("rlxf label serve: listening on %s: tokens and cookies travel in clear text unless a "
                       "TLS proxy is in front (then pass --secure-cookies)", host or "every interface")
