"""YAML configs: shipped under configs/, user files via --config; CLI options override them."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from dowser_cli.errors import UserError

CONFIG_DIR = Path(os.environ.get("DOWSER_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))


def load_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping at the top level")
    return data


def resolve(defaults, file: Path | None, section: str, overrides: dict[str, Any]):
    """defaults (a dataclass instance) <- the YAML file's ``section`` (or top level) <- CLI overrides
    that the user actually gave (None means not given). Unknown keys in the file are refused."""
    values = dataclasses.asdict(defaults)
    if file is not None:
        data = load_yaml_file(file)
        data = data.get(section, data)
        unknown = sorted(set(data) - set(values))
        if unknown:
            raise UserError(f"config {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(values))}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return type(defaults)(**values)
