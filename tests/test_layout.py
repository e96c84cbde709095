"""The package's layers import downward only (scripts/import_graph.py reads the source with ast)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_has_no_import_cycle_and_no_private_name_crosses_modules():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout
    assert "cycles: 0" in r.stdout and "private names imported across modules: 0" in r.stdout


def test_no_stage_imports_another_stage():
    import subprocess
    import sys

    stages = {"probe", "mask", "finetune", "export", "merge", "evaluate", "inspection"}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--edges"], capture_output=True,
                       text=True, check=True)
    edges = [line.split() for line in r.stdout.splitlines() if line.startswith("  ") and "->" in line]
    crossing = [f"{e[0]} -> {e[2]}" for e in edges if e[0] in stages and e[2] in stages]
    assert not crossing, crossing
