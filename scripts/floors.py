#!/usr/bin/env python
"""The floors pyproject.toml declares for the packages `make test-floor` tests at their floor, as pip
requirements pinned to them (``torch==2.13 transformers==5.24 ...``)."""
import re
import tomllib
from pathlib import Path

FLOORED = ("torch", "transformers", "peft", "accelerate", "trl")

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
floors = {}
for r in reqs:
    m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", r)
    if m and m.group(1).lower() in FLOORED:
        floors[m.group(1).lower()] = m.group(2)
missing = [p for p in FLOORED if p not in floors]
if missing:
    raise SystemExit(f"pyproject.toml declares no floor for {', '.join(missing)}")
print(" ".join(f"{p}=={floors[p]}" for p in FLOORED))
