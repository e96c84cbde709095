"""One writer per output: a second job on the same --out is refused while the first runs (real
processes), the lock goes on every exit path, and a lock left by a dead process is taken over."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from dowser_cli import artifacts
from dowser_cli.errors import UserError

from conftest import ROOT, run_cli

PROBE = ["probe", "tiny-llama", "--samples", "2", "--batch-size", "2", "--probes", "1", "--seq-len", "8"]


def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), "the first job never took its lock"


def test_a_second_job_on_the_same_out_is_refused_while_the_first_runs(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    recs = []
    for i in range(8):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        recs.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                            {"from": "gpt", "value": str(i)}]})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    out = tmp_path / "run"
    args = ["finetune", "tiny-llava", "--data", tmp_path / "train.json", "--image-folder", tmp_path / "img",
            "--max-steps", "100000", "--batch-size", "2"]
    first = subprocess.Popen([sys.executable, "-m", "dowser_cli", *map(str, args), "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lock = artifacts.lock_path(out)
        _wait_for(lock, first)
        held = json.loads(lock.read_text())
        assert held["pid"] == first.pid and held["host"] == socket.gethostname()
        r = run_cli(*args, "--out", out)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [
            f"dowser: error: {out}: being written by another job (pid {first.pid} on {socket.gethostname()}, "
            f"since {held['started']}); wait for it, or remove {lock} if that job is gone"]
        assert json.loads(lock.read_text())["pid"] == first.pid          # the holder's lock is untouched
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)
    assert not artifacts.lock_path(out).exists()                         # released when it stopped


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "s.safetensors"
    lock = artifacts.lock_path(out)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    r = run_cli(*PROBE, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.exists() and not lock.exists()


def test_a_lock_from_another_host_is_respected_and_a_failed_job_releases_its_lock(tmp_path):
    out = tmp_path / "s.safetensors"
    lock = artifacts.lock_path(out)
    lock.write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-12-01T10:00:00"}))
    r = run_cli(*PROBE, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "being written by another job (pid 1 on node-17" in r.stderr and not out.exists()
    lock.unlink()
    r = run_cli(*PROBE, "--layers", "last:99", "--out", out)               # fails after taking the lock
    assert r.returncode == 2 and not lock.exists() and not out.exists()


def test_output_lock_in_process(tmp_path):
    out = tmp_path / "x"
    with artifacts.output_lock(out, "first"):
        assert json.loads(artifacts.lock_path(out).read_text())["command"] == "first"
        with pytest.raises(UserError, match="being written by another job"):
            with artifacts.output_lock(out):
                pass
        assert artifacts.lock_path(out).exists()
    assert not artifacts.lock_path(out).exists()
    with pytest.raises(RuntimeError):
        with artifacts.output_lock(out):
            raise RuntimeError("boom")
    assert not artifacts.lock_path(out).exists()
