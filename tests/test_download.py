"""`mcihn download` end to end against a local stand-in for the Hugging Face Hub, over real HTTP.

A threaded HTTP server implements the part of the Hub's API that huggingface_hub uses for `model_info` and
`hf_hub_download` (GET /api/models/{repo}[/revision/{rev}], HEAD and GET /{repo}/resolve/{rev}/{file}, with the
X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size and Location rules of huggingface_hub's file_download.py;
weights are redirected to a second server on another port, as the real hub redirects them to its CDN). The
command runs as a subprocess with HF_ENDPOINT pointing at it, exactly as a user would run it, and the server's
request log shows what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from mcihn.spec import NOT_EXTRACTED

ROOT = Path(__file__).resolve().parents[1]
MCIHN = Path(sys.executable).with_name("mcihn")
BERT = "mcihn-tests/tiny-bert"
WHISPER = "Systran/faster-whisper-base.en"  # faster-whisper's repo for the size "base.en"
MAIN, OLD = "a" * 39 + "1", "b" * 39 + "2"
LFS = (".safetensors", ".bin", ".msgpack", ".onnx", ".h5", ".ot")  # served through the "CDN", as on the hub
# Files of the repos that mcihn download must never ask for: other frameworks' weights, the PyTorch pickle when
# safetensors exist, subfolders, docs.
DECOYS = ("flax_model.msgpack", "tf_model.h5", "rust_model.ot", "model.onnx", "onnx/model.onnx", "pytorch_model.bin",
          "README.md", ".gitattributes", "coreml/model.mlpackage")


class FakeHub:
    """repos: repo id -> {"main": commit, commit: {filename: bytes}}. Logs every request as (method, path)."""

    def __init__(self, repos: dict):
        self.repos = repos
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), self._handler()) for _ in range(2)]
        self.url = f"http://127.0.0.1:{self.servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self.servers[1].server_address[1]}"  # another origin: not followed on HEAD
        self.blobs = {hashlib.sha256(data).hexdigest(): data
                      for repo in repos.values() for files in repo.values() if isinstance(files, dict)
                      for data in files.values()}
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.log[since:])

    def _handler(hub):  # noqa: N805 - the handler class closes over the hub
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, "HEAD")

            def do_GET(self):
                hub._serve(self, "GET")

        return Handler

    def _serve(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(req.path).path
        on_cdn = req.server is self.servers[1]
        with self.lock:
            self.log.append((method, ("cdn:" if on_cdn else "") + unquote(path)))
        if on_cdn:
            data = self.blobs.get(path.removeprefix("/cdn/"))
            return self._send(req, method, 200 if data is not None else 404, data or b"", {})
        if path.startswith("/api/models/"):
            repo_id, _, rev = unquote(path.removeprefix("/api/models/")).partition("/revision/")
            found = self._find(req, method, repo_id, rev or "main")
            if found is not None:
                commit, files = found
                body = {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "gated": False, "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                        "lastModified": "2025-01-01T00:00:00.000Z",
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                self._send(req, method, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return None
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", unquote(path))
        if match is None:
            return self._send(req, method, 404, b"not found", {})
        repo_id, rev, name = match.groups()
        found = self._find(req, method, repo_id, rev)
        if found is None:
            return None
        commit, files = found
        if name not in files:
            return self._send(req, method, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                                     "X-Repo-Commit": commit})
        data = files[name]
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_oid}"'}
        if name.endswith(LFS):  # as the hub: a redirect to the CDN, the blob's sha256 and size in X-Linked-*
            sha256 = hashlib.sha256(data).hexdigest()
            headers |= {"Location": f"{self.cdn}/cdn/{sha256}", "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(len(data))}
            return self._send(req, method, 302, b"", headers)
        return self._send(req, method, 200, data, headers)

    def _find(self, req, method: str, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:  # what the hub answers for a missing (or private, without a token) repo
            self._send(req, method, 401, b'{"error":"Repository not found"}',
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        commit = repo["main"] if rev == "main" else rev
        if commit not in repo:
            self._send(req, method, 404, b'{"error":"Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
            return None
        return commit, repo[commit]

    @staticmethod
    def _send(req, method: str, status: int, body: bytes, headers: dict) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if method == "GET":
            req.wfile.write(body)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from engines.standins import build_text

    folder = build_text(tmp_path_factory.mktemp("tiny-bert"))
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["vocab.txt"] = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]).encode()
    decoys = {name: b"decoy " + name.encode() for name in DECOYS}
    whisper = {"model.bin": b"\0ct2" * 64, "config.json": b'{"alignment_heads": []}', "tokenizer.json": b"{}",
               "vocabulary.txt": b"a\nb\n", "preprocessor_config.json": b'{"feature_size": 80}',
               "README.md": b"decoy", ".gitattributes": b"decoy", "model.safetensors": b"decoy weights"}
    server = FakeHub({
        BERT: {"main": MAIN, MAIN: files | decoys, OLD: files | decoys},
        WHISPER: {"main": MAIN, MAIN: whisper},
    })
    yield server
    server.close()


def checkpoint(folder: Path, **extractors: tuple[str, str]) -> Path:
    """A checkpoint config whose feature spec names these (extractor, revision) per modality; the rest absent.
    `mcihn download` reads only config.json."""
    spec = {m: {"dim": 8, "seq_len": 4, "extractor": NOT_EXTRACTED, "revision": "", "layer": "",
                "preprocessing": "", "sample_rate": 0} for m in ("vision", "text", "audio")}
    for m, (name, revision) in extractors.items():
        spec[m] |= {"extractor": name, "revision": revision, "layer": "last_hidden_state"}
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": "mcihn-checkpoint", "version": 1, "model": {"modalities": ["vision", "text", "audio"]},
              "feature_spec": spec, "metadata": {}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def start(args: list[str], hf_home: Path, endpoint: str, **env: str) -> subprocess.Popen:
    """`mcihn download ARGS` as a user runs it, with huggingface_hub pointed at `endpoint`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    clean |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
              "HF_HUB_ETAG_TIMEOUT": "5", **env}
    return subprocess.Popen([str(MCIHN), "download", *args], cwd=ROOT, env=clean, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args: list[str], hf_home: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess:
    return finish(start(args, hf_home, endpoint, **env))


def snapshot(hf_home: Path, repo_id: str, commit: str) -> Path:
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def test_download_fetches_only_what_the_loaders_need_then_works_offline(hub, tmp_path):
    hf_home = tmp_path / "hf"
    local_vision = tmp_path / "my-clip"
    local_vision.mkdir()
    ckpt = checkpoint(tmp_path / "ckpt", text=(BERT, MAIN), vision=(str(local_vision), "local:0123456789ab"))
    start = len(hub.requests())
    first = run(["--checkpoint", str(ckpt), "--asr-model", "base.en"], hf_home, hub.url)
    assert first.returncode == 0, first.stderr
    log = hub.requests(start)
    bert_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"}
    whisper_files = {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"}
    for repo_id, files in ((BERT, bert_files), (WHISPER, whisper_files)):
        asked = {path.rpartition("/")[2] for _, path in log if path.startswith(f"/{repo_id}/resolve/main/")}
        assert asked == files, repo_id
        # small files straight from the hub, weights through the CDN redirect
        gets = {path.rpartition("/")[2] for method, path in log if method == "GET" and path.startswith(f"/{repo_id}/")}
        assert gets == {f for f in files if not f.endswith((".safetensors", ".bin"))}
    assert [method for method, path in log if path.startswith("cdn:")] == ["GET", "GET"]
    for name in DECOYS:
        assert not any(path.endswith("/" + name) for _, path in hub.requests(start)), name
    assert not any(p.endswith(f"{WHISPER}/resolve/main/model.safetensors") for _, p in hub.requests(start))
    bert_snap, whisper_snap = snapshot(hf_home, BERT, MAIN), snapshot(hf_home, WHISPER, MAIN)
    assert {p.name for p in bert_snap.iterdir()} == bert_files
    assert {p.name for p in whisper_snap.iterdir()} == whisper_files
    assert (bert_snap.parent.parent / "refs" / "main").read_text() == MAIN
    assert re.search(rf"{BERT} model.safetensors: 100%\|", first.stderr), first.stderr  # a progress bar per file
    out = first.stdout
    assert "fetched 10 file(s)" in out and str(bert_snap) in out and "local folder" in out
    command = out.strip().splitlines()[-1].strip()
    assert command == f"HF_HOME={hf_home} HF_HUB_OFFLINE=1 mcihn-live --checkpoint {ckpt} --asr-model base.en"

    start = len(hub.requests())
    second = run(["--checkpoint", str(ckpt), "--asr-model", "base.en"], hf_home, hub.url)
    assert second.returncode == 0, second.stderr
    assert "nothing to fetch: all 10 file(s)" in second.stdout
    assert not [r for r in hub.requests(start) if r[0] == "GET" and "/resolve/" in r[1] or r[1].startswith("cdn:")]

    # The project's offline loaders now find both, with no network at all (HF_HUB_OFFLINE=1).
    start = len(hub.requests())
    probe = (
        "from engines.hub import resolve_model; from engines.text import TextExtractor; "
        "from realtime.asr import resolve_whisper_model; "
        f"s = resolve_model({BERT!r}); t = TextExtractor({BERT!r}, seq_len=4); "
        "print(s.path); print(t.spec.revision); print(resolve_whisper_model('base.en'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
    offline = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.split() == [str(bert_snap), MAIN, str(whisper_snap)]
    assert hub.requests(start) == []


def test_download_fetches_the_recorded_commit_when_main_has_moved_on(hub, tmp_path):
    hf_home = tmp_path / "hf"
    ckpt = checkpoint(tmp_path / "ckpt", text=(BERT, OLD))
    result = run(["--checkpoint", str(ckpt)], hf_home, hub.url)
    assert result.returncode == 0, result.stderr
    old = snapshot(hf_home, BERT, OLD)
    assert (old / "model.safetensors").is_file() and not snapshot(hf_home, BERT, MAIN).exists()
    assert "main has moved on" in result.stdout
    assert result.stdout.strip().endswith(f"--checkpoint {ckpt} --text-model {old}")


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("mcihn download: error: ")
    return lines[0].removeprefix("mcihn download: error: ")


def test_download_errors_are_one_line(hub, tmp_path):
    hf_home = tmp_path / "hf"
    # Features computed elsewhere (the shared CMU-MOSI npz, old and new names): refused before any request, and
    # no download of a model that does not exist is suggested.
    mosi = checkpoint(tmp_path / "mosi", vision=("precomputed:declare-lab/3d-cnn", ""),
                      text=("declare-lab/text-cnn", ""), audio=("openSMILE", ""))
    first = len(hub.requests())
    procs = [  # at once: each is mostly interpreter start-up
        start(["--model", "nobody/no-such-model"], hf_home, hub.url),
        start(["--checkpoint", str(mosi)], hf_home, hub.url),
        start(["--checkpoint", str(checkpoint(tmp_path / "c", text=(BERT, MAIN)))], hf_home, hub.url,
              HF_HUB_OFFLINE="1"),
        start(["--model", BERT], hf_home, "http://127.0.0.1:9"),  # nothing listens on the discard port
    ]
    missing, refused, offline, unreachable = (_one_line_error(finish(p)) for p in procs)
    assert "nobody/no-such-model" in missing and "not a model on" in missing
    assert "precomputed features" in refused and "cannot run live" in refused
    assert "declare-lab/3d-cnn" in refused and "openSMILE" in refused
    assert "hf download" not in refused and "mcihn download" not in refused and "huggingface.co" not in refused
    assert "HF_HUB_OFFLINE" in offline
    assert "cannot reach the Hugging Face hub at http://127.0.0.1:9" in unreachable
    # the hub heard only of the missing repo: the refused and the offline runs asked it nothing
    assert {path for _, path in hub.requests(first)} == {"/api/models/nobody/no-such-model"}
    assert not any((hf_home / "hub").rglob("*.safetensors")) if (hf_home / "hub").exists() else True


def test_missing_model_hint_names_mcihn_download_only_for_hub_ids(monkeypatch, tmp_path):
    from engines.hub import ModelNotAvailableError, resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match=r"mcihn download --checkpoint CHECKPOINT") as hub_id:
        resolve_model("nobody/no-such-model")
    assert "hf download" not in str(hub_id.value)
    for not_a_model in ("text CNN", "precomputed:declare-lab/text-cnn", "unknown"):
        with pytest.raises(ModelNotAvailableError) as err:
            resolve_model(not_a_model)
        assert "download" not in str(err.value).replace("downloaded", ""), str(err.value)
