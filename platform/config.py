"""Typed configuration: YAML recipes and `a.b=c` overrides load into pydantic models.

Every recipe is a YAML file whose first line is a comment with the command that runs it, so
that a reader who opens a recipe knows how to use it. Values never stay in bare dicts: they are
validated into the model the consumer declares, and a wrong field is reported with its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from indai.platform.errors import UserError

MAX_YAML_BYTES = 1_000_000
MAX_YAML_ALIASES = 64  # a recipe needs a few; "billion laughs" documents need thousands

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base of every config model: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: an unknown or `!!python/...` tag is an error) that
    also refuses more than MAX_YAML_ALIASES alias references. Aliases are shared when parsed but
    copied by everything that walks the data afterwards (validation, logging), so a few lines of
    nested anchors would otherwise grow into gigabytes."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise UserError(f"YAML uses more than {MAX_YAML_ALIASES} aliases (*name): write the values out, "
                                "or split the file")
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """Parse untrusted YAML text into plain data (see BoundedLoader)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a user-supplied file, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} does not exist or is not a file: check the path")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"config file {str(path)!r} is larger than {MAX_YAML_BYTES} bytes: is it the right file?")
    try:
        data = safe_yaml(p.read_text(encoding="utf-8"))
    except UserError as e:
        raise UserError(f"config file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of fields at the top, not {type(data).__name__}")
    return data


def recipe_command(path: str | Path) -> str:
    """The command a recipe declares on its first line (`# indai ...`), or an error."""
    first = Path(path).read_text(encoding="utf-8").splitlines()[:1]
    line = first[0].strip() if first else ""
    if not line.startswith("# indai ") and not line.startswith("# python "):
        raise UserError(f"recipe {str(path)!r} must begin with a comment line holding the command that runs it, e.g. '# indai train {path}'")
    return line[2:]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML scalar)."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.isascii() and p.isidentifier() for p in parts):  # field names are ASCII; "º".isidentifier() is True
        raise UserError(f"override key {key!r} must be dotted field names like optim.lr")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, UserError):
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = dict(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field {loc!r}: {first['msg']}{more}"


def validate(model: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Load `model` from a YAML file (optional), then apply `a.b=c` overrides."""
    data = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    data = apply_overrides(data, overrides or [])
    return validate(model, data, str(path) if path else "config")
