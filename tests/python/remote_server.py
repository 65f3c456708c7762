"""A real storage server on loopback for the remote-cache tests (tests/remote.rs).

    python3 tests/python/remote_server.py s3 BUCKET   # moto's S3-compatible server

Binds 127.0.0.1 on a free port, prints `PORT` on one line once it serves, and stops when its
standard input closes (the test drops it) or after 10 minutes, whichever comes first. Exits 3
with a message on stderr when the server's package is not installed (`pip install moto[server]`),
so the test can skip with that reason.
"""

import sys
import threading
import urllib.request

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


def main():
    kind, argument = sys.argv[1], sys.argv[2]
    if kind != "s3":
        print(f"unknown server kind {kind!r} (expected s3)", file=sys.stderr)
        sys.exit(2)
    port, stop = serve_s3(argument)
    print(port, flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(LIFETIME_SECONDS)
    stop()


if __name__ == "__main__":
    main()
