"""The websocket server of `pi05-serve`: openpi's policy protocol (serve/service.py) over the `websockets` library.

HTTP on the same port: `GET /healthz` answers 200 "OK" without upgrading (as openpi's server does), `GET /stats`
the batching and error counters as JSON. A websocket at `/` gets the default observation layout, at
`/<layout>` a named one (`/droid`, `/pi05_ros`, ...).

Memory stays bounded whatever clients do:
- a message is at most `max_message_bytes` (larger ones close the connection with 1009, "message too big");
- the server reads a connection's next frame only after answering the last, and buffers at most
  `RECEIVE_QUEUE_FRAMES` frames of it; beyond that it stops reading the socket and TCP holds the sender back;
- a reply that cannot be written within `send_timeout_s` (a client that does not read) drops the connection; the
  kernel's send buffer of a connection is fixed at `SEND_BUFFER_BYTES` (replies are a few KiB), so unread replies
  back up into that timeout instead of into megabytes of autotuned socket buffer;
- at most `max_clients` connections (checked at each handshake, where more get HTTP 503, and again as a
  session begins, where one that got through in a burst of handshakes is closed with 1013) and a bounded batch
  queue;
- a TCP connection that does not finish its websocket handshake within `OPEN_TIMEOUT_S` is dropped, and one that
  stops answering keepalive pings within `PING_INTERVAL_S + PING_TIMEOUT_S`.
So the worst case is about max_clients x (RECEIVE_QUEUE_FRAMES + 1) x max_message_bytes, plus socket buffers.
No permessage-deflate compression (openpi neither offers nor asks for it).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pi05_ros.serve.service import RECEIVE_QUEUE_FRAMES, ConnectionGone, PolicyService

log = logging.getLogger(__name__)

WRITE_LIMIT_BYTES = 16 * 1024
SEND_BUFFER_BYTES = 16 * 1024
OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0


class WebsocketsTransport:
    """A `websockets` server connection as the service's Transport."""

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection

    async def receive(self) -> bytes | str:
        try:
            return await self.connection.recv()
        except ConnectionClosed as exc:
            raise ConnectionGone from exc

    async def send(self, frame: bytes | str) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed as exc:
            raise ConnectionGone from exc

    async def close(self, code: int, reason: str) -> None:
        await self.connection.close(code, reason)

    def abort(self) -> None:
        self.connection.transport.abort()

    async def wait_closed(self) -> None:
        await self.connection.wait_closed()


def _text(connection: ServerConnection, status: http.HTTPStatus, body: str,
          content_type: str = "text/plain; charset=utf-8") -> Response:
    response = connection.respond(status, body)
    response.headers["Content-Type"] = content_type
    return response


async def run_server(service: PolicyService, host: str, port: int, *, stop: asyncio.Event,
                     on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until `stop` is set; `on_ready(host, port)` once listening (port 0 picks a free port)."""
    settings = service.settings

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return _text(connection, http.HTTPStatus.OK, "OK\n")
        if path == "/stats":
            return _text(connection, http.HTTPStatus.OK, json.dumps(service.stats()) + "\n", "application/json")
        if service.layout_for(path) is None:
            return _text(connection, http.HTTPStatus.NOT_FOUND,
                         f"no observation layout at {path}; connect to / ({service.default_layout}) or to one of "
                         f"{['/' + name for name in sorted(service.layouts)]}\n")
        if service.full():
            return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                         f"the server is full ({settings.max_clients} clients); try again later\n")
        return None

    async def handler(connection: ServerConnection) -> None:
        layout = service.layout_for(urlsplit(connection.request.path).path)
        assert layout is not None  # process_request answered unknown paths
        sock = connection.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        await service.serve(WebsocketsTransport(connection), layout)

    async with serve(handler, host, port, compression=None, max_size=settings.max_message_bytes,
                     max_queue=RECEIVE_QUEUE_FRAMES, write_limit=WRITE_LIMIT_BYTES, open_timeout=OPEN_TIMEOUT_S,
                     close_timeout=CLOSE_TIMEOUT_S, ping_interval=PING_INTERVAL_S, ping_timeout=PING_TIMEOUT_S,
                     process_request=process_request, backlog=1024) as server:
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        if on_ready:
            on_ready(bound_host, bound_port)
        await stop.wait()
    await service.close()
