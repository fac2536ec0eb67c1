"""A loopback TCP proxy that loses answers: the network fault behind every "did my request
go through?" retry. Not a test module.

Requests pass through to the server unchanged. While `lose` is above zero, the next
connection whose request starts with `lose_prefix` gets no answer: the proxy waits until the
server has started answering (so the server has done all its work) and then closes the
client's connection without passing a byte of it on.
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
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120)
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
            for s in (client, upstream):  # shutdown first: a plain close leaves the pump thread's recv blocked
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
