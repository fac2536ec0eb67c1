"""An ASGI app served by uvicorn in a thread on a free loopback port, for tests."""
import contextlib
import socket
import threading

import requests

from waiting import wait


@contextlib.contextmanager
def app_server(app, health: str = "/healthz"):
    """Yield the base URL once `health` answers; stop the server afterwards."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}{health}", timeout=1).status_code == 200
        except requests.RequestException:
            return False
    try:
        wait(f"the test server at {url}", up, timeout=10, interval=0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
