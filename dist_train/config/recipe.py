"""YAML -> overrides -> typed `Recipe`; friendly errors; the resolved dump (no torch import).

Every user mistake found here raises `UserError` with the file, the key path, what was
expected and, where a near name exists, "did you mean".
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dist_train.config.schema import Recipe
from dist_train.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; recipes mean the float, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply `a.b=v` / `~a.b` overrides and validate it."""
    path = Path(path)
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw, source=str(path))


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; pass the path of a .yaml recipe.")
    try:
        raw = _yaml_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(
            f"{where}: malformed YAML ({err.problem}); check indentation and that every "
            "`key: value` pair has a space after the colon."
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable YAML file ({err}).") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; start from one in recipes/.")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (name:, data:, model: ...).")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b=v` (v parsed as YAML) or delete `~a.b`; list items are addressed by index."""
    delete = item.startswith("~")
    key, sep, value = item[1:].partition("=") if delete else item.partition("=")
    parts = key.split(".")
    if (not delete and not sep) or (delete and sep) or not all(parts):
        raise UserError(
            f"override `{item}`: expected `key.sub=value` to set or `~key.sub` to delete "
            "(e.g. optimizer.lr=0.01 or ~train.early_stopping)."
        )
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), item, create=not delete)
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise UserError(
            f"override `{item}`: `{'.'.join(parts[:-1])}` holds a single value, not "
            f"a mapping; set it directly ({'.'.join(parts[:-1])}=...)."
        )
    if delete:
        _child(node, last, key, item, create=False)
        del node[int(last) if isinstance(node, list) else last]
        return
    try:
        parsed = _yaml_load(value) if value else ""
    except yaml.YAMLError:
        raise UserError(f"override `{item}`: the value is not valid YAML; quote it.") from None
    if isinstance(node, list):
        _child(node, last, key, item, create=False)
        node[int(last)] = parsed
    else:
        node[last] = parsed


def _child(node: Any, part: str, path: str, item: str, create: bool) -> Any:
    if isinstance(node, list):
        if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
            raise UserError(
                f"override `{item}`: `{path}` is not an index of a {len(node)}-item list."
            )
        return node[int(part)]
    if not isinstance(node, dict):
        raise UserError(f"override `{item}`: `{path}` goes inside a value that is not a mapping.")
    if part not in node:
        if not create:
            raise UserError(f"override `{item}`: `{path}` is not set in the recipe.")
        node[part] = {}
    return node[part]


def validate(raw: dict, source: str = "recipe", context: dict | None = None) -> Recipe:
    """`context`: what dist_train.fit supplies beside the recipe (`model_supplied`,
    `metric_names`); recipe files are validated without it."""
    try:
        return Recipe.model_validate(raw, context=context)
    except ValidationError as err:
        # Misspelt keys first: their "required key is missing" twin would hide the typo.
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        lines = [_describe(e) for e in errors[:6]]
        more = len(errors) - len(lines)
        tail = f"\n  (and {more} more)" if more > 0 else ""
        raise UserError(f"{source}: invalid recipe:\n  - " + "\n  - ".join(lines) + tail) from None


def _describe(error: dict) -> str:
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    path = _key_path(loc)
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"{path}: unknown key; {hint}allowed here: {', '.join(known)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "value_error" and msg.startswith("Value error, "):
        text = msg.removeprefix("Value error, ")
        # Cross-field checks start with their own key path; others are about `path` itself.
        return text if not path or ":" in text.split(" ")[0] else f"{path}: {text}"
    got = error.get("input")
    shown = f" (got {json.dumps(got, default=str)[:60]})" if not isinstance(got, dict) else ""
    if kind == "literal_error" and isinstance(got, str):
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(got, choices, n=1)
        shown += f"; did you mean `{close[0]}`?" if close else ""
    return f"{path}: {msg}{shown}"


def _key_path(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: list) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or _by_alias(model, part)
        model = model_in(field.annotation) if field else None
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _by_alias(model: type[BaseModel], alias: str) -> Any:
    return next((f for f in model.model_fields.values() if f.alias == alias), None)


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (`X | None`, `list[X]`, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
    return None


def resolved(recipe: Recipe) -> dict:
    """The recipe with every default filled in; training from it reproduces the run."""
    return recipe.model_dump(mode="json", by_alias=True, exclude_none=True)


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(resolved(recipe), sort_keys=False, default_flow_style=None)


def recipe_hash(recipe: Recipe) -> str:
    blob = json.dumps(resolved(recipe), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
