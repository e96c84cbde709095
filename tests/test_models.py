"""Model loading (dowser_cli/models): the empty module tree that FSDP ranks > 0 build instead of
reading the weights."""
import pytest
import torch

from dowser_cli import artifacts
from dowser_cli.models import load_config, load_model, resolve_source


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl", "tiny-llama"])
def test_empty_load_has_the_real_tree_without_storage_and_the_same_tokenizer(name):
    src = resolve_source(name)
    cfg = load_config(src)
    real = load_model(src, cfg, torch.float32, "cpu")
    empty = load_model(src, cfg, torch.float32, "cpu", empty=True)
    assert artifacts.model_fingerprint(empty.model) == artifacts.model_fingerprint(real.model)
    assert all(p.is_meta for p in empty.model.parameters())
    assert [n for n, _ in empty.model.named_buffers()] == [n for n, _ in real.model.named_buffers()]
    assert empty.parts == real.parts and empty.adapter.name == real.adapter.name
    assert empty.tokenizer.get_vocab() == real.tokenizer.get_vocab()
    assert type(empty.processor) is type(real.processor)


# Every shipped config.json against the checkpoint's published parameter counts (built on the meta device,
# no weights): a wrong width, depth, vocabulary or head count in a config moves these by far more than
# the tolerance. Figures: the llava-hf model cards (7.06B, 13.4B); Qwen3-VL-4B-Instruct's card (4.44B)
# and its text model, Qwen3-4B's card (3.6B non-embedding); Gemma 3 technical report, table 1 (4B:
# vision encoder 417M, non-embedding 3,209M; the gemma-3-4b-it card's 4.3B); Mistral-Small-3.1-24B's card (24B).
# Each figure is (published count, tolerance): half a unit of its last stated digit.
PUBLISHED = {
    "llava-1.5-7b": {"adapter": "llava", "layers": 32, "total": (7.06e9, 0.005e9)},
    "llava-1.5-13b": {"adapter": "llava", "layers": 40, "total": (13.4e9, 0.05e9)},
    "qwen3-vl-4b": {"adapter": "qwen3-vl", "layers": 36, "total": (4.44e9, 0.005e9),
                    "decoder_layers": (3.6e9, 0.05e9)},
    "gemma-3-4b": {"adapter": "gemma3", "layers": 34, "total": (4.3e9, 0.05e9),
                   "decoder_layers": (3209e6, 0.5e6), "vision_tower": (417e6, 0.5e6)},
    "mistral-small-3.1-24b": {"adapter": "mistral3", "layers": 40, "total": (24e9, 0.5e9)},
}


def test_every_shipped_config_has_its_checkpoints_published_size():
    from dowser_cli.inspection import describe_model
    from dowser_cli.models import aliases

    shipped = sorted(k for k, v in aliases().items() if v.get("config"))
    assert shipped == sorted(PUBLISHED)
    for alias, want in PUBLISHED.items():
        info = describe_model(alias, random_init=True)
        assert info["adapter"] == want["adapter"] and info["decoder_layers"]["count"] == want["layers"], alias
        for part in ("total", "decoder_layers", "vision_tower"):
            if part in want:
                figure, tol = want[part]
                assert abs(info["params"][part] - figure) <= tol, (alias, part, info["params"][part])


# ---- the hub: its client's own handling (proxies, HF_HUB_OFFLINE, errors), turned into one line ----------

HUB_CONFIG = b'{"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, ' \
             b'"num_hidden_layers": 1, "num_key_value_heads": 1, "vocab_size": 64}'


def _fake_hub_behind_a_proxy():
    """An HTTP proxy that is also the hub: it answers for http://fake-hub.invalid, a host that cannot be
    reached without it (a cluster whose egress goes through a proxy). Returns (server, requests seen)."""
    import http.server
    import threading

    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            seen.append((self.command, self.path))
            ok = self.path.startswith("http://fake-hub.invalid/") and self.path.endswith("/config.json")
            self.send_response(200 if ok else 404)
            self.send_header("ETag", '"c0ffee"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", str(len(HUB_CONFIG) if ok else 0))
            self.end_headers()
            if body and ok:
                self.wfile.write(HUB_CONFIG)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


LOAD_CONFIG = ("from dowser_cli.models import load_config, resolve_source; "
               "print(type(load_config(resolve_source('someorg/somemodel'))).__name__)")


def test_a_hub_reached_through_the_proxy_in_http_proxy(tmp_path):
    """Where the hub is reachable only through HTTP(S)_PROXY, the model's files come through it (a raw
    connect to the hub's host, as before, found it unreachable and refused every hub id)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    server, seen = _fake_hub_behind_a_proxy()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(HF_ENDPOINT="http://fake-hub.invalid", HTTP_PROXY=f"http://127.0.0.1:{server.server_port}",
               HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run([sys.executable, "-c", LOAD_CONFIG], capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.shutdown()
    assert r.returncode == 0 and r.stdout.strip() == "LlamaConfig", r.stderr[-2000:]
    assert ("GET", "http://fake-hub.invalid/someorg/somemodel/resolve/main/config.json") in seen


@pytest.mark.slow   # the hub client retries for ~25 s; the proxy test beside runs by default
def test_no_network_is_one_line_after_the_hub_clients_retries(tmp_path):
    """No route to the hub (its proxy refuses): one line on stderr, exit 2, none of the client's
    per-retry warnings and no traceback."""
    import os
    import socket

    from conftest import run_cli

    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(HF_ENDPOINT="http://fake-hub.invalid", HTTP_PROXY=f"http://127.0.0.1:{port}",
               HF_HOME=str(tmp_path / "hf"))
    r = run_cli("probe", "someorg/somemodel", "--out", tmp_path / "s.safetensors", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Retrying" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "someorg/somemodel: cannot reach the hub for its config" in lines[0], r.stderr
    assert not (tmp_path / "s.safetensors").exists()
