"""YAML configs: shipped inside the package (``dowser_cli/configs``: model aliases, probe settings,
recipes, task suites), a user's own directories in front of them (``DOWSER_CONFIG_DIR``), files by
path via --config / --tasks; CLI options override them."""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
from pathlib import Path
from typing import Any

import yaml

from dowser_cli.errors import UserError

# package data: a real directory in every install (wheel or editable), so a plain Path serves
SHIPPED_DIR = Path(str(importlib.resources.files("dowser_cli").joinpath("configs")))


STAGE_SECTIONS = {"probe", "mask", "finetune", "merge", "eval"}


def config_dirs() -> list[Path]:
    """Where named configs are looked up, first match wins: the entries of ``DOWSER_CONFIG_DIR``
    (``os.pathsep``-separated, each laid out like the shipped one: models.yaml, models/, probe/,
    recipes/, tasks/), then the shipped directory."""
    user = [Path(p).expanduser() for p in os.environ.get("DOWSER_CONFIG_DIR", "").split(os.pathsep) if p]
    return user + [SHIPPED_DIR]


def names(kind: str) -> list[str]:
    """The names a ``kind`` (probe | recipes | tasks) offers across the config directories."""
    return sorted({f.stem for d in config_dirs() if (d / kind).is_dir() for f in (d / kind).glob("*.yaml")})


def find(spec: Path | str, kind: str | tuple[str, ...], flag: str = "--config") -> Path:
    """A config file given by path, or by name (``paper`` -> ``recipes/paper.yaml`` in the first config
    directory that has it; with several kinds, the first kind that has the name, e.g. a probe setting
    before a recipe of that name). A missing one is one line listing the names on offer."""
    kinds = (kind,) if isinstance(kind, str) else kind
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = str(spec)
    if os.sep not in name and path.suffix not in (".yaml", ".yml"):
        for k in kinds:
            for d in config_dirs():
                if (d / k / f"{name}.yaml").is_file():
                    return d / k / f"{name}.yaml"
        offered = sorted({n for k in kinds for n in names(k)})
        raise UserError(f"{flag} {name}: no such file, nor a shipped name; names: {', '.join(offered)}")
    raise UserError(f"{flag} {spec}: no such file")


def option(default: Any, help: str, *, show: str | None = None, off: str | None = None):
    """A stage's config field that is also its command-line option, declared once: the default, the help
    (shown with the default in brackets, or ``show`` where the bare value says too little); the flag is
    ``--field-name``, and a bool gets ``--flag/--off``, ``off`` naming the second (``--no-field-name``). The CLI builds the
    options from these fields (cli.config_options), the YAML section is the same names, validate()
    checks the values."""
    return dataclasses.field(default=default, metadata={"help": help, "show": show, "off": off})


def option_help(f: dataclasses.Field) -> str:
    shown = f.metadata.get("show")
    if shown is None:
        shown = f.default if not isinstance(f.default, bool) else ("on" if f.default else "off")
        shown = repr(shown) if shown == "" else shown
    return f"{f.metadata['help']} [{shown}]"


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


def resolve(defaults, file: Path | str | None, section: str, overrides: dict[str, Any],
            kind: str | tuple[str, ...] = "recipes"):
    """defaults (a dataclass instance) <- the YAML file's ``section`` (or top level) <- CLI overrides
    that the user actually gave (None means not given). Unknown keys in the file are refused. ``file``
    is a path or a shipped name looked up under ``kind`` (probe | recipes)."""
    values = dataclasses.asdict(defaults)
    if file is not None:
        file = find(file, kind)
        data = load_yaml_file(file)
        # a recipe's stage sections, or a flat file of one stage's keys
        data = data.get(section, {} if set(data) & STAGE_SECTIONS else data) or {}
        unknown = sorted(set(data) - set(values))
        if unknown:
            raise UserError(f"config {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(values))}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return type(defaults)(**values)
