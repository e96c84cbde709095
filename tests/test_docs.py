"""The docs cannot drift from the code: every fenced block marked ```` ```bash runnable ```` (or
```` ```python runnable ````) in README.md and docs/*.md runs (a file's blocks in order, in one temporary directory, as a user would paste them),
and every other `dowser` command line shown in a shell block parses against the real CLI (subcommand,
options, argument types), so a renamed option or command fails here."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SHELL = {"", "bash", "sh", "console", "shell"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(path.read_text())]


def runnable(path: Path) -> str:
    """The file's runnable blocks as one bash script, in order: bash blocks as they are, python blocks
    through the environment's python."""
    parts = []
    for info, body in blocks(path):
        words = info.split()
        if "runnable" not in words:
            continue
        if words[0] == "bash":
            parts.append(body)
        elif words[0] == "python":
            parts.append(f"python - <<'DOWSER_PY'\n{body}DOWSER_PY\n")
    return "\n".join(parts)


def command_lines(body: str) -> list[str]:
    """Shell lines of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def dowser_args(line: str) -> list[str] | None:
    """The arguments after `dowser` (or `python -m dowser_cli` under a launcher) in a line, else None."""
    if "..." in line or "<" in line:
        return None                      # elided on purpose: not a complete command
    try:
        words = shlex.split(line.split("|")[0].split("&&")[-1])
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w == "dowser" or w.endswith("/dowser"):
            return words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "dowser_cli":
            return words[i + 2:]
    return None


def test_the_docs_exist_and_mark_commands_to_run():
    assert (ROOT / "docs").is_dir() and len(DOCS) >= 8
    assert runnable(ROOT / "README.md") and runnable(ROOT / "docs" / "commands.md")
    assert len((ROOT / "README.md").read_text().splitlines()) <= 170     # a front page, not a manual


def run_doc(doc: Path, cwd: Path) -> None:
    """Run a file's runnable blocks in ``cwd`` as a user would paste them; fail on the first error."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DOWSER_QUIET": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DOWSER_CONFIG_DIR", None)
    script = "set -euo pipefail\n" + runnable(doc)
    r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{doc.name}: a runnable command failed\n{r.stderr[-3000:]}"


# docs/commands.md chains every stage: tests/test_cli.py runs it and checks what the stages wrote
CHAIN = ROOT / "docs" / "commands.md"


@pytest.mark.parametrize("doc", [d for d in DOCS if runnable(d) and d != CHAIN], ids=lambda p: p.name)
def test_runnable_commands_run(doc, tmp_path):
    run_doc(doc, tmp_path)


def test_every_dowser_command_shown_parses():
    import click
    from typer.main import get_command

    from dowser_cli.cli import _click_exception, app

    group = get_command(app)
    checked, bad = 0, []
    for doc in DOCS:
        for info, body in blocks(doc):
            if info.split()[:1] and info.split()[0] not in SHELL:
                continue
            for line in command_lines(body):
                args = dowser_args(line)
                if not args or args[0].startswith("-"):
                    continue
                cmd = group.commands.get(args[0])
                if cmd is None:
                    bad.append(f"{doc.name}: {line}: no command {args[0]!r}")
                    continue
                try:
                    cmd.make_context(args[0], list(args[1:]))
                except (click.ClickException, *_click_exception()) as e:
                    bad.append(f"{doc.name}: {line}: {e.format_message()}")
                checked += 1
    assert not bad, "\n".join(bad)
    assert checked >= 30
