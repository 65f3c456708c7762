"""A minimal Hugging Face Hub stand-in for checking `--features hub` downloads offline (not CI).

Serves one local model folder as `org/name` at revision `main`: the repo-info API that hf-hub
reads (`/api/models/{repo}/revision/{rev}` → siblings + sha) and `/{repo}/resolve/{rev}/{file}`
with the etag / x-repo-commit / content-range headers and byte ranges hf-hub asks for.

    python3 tests/python/hub_mock.py MODEL_DIR org/name PORT &
    HF_ENDPOINT=http://127.0.0.1:PORT HF_HUB_CACHE=$(mktemp -d) \\
        cargo run --features hub -- inspect hf://org/name
"""

import hashlib
import http.server
import json
import os
import re
import sys

MODEL_DIR, REPO, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
SHA = hashlib.sha1(REPO.encode()).hexdigest()
FILES = sorted(f for f in os.listdir(MODEL_DIR) if os.path.isfile(os.path.join(MODEL_DIR, f)))


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith(f"/api/models/{REPO}/revision/"):
            body = json.dumps({"sha": SHA, "siblings": [{"rfilename": f} for f in FILES]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        match = re.fullmatch(rf"/{re.escape(REPO)}/resolve/[^/]+/(.+)", self.path)
        if not match or match.group(1) not in FILES:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(os.path.join(MODEL_DIR, match.group(1)), "rb").read()
        start, end = 0, len(data) - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else end
        chunk = data[start:end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
