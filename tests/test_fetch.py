"""serving/fetch.py against real local servers: what is fetched, what is refused, and that
every refusal reads the same."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.fetch import FetchPolicy, FetchRefused, fetch_image_bytes

LOOPBACK = FetchPolicy.parse_allow(["127.0.0.1/32"])
UNIFORM = "image_url: could not fetch an image from that URL"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/image":
            body = b"\x89PNG fake"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/big":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 1024)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def silent_server():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/image"
    sock.close()


def fetch(url: str, policy: FetchPolicy) -> bytes:
    return asyncio.run(fetch_image_bytes(url, policy, "image_url"))


def refused(url: str, policy: FetchPolicy) -> str:
    with pytest.raises(FetchRefused) as e:
        fetch(url, policy)
    assert str(e.value) == UNIFORM
    return e.value.reason


def test_allowed_url_is_fetched_and_redirects_are_followed(server):
    policy = FetchPolicy(max_bytes=1 << 20, allow=LOOPBACK)
    assert fetch(f"{server}/image", policy) == b"\x89PNG fake"
    assert fetch(f"{server}/redirect?to=/image", policy) == b"\x89PNG fake"


@pytest.mark.parametrize("url", [
    "http://127.0.0.2/x", "http://localhost:1/x", "http://10.1.2.3/", "http://192.168.0.1/", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://100.100.100.200/", "ftp://example.com/x", "file:///etc/passwd",
])
def test_internal_addresses_and_other_schemes_are_refused_without_an_allow_list(url):
    refused(url, FetchPolicy(max_bytes=1 << 20))


def test_each_redirect_is_checked_and_redirects_are_capped(server):
    policy = FetchPolicy(max_bytes=1 << 20, allow=LOOPBACK)
    assert "resolves to" in refused(f"{server}/redirect?to=http://10.0.0.1/image", policy)
    chain = f"{server}/image"
    for _ in range(4):
        chain = f"{server}/redirect?to={chain}"
    assert "redirects" in refused(chain, policy)


def test_body_over_the_cap_and_http_errors_read_the_same(server):
    policy = FetchPolicy(max_bytes=4096, allow=LOOPBACK)
    assert "bytes" in refused(f"{server}/big", policy)
    assert "404" in refused(f"{server}/missing", policy)


def test_a_server_that_never_answers_costs_one_deadline(silent_server):
    t = time.monotonic()
    assert "Timeout" in refused(silent_server, FetchPolicy(max_bytes=1 << 20, timeout_s=0.5, allow=LOOPBACK))
    assert time.monotonic() - t < 3


def test_public_addresses_pass_the_rule_and_allow_lists_parse():
    policy = FetchPolicy(max_bytes=1, allow=FetchPolicy.parse_allow("10.0.0.0/8, 127.0.0.1"))
    assert policy.permits(ipaddress.ip_address("8.8.8.8")) and policy.permits(ipaddress.ip_address("10.2.3.4"))
    assert not policy.permits(ipaddress.ip_address("192.168.1.1")) and not policy.permits(ipaddress.ip_address("127.0.0.2"))
