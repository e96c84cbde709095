import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["DOWSER_QUIET"] = "1"

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (what users run), on this checkout's code
    whatever the working directory."""
    env = dict(kw.pop("env", None) or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "dowser_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", ROOT), env=env, **kw)


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny seeded models, loaded once per session (they are rebuilt identically from their seed)."""
    from dowser_cli.models import load_config, load_model, resolve_source
    import torch

    cache = {}

    def get(name):
        if name not in cache:
            src = resolve_source(name)
            cache[name] = load_model(src, load_config(src), torch.float32, "cpu")
        return cache[name]
    return get


def conv(question: str, answer: str) -> list[dict]:
    """One human / gpt exchange in LLaVA's conversation format."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
