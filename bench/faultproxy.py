"""A fault-injecting HTTP proxy on 127.0.0.1, for testing and timing S3 reads against moto's server.

It relays HTTP/1.1 requests to an upstream endpoint and, for object GETs (not listings, not
HEADs), injects, by a seeded draw per request:

- ``cut``: the response headers and part of the body, then the connection closes (a reset mid-body);
- ``error``: a ``503 SlowDown`` instead of the response (before anything is read upstream);
- ``stall``: the headers and part of the body, then nothing for ``stall_s`` seconds (a read timeout);
- ``latency_s`` before every request is forwarded (a far-away endpoint), fault or not.

"Part of the body" is half of it, or its first ``cut_at`` bytes when given. ``script`` replaces
the draw: the n-th object GET gets ``script[n]`` (``None``: no fault; past its end: none), for a
test that needs to know exactly which faults a single sequential reader meets.

``permanent`` names a key substring whose GETs always lose the connection right after the
headers (no byte of the body gets through). ``reject=(status, code)`` answers *every* request
(HEAD, GET, PUT, LIST) with that S3 error instead of forwarding it (an S3 that denies access or
refuses expired credentials; a HEAD's answer has no body, as on S3). ``hold`` names a request
substring (e.g. ``partNumber=``) whose requests get no answer until the proxy stops: a writer
stuck mid-upload, to be killed there. ``counts`` says what was injected; ``object_paths`` lists
the path of every object GET, in order (who read what); ``object_bytes`` counts the body bytes
sent back for each object's GETs, by path (how much of it was read, however many times).
Only loopback addresses are used; it stops with :meth:`stop`.
"""

from __future__ import annotations

import collections
import random
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

__all__ = ["FaultProxy"]

_SLOW_DOWN = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n%s")
_SLOW_DOWN_BODY = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                   b"<Message>injected by faultproxy</Message></Error>")


_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 500: b"Internal Server Error"}


def _error_response(status: int, code: str, with_body: bool) -> bytes:
    body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>%s</Code><Message>injected by faultproxy"
            b"</Message></Error>" % code.encode()) if with_body else b""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(body), body))


def _read_head(sock: socket.socket, pending: bytearray) -> bytes | None:
    """Bytes up to and including the blank line after the headers (None at a clean end of stream)."""
    while b"\r\n\r\n" not in pending:
        data = sock.recv(65536)
        if not data:
            return None
        pending += data
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end])
    del pending[:end]
    return head


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join([lines[0], *(line for line in lines[1:] if line.partition(b":")[0].strip().lower() != name)])


def _read_exact(sock: socket.socket, pending: bytearray, n: int) -> bytes:
    while len(pending) < n:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("upstream closed early")
        pending += data
    out = bytes(pending[:n])
    del pending[:n]
    return out


def _read_chunked(sock: socket.socket, pending: bytearray) -> bytes:
    """A chunked body, re-emitted as is (including the terminating chunk)."""
    out = bytearray()
    while True:
        while b"\r\n" not in pending:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("upstream closed in a chunked body")
            pending += data
        line_end = pending.index(b"\r\n") + 2
        size = int(bytes(pending[:line_end]).split(b";")[0].strip(), 16)
        out += _read_exact(sock, pending, line_end)
        out += _read_exact(sock, pending, size + 2)
        if size == 0:
            return bytes(out)


class FaultProxy:
    def __init__(self, upstream: str, *, cut: float = 0.0, error: float = 0.0, stall: float = 0.0,
                 stall_s: float = 2.0, latency_s: float = 0.0, seed: int = 0, permanent: str | None = None,
                 cut_at: int | None = None, script: list[str | None] | None = None,
                 reject: tuple[int, str] | None = None, hold: str | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream must be on loopback, got {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rates = {"cut": cut, "error": error, "stall": stall}
        self.stall_s = stall_s
        self.latency_s = latency_s
        self.permanent = permanent
        self.cut_at = cut_at
        self.reject = reject
        self.hold = hold
        if script is not None and not set(script) <= {None, *self.rates}:
            raise ValueError(f"script faults must be among {sorted(self.rates)} or None, got {script}")
        self._script = list(script) if script is not None else None
        self.counts: collections.Counter[str] = collections.Counter()
        self.object_paths: list[str] = []
        self.object_bytes: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._server.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _object_get(method: bytes, target: bytes) -> str | None:
        """The object's path when the request is an object GET (not a listing, not a HEAD)."""
        path, _, query = target.partition(b"?")
        is_object_get = method == b"GET" and path.count(b"/") >= 2 and not query.startswith(b"list-type")
        return unquote(path.decode()) if is_object_get else None

    def _sent(self, method: bytes, target: bytes, body: bytes) -> None:
        path = self._object_get(method, target)
        if path is not None:
            with self._lock:
                self.object_bytes[path] += len(body)

    def _fault(self, method: bytes, target: bytes) -> str | None:
        path = self._object_get(method, target)
        with self._lock:
            self.counts["requests"] += 1
            if path is None:
                return None
            self.counts["object_gets"] += 1
            self.object_paths.append(path)
            if self.permanent and self.permanent in path:
                self.counts["permanent"] += 1
                return "permanent"
            if self._script is not None:
                kind = self._script.pop(0) if self._script else None
                if kind is not None:
                    self.counts[kind] += 1
                return kind
            draw = self._rng.random()
            for kind, rate in self.rates.items():
                if draw < rate:
                    self.counts[kind] += 1
                    return kind
                draw -= rate
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        from_client, from_upstream = bytearray(), bytearray()
        try:
            while not self._stopping.is_set():
                head = _read_head(client, from_client)
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                if (_header(head, b"expect") or b"").lower() == b"100-continue":
                    # Answered here, so the client sends the body now rather than after waiting.
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":  # a streamed upload
                    body = _read_chunked(client, from_client)
                else:
                    length = int(_header(head, b"content-length") or 0)
                    body = _read_exact(client, from_client, length) if length else b""
                if self.reject is not None:
                    with self._lock:
                        self.counts["rejected"] += 1
                    client.sendall(_error_response(*self.reject, with_body=method != b"HEAD"))
                    continue
                if self.hold is not None and self.hold.encode() in target:
                    with self._lock:
                        self.counts["held"] += 1
                    self._stopping.wait()
                    return
                fault = self._fault(method, target)
                if self.latency_s:
                    time.sleep(self.latency_s)
                if fault == "error":
                    client.sendall(_SLOW_DOWN % (len(_SLOW_DOWN_BODY), _SLOW_DOWN_BODY))
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                upstream.sendall(head + body)
                response_head = _read_head(upstream, from_upstream)
                if response_head is None:
                    return
                if method == b"HEAD" or response_head.split(b" ", 2)[1] in (b"204", b"304"):
                    response_body = b""
                elif (_header(response_head, b"transfer-encoding") or b"").lower() == b"chunked":
                    response_body = _read_chunked(upstream, from_upstream)
                else:
                    response_body = _read_exact(upstream, from_upstream,
                                                int(_header(response_head, b"content-length") or 0))
                if fault == "permanent":
                    client.sendall(response_head)
                    return
                if fault in ("cut", "stall"):
                    passed = len(response_body) // 2 if self.cut_at is None else self.cut_at
                    if 0 < passed < len(response_body):
                        client.sendall(response_head + response_body[:passed])
                        self._sent(method, target, response_body[:passed])
                        if fault == "stall":
                            self._stopping.wait(self.stall_s)
                        return  # closing mid-body
                    with self._lock:  # too short a body to fault mid-way: counted as what it was
                        self.counts[fault] -= 1
                client.sendall(response_head + response_body)
                self._sent(method, target, response_body)
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()
