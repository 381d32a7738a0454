"""A TCP proxy on 127.0.0.1 that a test can make hang.

A client such as imgcache connects to the proxy instead of the API server. While the
proxy forwards, every byte passes through unchanged, so TLS between the client and the
server is untouched. ``hang()`` stops forwarding in both directions and keeps every
connection open, as a dead load balancer or a half-open NAT entry does: the client sees
no error, only silence. ``resume()`` forwards again, including bytes held meanwhile.

The proxy runs in its own threads, so it keeps working while the test's event loop is
busy, and a blocked test cannot stall it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

# Seconds a thread waits on a socket before it checks the stop and hang switches again.
_POLL = 0.2
_CHUNK = 65536


class TcpProxy:
    """Forward connections from ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port = int(self._listener.getsockname()[1])
        # Set while bytes flow; cleared by hang().
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        # Sockets whose incoming direction reached end of file.
        self._drained: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        # Connections accepted since start, counted so a test can see a client reconnect.
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def hung(self) -> bool:
        return not self._flowing.is_set()

    def start(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def hang(self) -> None:
        """Stop forwarding bytes; connections stay open and new ones are still accepted."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward bytes again, starting with those that arrived while hung."""
        self._flowing.set()

    def open_connections(self) -> int:
        """Return the number of client connections not yet closed."""
        with self._lock:
            return sum(1 for s in self._sockets if s.getsockname()[1] == self.port)

    def stop(self) -> None:
        """Close the listener and every connection, and wait for the threads to end."""
        self._stopping.set()
        self._flowing.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            _close(sock)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- threads -----------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            self.accepted += 1
            pair = (client, upstream)
            with self._lock:
                self._sockets.update(pair)
                for source, sink in (pair, pair[::-1]):
                    thread = threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        """Copy bytes from ``source`` to ``sink`` until either side closes or the proxy stops."""
        failed = True
        try:
            while not self._stopping.is_set():
                # A hung proxy reads nothing, so the bytes wait in the kernel's buffers.
                if not self._flowing.wait(_POLL):
                    continue
                readable, _, _ = select.select([source], [], [], _POLL)
                if not readable:
                    continue
                data = source.recv(_CHUNK)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    failed = False
                    return
                # Bytes read just before hang() are held until resume().
                while not self._flowing.wait(_POLL):
                    if self._stopping.is_set():
                        return
                sink.sendall(data)
        except (OSError, ValueError):
            # ValueError: select() on a socket that another thread closed meanwhile.
            pass
        finally:
            self._finish(source, pair, failed)

    def _finish(self, source: socket.socket, pair: tuple[socket.socket, socket.socket], failed: bool) -> None:
        """Close the pair once both directions reached end of file, or at once after an error."""
        with self._lock:
            self._drained.add(source)
            if failed or all(sock in self._drained for sock in pair):
                for sock in pair:
                    self._sockets.discard(sock)
                    self._drained.discard(sock)
                    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
