"""Records the requests the official openai client sends, as fixtures for
app/tests/serve.rs (tests/fixtures/openai_client/NN.json: method, path, JSON body). A proxy on
port 8766 in front of `studio serve` on 8765; point tools/openai_client_examples.py at 8766:

    python tools/record_openai_client.py tests/fixtures/openai_client &
    sed 's/8765/8766/' tools/openai_client_examples.py | python -

CI never runs it; the Rust test replays the recorded requests.
"""
import http.server, json, sys, urllib.request, pathlib
UPSTREAM = "http://127.0.0.1:8765"
OUT = pathlib.Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
n = [0]
class H(http.server.BaseHTTPRequestHandler):
    def _go(self, method):
        body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else None
        req = urllib.request.Request(UPSTREAM + self.path, data=body, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req) as r:
            data = r.read(); ctype = r.headers.get("content-type")
        n[0] += 1
        rec = {"method": method, "path": self.path,
               "request": json.loads(body) if body else None,
               "response_content_type": ctype}
        (OUT / f"{n[0]:02d}.json").write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        self.send_response(200); self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self): self._go("GET")
    def do_POST(self): self._go("POST")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8766), H).serve_forever()
