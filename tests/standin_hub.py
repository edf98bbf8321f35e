"""A stand-in Hugging Face Hub on 127.0.0.1 for tests (no machine here reaches huggingface.co).

It serves the Hub's file route (`/{repo}/resolve/{revision}/{filename}`, HEAD with X-Repo-Commit /
ETag / Content-Length, then GET) over official-format checkpoints generated here: seeded random
weights with the official key names and shapes (tests/data/var_official_keys.json `vae_small` /
`var_small`: a depth-2 VAR of the official classes, 10 classes, 64 px, scales 1, 2, 4), under the
real zoo file names, so `arvision.load("var-d16")` exercises the real entry. The `stand_in`
fixture (tests/conftest.py) starts one per test.
"""

import hashlib
import http.server
import json
import os
import threading

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "var_official_keys.json")) as f:
  TABLES = json.load(f)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_sd(table, seed, std=1.0) -> dict:
  """Seeded normal float32 arrays (standard deviation `std`) of the table's shapes, by key."""
  rng = np.random.default_rng(seed)
  return {k: (std * rng.standard_normal(s)).astype(np.float32) for k, s in table.items()}


class StandInHub:
  """Serves `root/<owner>/<name>/<file>` on the Hub's download route; counts requests.

  `truncate[name] = n`: GET answers only the first n bytes (a consistent short response, as a
  proxy that cut the transfer would give). `wrong_etag[name]`: HEAD announces another sha256.
  """

  def __init__(self, root):
    self.root, self.requests = root, []
    self.truncate, self.wrong_etag = {}, set()
    hub_self = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _file(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
          return None, None
        name = "/".join(parts[4:])
        return os.path.join(hub_self.root, parts[0], parts[1], name), name

      def _headers(self, path, name, length):
        data = open(path, "rb").read()
        etag = hashlib.sha256(data + (b"x" if name in hub_self.wrong_etag else b"")).hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(length))
        self.end_headers()
        return data

      def do_HEAD(self):
        hub_self.requests.append(("HEAD", self.path))
        path, name = self._file()
        if path is None or not os.path.isfile(path):
          self.send_response(404)
          self.send_header("X-Error-Code", "EntryNotFound")
          self.end_headers()
          return
        self._headers(path, name, os.path.getsize(path))

      def do_GET(self):
        hub_self.requests.append(("GET", self.path))
        path, name = self._file()
        if path is None or not os.path.isfile(path):
          self.send_response(404)
          self.end_headers()
          return
        n = hub_self.truncate.get(name, os.path.getsize(path))
        data = self._headers(path, name, n)
        self.wfile.write(data[:n])

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

  def file_requests(self):
    return [(m, p) for m, p in self.requests if "/resolve/" in p]

  def gets(self):
    return sum(1 for m, _ in self.file_requests() if m == "GET")

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def start(tmp_path, monkeypatch, var_std=1.0) -> StandInHub:
  """Writes the tiny VAR checkpoints under `tmp_path/hub`, serves them and points
  HF_ENDPOINT / HF_HOME / ARVISION_CACHE at the server and `tmp_path`.

  `var_std`: the transformer's weight scale. At 1 its logits are so peaked that sampling is
  argmax whatever the rng; a small one (0.02, the official init's) gives spread-out logits."""
  import torch  # noqa: PLC0415 (only the tests that build .pth files need torch)

  def sd(table, seed, std=1.0):
    return {k: torch.from_numpy(v) for k, v in random_sd(TABLES[table], seed, std).items()}

  repo = tmp_path / "hub" / "FoundationVision" / "var"
  repo.mkdir(parents=True)
  torch.save(sd("vae_small", 1), repo / "vae_ch160v4096z32.pth")
  torch.save(sd("var_small", 2, var_std), repo / "var_d16.pth")
  server = StandInHub(str(tmp_path / "hub"))
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("ARVISION_CACHE", str(tmp_path / "arvision"))
  return server
