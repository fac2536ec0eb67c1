"""A loopback TCP proxy that loses answers: the network fault behind every "did my request
go through?" retry. Not a test module.

Requests pass through to the server unchanged. While `lose` is above zero, the next
connection whose request starts with `lose_prefix` gets no answer: the proxy waits until the
server has started answering (so the server has done all its work) and then closes the
client's connection without passing a byte of it on. `down()` takes the server off the network
(new connections are refused, open ones are cut) until `up()` listens on the same port again.
"""
from __future__ import annotations

import socket
import threading


class LossyProxy:
    def __init__(self, upstream_port: int, lose_prefix: bytes):
        self.upstream_port, self.lose_prefix = upstream_port, lose_prefix
        self.lose = 0
        self.lost = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.port = 0
        self._closed = False
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones, as a server that died would."""
        self._shut(self._listener)  # shutdown wakes the accept() blocked on it; close alone would not
        with self._lock:
            cut, self._open = list(self._open), set()
        for s in cut:
            self._shut(s)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _shut(s: socket.socket) -> None:
        try:  # shutdown first: a plain close leaves the pump thread's recv blocked
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120)
        with self._lock:
            self._open.update((client, upstream))
        client.settimeout(120)
        try:
            first = client.recv(65536)
            with self._lock:
                drop = self.lose > 0 and first.startswith(self.lose_prefix)
                if drop:
                    self.lose -= 1
            upstream.sendall(first)
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            pump.start()
            if drop:
                upstream.recv(1)  # the server has answered: its work is done; the answer is lost here
                with self._lock:
                    self.lost += 1
                return
            self._pump(upstream, client)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.difference_update((client, upstream))
            for s in (client, upstream):
                self._shut(s)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._shut(self._listener)
