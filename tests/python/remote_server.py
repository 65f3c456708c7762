"""A real storage server on loopback for the remote-cache tests (tests/remote.rs).

    python3 tests/python/remote_server.py s3 BUCKET      # moto's S3-compatible server
    python3 tests/python/remote_server.py webdav ROOT    # WsgiDAV serving the directory ROOT

Binds 127.0.0.1 on a free port, prints `PORT` on one line once it serves, and stops when its
standard input closes (the test drops it) or after 10 minutes, whichever comes first. Exits 3
with a message on stderr when the server's package is not installed (`pip install moto[server]`,
`pip install wsgidav`), so the test can skip with that reason.
"""

import socketserver
import sys
import threading
import urllib.request
import wsgiref.simple_server

LIFETIME_SECONDS = 600


def serve_s3(bucket):
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        print(f"moto[server] is not installed ({error})", file=sys.stderr)
        sys.exit(3)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    # The bucket, as a user would have created it.
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
    urllib.request.urlopen(request, timeout=30).read()
    return port, server.stop


class _ThreadingWsgiServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


class _BodyOfLength:
    """The request body as WSGI promises it: at most CONTENT_LENGTH bytes (wsgiref hands over the
    raw socket, where a read past the body waits for the client forever)."""

    def __init__(self, stream, length):
        self.stream = stream
        self.remaining = length

    def read(self, size=-1):
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data = self.stream.read(size) if size else b""
        self.remaining -= len(data)
        return data

    def readline(self, size=-1):
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data = self.stream.readline(size) if size else b""
        self.remaining -= len(data)
        return data


def _bounded_body(app):
    def wrapped(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"] = _BodyOfLength(environ["wsgi.input"], length)
        return app(environ, start_response)

    return wrapped


def serve_webdav(root):
    """WsgiDAV (a WebDAV class 1/2 server: PUT, MKCOL, PROPFIND, DELETE) over the directory `root`,
    anonymous read-write, on the standard library's threaded WSGI server."""
    try:
        from wsgidav.wsgidav_app import WsgiDAVApp
    except ImportError as error:
        print(f"wsgidav is not installed ({error})", file=sys.stderr)
        sys.exit(3)
    app = WsgiDAVApp(
        {
            "provider_mapping": {"/": root},
            "simple_dc": {"user_mapping": {"*": True}},
            "http_authenticator": {"domain_controller": None},
            "verbose": 0,
            "logging": {"enable": False},
            "lock_storage": True,
        }
    )
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, _bounded_body(app), server_class=_ThreadingWsgiServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_port, server.shutdown


SERVERS = {"s3": serve_s3, "webdav": serve_webdav}


def main():
    kind, argument = sys.argv[1], sys.argv[2]
    if kind not in SERVERS:
        print(f"unknown server kind {kind!r} (expected one of {sorted(SERVERS)})", file=sys.stderr)
        sys.exit(2)
    port, stop = SERVERS[kind](argument)
    print(port, flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(LIFETIME_SECONDS)
    stop()


if __name__ == "__main__":
    main()
