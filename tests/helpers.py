"""Helpers shared by the tests: the named tensor comparison, the reference fixtures, and runs of a model with
one scan or another."""

import base64
import contextlib
import json
import socket
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import train_ttt
import ttt
from conftest import SHARED
from ttt import TTTCache


def assert_close(name: str, actual, expected, atol: float, rtol: float = 0.0):
    """Fails naming the tensor `name`, its largest absolute difference, where, and the tolerance
    (|actual - expected| <= atol + rtol |expected| elementwise). Shapes must match and be non-empty."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.numel() > 0, f"{name}: empty tensor, nothing compared"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((diff <= bound).all()):
        worst = int(diff.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(f"{name}: max |difference| {diff.max().item():.3g} at {index} exceeds "
                             f"atol {atol:g} + rtol {rtol:g} (expected scale {expected.abs().max().item():.3g})")


def noisy(model, dtype=torch.float32):
    """The model with noise added to every weight, norms' included (none all-ones), so no term of a gradient
    vanishes and its outputs are far from an untrained model's; cast to dtype."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return model.to(dtype)


REFERENCE = SHARED / "reference"
# A fixture case is a folder holding these files (other kinds of fixtures may sit beside them).
REFERENCE_FILES = ("config.json", "reference_state_dict.safetensors", "io.safetensors")
REFERENCE_CASES = sorted(p.name for p in REFERENCE.glob("*/")
                         if all((p / name).is_file() for name in REFERENCE_FILES)) if REFERENCE.is_dir() else []
needs_reference = pytest.mark.skipif(
    not REFERENCE_CASES, reason=f"{REFERENCE} has no fixture cases (it exists only beside the developers' checkout)")


def load_reference(case):
    """The official model's weights of a fixture case in a TTTForCausalLM (eval mode), and its io tensors."""
    folder = REFERENCE / case
    config = ttt.TTTConfig(**json.loads((folder / "config.json").read_text()))
    model = ttt.TTTForCausalLM(config).eval()
    model.load_state_dict(load_file(folder / "reference_state_dict.safetensors"), strict=True)
    return model, load_file(folder / "io.safetensors")


def loop_then(model, run, scan="auto"):
    """[run() with model's layers on the loop scan, run() on `scan`] (config.scan_implementation)."""
    results = []
    for implementation in ("loop", scan):
        model.config.scan_implementation = implementation
        results.append(run())
    model.config.scan_implementation = "auto"
    return results


def logits_and_gradients(model, ids):
    """The logits and {parameter name: gradient} of the loss on ids."""
    model.zero_grad()
    out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_gradients_close(actual, expected, rtol, atol):
    """Each gradient within rtol of its largest entry (sums in another order), plus atol."""
    assert actual.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert_close(f"gradient of {name}", actual[name], grad, atol=rtol * grad.abs().max().item() + atol)


@torch.no_grad()
def chunked_prefill_logits(model, ids, bounds):
    """Logits of ids read through one TTTCache in the chunks ids[:, a:b] for (a, b) in bounds."""
    cache = TTTCache(model.config.num_hidden_layers)
    return torch.cat([model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in bounds], 1)


# ---------------------------------------------------------------- training runs of the tiny model (train_ttt.py)

# The imports that take seconds (a minute on a busy machine), as a Python expression over sys.modules: torch, the
# data and launch libraries, the model, transformers' model code (its package itself imports lazily, and its
# argument parser, which the trainer's command line is, in about half a second without torch).
HEAVY_MODULES = ("sorted(m for m in sys.modules if m in ('torch', 'datasets', 'accelerate', 'ttt', "
                 "'transformers.modeling_utils') or m.startswith('transformers.models'))")

FAST = ["--model_size", "tiny", "--seq_length", "64", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--max_eval_samples", "4", "--logging_steps", "1", "--eval_steps", "0"]


def run(tmp_path, *extra, out="run"):
    train_ttt.main([*FAST, "--output_dir", str(tmp_path / out), *extra])
    return tmp_path / out


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder):
    return {r["step"]: r["loss"] for r in metrics(folder) if "loss" in r}


# Not a speed bound: how long a test waits for a process before it calls the process hung. Far above anything a
# loaded machine takes (a trainer's start-up was seen at 62 s at load 5-15), so that only a hang reaches it.
HANG_GUARD_S = 600


def wait_until(condition, proc, what: str):
    """Returns once condition() holds; fails with the process's output if it ends first, or if it hangs."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {HANG_GUARD_S} s: the process hangs")
        time.sleep(0.2)


def wait_for_steps(proc, out, steps: int = 3):
    """`proc`, once the trainer process training into `out` has logged `steps` losses."""
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= steps, proc, f"{steps} logged steps")
    return proc


def fails(capsys, *argv, match):
    """The run exits non-zero with exactly one error line (besides `datasets` progress bars) containing `match`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_ttt.main(list(argv))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert match in errors[0], err
    return errors[0]


# ---------------------------------------------------------------- the official TTT-E2E fixture (shared/reference_e2e)

E2E_REFERENCE = SHARED / "reference_e2e"
needs_e2e_reference = pytest.mark.skipif(
    not (E2E_REFERENCE / "params.safetensors").is_file(),
    reason=f"{E2E_REFERENCE} is absent (it exists only beside the developers' checkout)")


def load_e2e_reference(**overrides):
    """The fixture's official parameters in an E2EForCausalLM built from its official config (through the
    converter's mapping; `overrides` change config fields: a variant), and its io tensors (token ids as int64)."""
    import convert_jax_checkpoint as convert
    import ttt_e2e

    official = json.loads((E2E_REFERENCE / "config.json").read_text())
    config = convert.e2e_config_from_official(official)
    config = ttt_e2e.E2EConfig(**{**config.to_diff_dict(), **overrides})
    model = ttt_e2e.E2EForCausalLM(config)
    model.load_state_dict(convert.e2e_state_dict(load_file(E2E_REFERENCE / "params.safetensors"), config),
                          strict=True)
    io = {k: v.long() if v.dtype == torch.int32 else v for k, v in load_file(E2E_REFERENCE / "io.safetensors").items()}
    return model, io


def official_gradients(model) -> dict:
    """{official parameter path: gradient in the official layout} of an E2E model after backward()."""
    import convert_jax_checkpoint as convert

    parts = {}
    for key, (path, index, transform) in convert.e2e_mapping(model.config).items():
        grad = model.get_parameter(key).grad
        parts.setdefault(path, {})[index] = grad.T if transform == "T" else grad
    return {path: p[None] if None in p else torch.stack([p[i] for i in sorted(p)]) for path, p in parts.items()}


# ---------------------------------------------------------------- loopback servers

@contextlib.contextmanager
def counting_server():
    """(url, accepted): a loopback TCP server that accepts connections, records their peers in `accepted` and closes
    them without a byte, for tests that a code path makes no (or exactly N) network requests."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            accepted.append(peer)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join()
        server.close()


class StallingProxy:
    """A loopback TCP proxy to `target` (host, port) that forwards both ways until stall(): from then on it keeps
    every connection open and forwards nothing, as an endpoint that stops answering mid-transfer."""

    def __init__(self, target: tuple):
        self.target, self.stalled, self.closing = target, threading.Event(), threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sockets, self.threads = [], [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def stall(self):
        self.stalled.set()

    def _accept(self):
        while not self.closing.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            self.sockets.append(client)
            if self.stalled.is_set():
                continue  # held open, never answered
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pump(self, source, sink):
        source.settimeout(0.1)
        while not self.closing.is_set():
            if self.stalled.is_set():
                time.sleep(0.1)
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self):
        self.closing.set()
        for thread in self.threads:
            thread.join()
        for sock in [*self.sockets, self.server]:
            sock.close()


# ---------------------------------------------------------------- a loopback stand-in for the Hugging Face Hub


class FakeHub:
    """The Hub's HTTP API, as much of it as huggingface_hub's whoami, create_repo and upload_folder use, on a loopback
    port (HF_ENDPOINT=hub.url): it checks the token (`hub.token`), keeps each repository's files as the client's
    commits send them (`hub.repos[repo_id][path] -> bytes`), records every request (`hub.requests`: method, path,
    and for commits the summary), and fails commits with HTTP 500 while `hub.fail_commits` is set."""

    def __init__(self, token="hf_test_token", user="alice"):
        import http.server

        self.token, self.user, self.repos, self.requests, self.fail_commits = token, user, {}, [], False
        self.private = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorised(self):
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self.reply(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append(("GET", path, None))
                if not self.authorised():
                    return
                if path == "/api/whoami-v2":
                    return self.reply(200, {"type": "user", "name": hub.user, "orgs": [],
                                            "auth": {"accessToken": {"role": "write"}}})
                parts = path.split("/")  # /api/models/<ns>/<name>/tree/<revision>[/...]
                if len(parts) >= 7 and parts[5] == "tree":
                    files = hub.repos.get(f"{parts[3]}/{parts[4]}")
                    if files is None:
                        return self.reply(404, {"error": "Repository not found"})
                    return self.reply(200, [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                            for p, b in sorted(files.items())])
                self.reply(404, {"error": f"not served by FakeHub: {path}"})

            def do_POST(self):
                path, body = self.path.split("?")[0], self.body()
                if not self.authorised():
                    hub.requests.append(("POST", path, None))
                    return
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or hub.user}/{request['name']}"
                    hub.repos.setdefault(repo_id, {})
                    hub.private[repo_id] = request.get("visibility") == "private" or request.get("private") is True
                    hub.requests.append(("POST", path, repo_id))
                    return self.reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":  # the model card's metadata, sent before a README.md is uploaded
                    hub.requests.append(("POST", path, json.loads(body)["content"]))
                    return self.reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/<ns>/<name>/{preupload,commit}/<revision>
                if len(parts) != 7 or parts[2] != "models":
                    hub.requests.append(("POST", path, None))
                    return self.reply(404, {"error": f"not served by FakeHub: {path}"})
                repo_id = f"{parts[3]}/{parts[4]}"
                if parts[5] == "preupload":
                    hub.requests.append(("POST", path, None))
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if parts[5] == "commit":
                    items = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(i["value"] for i in items if i["key"] == "header")
                    hub.requests.append(("POST", path, header["summary"]))
                    if hub.fail_commits:
                        return self.reply(500, {"error": "Internal Error - the Hub is down"})
                    files = hub.repos.setdefault(repo_id, {})
                    for item in items:
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "deletedFile":
                            files.pop(item["value"]["path"], None)
                        elif item["key"] == "deletedFolder":
                            prefix = item["value"]["path"].rstrip("/") + "/"
                            for name in [p for p in files if p.startswith(prefix)]:
                                del files[name]
                    return self.reply(200, {"success": True, "commitOid": "1" * 40,
                                            "commitUrl": f"{hub.url}/{repo_id}/commit/{'1' * 40}"})
                self.reply(404, {"error": f"not served by FakeHub: {path}"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
