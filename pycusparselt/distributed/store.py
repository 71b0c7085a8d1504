"""A small key-value store over TCP (standard library only) for the ranks of one job to meet.

Rank 0 serves it on ``MASTER_ADDR:MASTER_PORT``; every rank (rank 0 too) is a client. It carries the NCCL
unique id from rank 0 to the others, counts arrivals for barriers, and moves arrays for the ``host``
backend. Values are bytes: nothing received is ever unpickled. Like any rendezvous store it trusts its
network: bind it to a private address (the launcher uses 127.0.0.1).

Wire format (network byte order): a request is ``op:u8 key_len:u32 value_len:u64 timeout:f64`` followed by
the key (UTF-8) and the value; a reply is ``status:u8 length:u64`` followed by the payload.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time

__all__ = ["TCPStore", "StoreTimeout"]

_REQUEST = struct.Struct("!BIQd")
_REPLY = struct.Struct("!BQ")
_SET, _GET, _ADD, _DELETE = 1, 2, 3, 4
_OK, _TIMEOUT, _BAD = 0, 1, 2
_COUNTER = struct.Struct("!q")


class StoreTimeout(TimeoutError):
    """A key did not appear (or the server did not answer) within the timeout."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the store connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _State:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed = threading.Condition()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        state: _State = self.server.state  # type: ignore[attr-defined]
        sock = self.request
        while True:
            try:
                op, key_len, value_len, timeout = _REQUEST.unpack(_recv_exact(sock, _REQUEST.size))
                key = _recv_exact(sock, key_len).decode()
                value = _recv_exact(sock, value_len)
            except (ConnectionError, OSError):
                return
            status, payload = self._serve(state, op, key, value, timeout)
            try:
                sock.sendall(_REPLY.pack(status, len(payload)) + payload)
            except OSError:
                return

    @staticmethod
    def _serve(state: _State, op: int, key: str, value: bytes, timeout: float) -> tuple[int, bytes]:
        with state.changed:
            if op == _SET:
                state.data[key] = value
                state.changed.notify_all()
                return _OK, b""
            if op == _GET:
                if not state.changed.wait_for(lambda: key in state.data, timeout=timeout):
                    return _TIMEOUT, b""
                return _OK, state.data[key]
            if op == _ADD:
                (amount,) = _COUNTER.unpack(value)
                current = _COUNTER.unpack(state.data[key])[0] if key in state.data else 0
                state.data[key] = _COUNTER.pack(current + amount)
                state.changed.notify_all()
                return _OK, state.data[key]
            if op == _DELETE:
                state.data.pop(key, None)
                return _OK, b""
        return _BAD, b""


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class TCPStore:
    """A client of the store at ``host:port``; with ``is_server=True`` it serves the store too.

    Parameters
    ----------
    host, port
        Where the store listens (the server binds there; clients connect there, retrying until it is up).
    is_server : bool
        Serve the store from this process (rank 0), in a daemon thread.
    timeout : float
        Seconds to wait for the server to come up and, by default, for a key in :meth:`get`.
    """

    def __init__(self, host: str, port: int, *, is_server: bool, timeout: float = 300.0) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port: expected an int in 0 .. 65535, got {port!r}")
        self.timeout = float(timeout)
        self._server: _Server | None = None
        if is_server:
            self._server = _Server((host, port), _Handler)
            self._server.state = _State()  # type: ignore[attr-defined]
            port = self._server.server_address[1]  # port 0 picks a free one
            threading.Thread(target=self._server.serve_forever, name="pycusparselt-store", daemon=True).start()
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise StoreTimeout(
                        f"no store answered at {self.host}:{self.port} within {self.timeout:g} s ({exc}); is rank 0 "
                        f"running, and are MASTER_ADDR and MASTER_PORT the same on every rank?"
                    ) from None
                time.sleep(0.05)
                continue
            sock.settimeout(None)  # blocking requests carry their own timeout
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock

    def _request(self, op: int, key: str, value: bytes = b"", timeout: float = 0.0) -> bytes:
        encoded = key.encode()
        with self._lock:
            if self._sock is None:
                raise ConnectionError("the store client was closed")
            self._sock.sendall(_REQUEST.pack(op, len(encoded), len(value), timeout) + encoded + value)
            status, length = _REPLY.unpack(_recv_exact(self._sock, _REPLY.size))
            payload = _recv_exact(self._sock, length)
        if status == _TIMEOUT:
            raise StoreTimeout(f"store key {key!r} did not appear within {timeout:g} s")
        if status != _OK:
            raise RuntimeError(f"the store refused request {op} for key {key!r}")
        return payload

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value)."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"value: expected bytes, got {type(value).__name__}")
        self._request(_SET, key, bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``, waiting until some rank sets it (StoreTimeout after ``timeout`` seconds)."""
        return self._request(_GET, key, timeout=self.timeout if timeout is None else float(timeout))

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the counter ``key`` (0 when new) and return its new value."""
        return _COUNTER.unpack(self._request(_ADD, key, _COUNTER.pack(int(amount))))[0]

    def delete(self, key: str) -> None:
        """Forget ``key`` (harmless when absent)."""
        self._request(_DELETE, key)

    def wait_count(self, key: str, count: int, timeout: float | None = None) -> None:
        """Wait until the counter ``key`` reaches ``count``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        delay = 0.001
        while self.add(key, 0) < count:
            if time.monotonic() > deadline:
                raise StoreTimeout(f"counter {key!r} did not reach {count} in time")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self) -> None:
        """Close the connection, and stop serving if this process serves the store. Harmless when repeated."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TCPStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
