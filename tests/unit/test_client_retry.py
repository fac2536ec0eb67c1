"""The client's retries (serving/client.py) against a real HTTP server on loopback that answers
a scripted sequence: dropped connections and 429/502/503/504 are retried with backoff, a 500
once, other answers are final, and the number of tries is bounded."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from indai.platform.errors import UserError
from indai.serving import client


class Scripted:
    """A loopback HTTP server: the n-th POST gets script[n] ("drop" closes the connection
    without an answer); after the script, 200 with a prediction."""

    def __init__(self, script: list):
        self.script, self.posts = list(script), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                step = outer.script[outer.posts] if outer.posts < len(outer.script) else 200
                outer.posts += 1
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = json.dumps({"request_id": "0" * 32, "model_version": 1, "predictions": [{"label": "ok", "probabilities": {}}]}
                                  if step == 200 else {"detail": f"scripted {step}"}).encode()
                self.send_response(step)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                if step in (429, 503):
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(client, "BACKOFF_S", 0.01)


@pytest.mark.timeout(30)
def test_restarts_and_overload_are_retried_until_an_answer():
    with Scripted(["drop", 502, 503, 504]) as server:
        out = client.post_predict(server.url, [{"text": "x"}], token="t")
    assert out["predictions"][0]["label"] == "ok" and server.posts == 5


@pytest.mark.timeout(30)
def test_tries_are_bounded_and_the_last_answer_is_reported():
    with Scripted([503] * 10) as server:
        with pytest.raises(UserError, match=r"refused the request \(503\): scripted 503"):
            client.post_predict(server.url, [{"text": "x"}])
    assert server.posts == client.RETRIES + 1 == 8
    with Scripted(["drop"] * 10) as server:
        with pytest.raises(UserError, match="did not answer .*8 tries"):
            client.post_predict(server.url, [{"text": "x"}])
    assert server.posts == 8


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_final_answers_are_not_retried(status):
    with Scripted([status]) as server:
        with pytest.raises(UserError, match=f"refused the request \\({status}\\)"):
            client.post_predict(server.url, [{"text": "x"}])
    assert server.posts == 1


@pytest.mark.timeout(30)
def test_a_500_is_tried_once_more_and_a_second_is_final():
    """Serve's proxy answers 500 for a call whose ingress replica died holding it: one more try
    reaches a live replica. A server that answers 500 again has a real error: no third try."""
    with Scripted([500]) as server:
        assert client.post_predict(server.url, [{"text": "x"}])["predictions"][0]["label"] == "ok"
    assert server.posts == 2
    with Scripted([500, 500, 500]) as server:
        with pytest.raises(UserError, match=r"refused the request \(500\): scripted 500"):
            client.post_predict(server.url, [{"text": "x"}])
    assert server.posts == 2
    with Scripted([503, 500, 503, 500, 500]) as server:  # one more try after the first 500, wherever it comes
        with pytest.raises(UserError, match=r"\(500\)"):
            client.post_predict(server.url, [{"text": "x"}])
    assert server.posts == 4


def test_waits_follow_retry_after_else_grow_and_are_capped():
    assert client.retry_wait(0, "3") == 3.0 and client.retry_wait(0, "999") == client.MAX_WAIT_S
    waits = [client.retry_wait(a) for a in range(12)]
    assert all(0.5 * min(client.MAX_WAIT_S, 0.01 * 2 ** a) <= w <= min(client.MAX_WAIT_S, 0.01 * 2 ** a) for a, w in enumerate(waits))
    assert client.retry_wait(20) <= client.MAX_WAIT_S
