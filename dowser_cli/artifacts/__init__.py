"""The only module that reads and writes artifacts (safetensors + YAML sidecar), atomically."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from dowser_cli.version import __version__
from dowser_cli.errors import UserError

FORMAT_VERSION = "1"
# every artifact kind, as its safetensors metadata names it (readers check it first)
SCORES_KIND = "dowser.scores"
PARTIAL_KIND = "dowser.scores.partial"     # an interrupted probe's factors so far (OUT.partial)
MASK_KIND = "dowser.mask"
DELTA_KIND = "dowser.delta"
CHECKPOINT_KIND = "dowser.checkpoint"


def sidecar_path(path: Path) -> Path:
    """``scores.safetensors`` -> ``scores.yaml`` (same stem, beside it)."""
    return path.with_suffix(".yaml")


def partial_path(path: Path) -> Path:
    """Where an interrupted run keeps its resumable state; never mistaken for a finished artifact."""
    return path.with_name(path.name + ".partial")


def model_fingerprint(model: torch.nn.Module, as_dtype: torch.dtype | None = None) -> str:
    """sha256 of the sorted (parameter name, shape, dtype) triples of ``model`` (with ``as_dtype``: as if
    it had been loaded in that dtype)."""
    def dt(p):
        return str(as_dtype or p.dtype).removeprefix("torch.")
    rows = sorted(f"{n}|{tuple(p.shape)}|{dt(p)}" for n, p in model.named_parameters())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def held_in(model: torch.nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether every parameter of ``model`` is held in ``dtype``: where a weights digest read in that
    dtype can be compared with this model's (the digest reads values, which depend on the dtype)."""
    return all(p.dtype == dtype for p in model.parameters())


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap check that two models hold the same VALUES (the fingerprint only covers names, shapes
    and dtypes): sha256 over the first and last 16 values of every parameter. Fine-tuning or another
    checkpoint changes them; reading only two spots keeps a memory-mapped checkpoint unread (each
    touched spot maps in a neighbourhood of pages)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        ends = torch.cat([flat[:16], flat[-16:]]).float().cpu()
        h.update(name.encode() + ends.numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_digest(directory: Path, files: Iterable[Path]) -> str:
    """One sha256 over files under ``directory``: each one's path relative to it and its content digest,
    in sorted order (a folder of inputs as one fingerprint)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(directory)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def check_writable(path: Path, option: str = "--out") -> None:
    """Refuse early (before any heavy work) an output path that cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory, expected a file path")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: directory {parent} is not writable")


def lock_path(out: Path) -> Path:
    """The lock file of an output being written: a hidden file beside it (``.NAME.lock``)."""
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def output_lock(out: Path, command: str = "") -> Iterator[None]:
    """One writer per output: hold ``.NAME.lock`` beside ``out`` (pid, host, start time, command) while
    the body runs, released on every exit path. Another live holder is refused in one line naming it;
    a lock left by a dead process on this host is taken over. Ranks > 0 of a launcher do not lock
    (rank 0 writes for all); nor is anything locked where the directory is missing (the stage says so)."""
    import socket
    import time

    if os.environ.get("RANK", "0") not in ("", "0") or not out.parent.is_dir():
        yield
        return
    lock, host = lock_path(out), socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                held = {}
            pid = int(held.get("pid", -1)) if str(held.get("pid", "")).lstrip("-").isdigit() else -1
            if held.get("host") == host and pid > 0 and not _alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not held:  # being written this instant, or unreadable: look again
                time.sleep(0.1)
                continue
            raise UserError(f"{out}: being written by another job (pid {held.get('pid')} on {held.get('host')}, "
                            f"since {held.get('started')}); wait for it, or remove {lock} if that job is gone")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        break
    else:
        raise UserError(f"{out}: cannot take its lock {lock}")
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass


def _write_failure(path: Path, err: BaseException) -> UserError | None:
    """A write that failed for want of space, a size limit or the device (ENOSPC, EDQUOT, EFBIG, EIO, ...)
    as one line naming the file; None for anything else. safetensors reports its I/O errors as a
    SafetensorError whose text carries the OS error."""
    import errno

    codes = {errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT, errno.EROFS}
    if isinstance(err, OSError) and err.errno in codes:
        why = err.strerror or str(err)
    elif type(err).__name__ == "SafetensorError" and "os error" in str(err):
        why = str(err).split("I/O error:", 1)[-1].strip()
    else:
        return None
    return UserError(f"{path}: cannot write it ({why}); nothing of it was written and any earlier {path.name} "
                     f"is unchanged")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path in the destination directory; rename it over ``path`` only on success. A write
    that fails for lack of space (or a size limit, or the device) leaves no partial file and ends as
    one line naming ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (_write_failure(path, e) or e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        failure = _write_failure(path, e)
        if failure is not None:
            raise failure from None
        raise


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``out`` (an artifact made of several files); it becomes ``out``
    only when the block succeeds (``out`` may exist as an empty directory) and is removed otherwise."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _write_failure(out, e)
        if failure is not None:
            raise failure from None
        raise


@contextmanager
def replace_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``out`` that REPLACES ``out`` (a checkpoint: several files that
    must change together) only when the block succeeds; until then the previous ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    new, old = out.parent / f".{out.name}.new", out.parent / f".{out.name}.old"
    shutil.rmtree(new, ignore_errors=True)  # left by a process killed mid-write
    with atomic_dir(new) as tmp:
        yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def copy_with_sidecar(src: Path, dst: Path) -> None:
    """Put an artifact and its YAML sidecar at ``dst`` (a hard link when possible, else a copy), so a
    run directory holds its own mask. Artifacts are only ever replaced by rename, so a link stays the
    file it was."""
    for a, b in ((src, dst), (sidecar_path(src), sidecar_path(dst))):
        if not a.exists():
            continue
        b.unlink(missing_ok=True)
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _canonicalise_header(tmp)


def _canonicalise_header(path: Path) -> None:
    """safetensors writes ``__metadata__`` in hash order, which differs between runs; rewrite the header
    (same length, in place) with sorted keys so equal inputs give byte-identical files."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canon) > n:  # cannot happen for a compact header; keep the library's bytes if it does
            return
        f.seek(8)
        f.write(canon + b" " * (n - len(canon)))


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=120))


def read_header(path: Path, expect_kind: str | None = None) -> dict[str, str]:
    """Read and check a dowser safetensors header (kind, format version) without loading tensors."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a safetensors file ({e})") from None
    meta = header.get("__metadata__") or {}
    kind = meta.get("dowser_kind")
    if kind is None:
        raise UserError(f"{path}: safetensors file without dowser metadata (not written by dowser)")
    if expect_kind and kind != expect_kind:
        raise UserError(f"{path}: is a {kind} artifact, expected {expect_kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {meta.get('format_version')} is not supported (want {FORMAT_VERSION})")
    return meta


def tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise UserError(f"{path}: cannot read tensors ({e})") from None


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (names if names is not None else f.keys())}
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"{path}: cannot read tensors ({e})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping")
    return data


def sidecar_header(kind: str, command: str) -> dict[str, Any]:
    """The fields every YAML sidecar starts with."""
    import time

    return {"kind": kind, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}


def base_metadata(kind: str, fingerprint: str, **extra: Any) -> dict[str, str]:
    meta = {"dowser_kind": kind, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "model_fingerprint": fingerprint}
    meta.update({k: str(v) for k, v in extra.items()})
    return meta
