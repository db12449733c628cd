"""Reading recipe YAML: safe loading with duplicate keys refused, ``key.path=value`` overrides,
``${ENV}`` expansion and the source line of a field, for recipes and the other YAML configs
(``jaxcl merge``). Errors are :class:`RecipeError` naming the file, line and field."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the culprit."""


def set_path(raw: dict[str, Any], path: str, value: Any, label: str) -> None:
    """Set ``raw[a][b][0]...`` for ``path = "a.b.0..."`` (list entries by index; missing mapping
    keys are created, so a misspelt field reaches the schema and is refused there)."""
    keys = path.split(".")
    node: Any = raw
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth]) or "recipe"
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(
                    f"{label}: {where} is a list of {len(node)}; {key!r} is not an index of it"
                )
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"{label}: {where} is not a mapping or list")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.path=value`` pairs (values parsed as YAML; list indices as numbers)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key.path=value")
        path, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
            check_duplicate_keys(
                yaml.compose(text, Loader=yaml.SafeLoader), f"override {item!r}", lines=False
            )
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({err})") from None
        set_path(raw, path, value, f"override {item!r}")
    return raw


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out or "recipe"


def check_duplicate_keys(root: yaml.Node | None, source: str, *, lines: bool = True) -> None:
    """Refuse a mapping that gives a key twice (YAML would silently keep the last value),
    naming the field and (``lines``) both lines."""
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node | None, loc: tuple[Any, ...]) -> None:
        if node is None or id(node) in seen_nodes:  # an alias: already checked
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name != "<<":  # "<<": a merge, not a key
                    line = key.start_mark.line + 1
                    if name in first:
                        where = f"{source}:{line}" if lines else source
                        first_line = f" (first given on line {first[name]})" if lines else ""
                        raise RecipeError(
                            f"{where}: {_field_path((*loc, name))}: duplicate key {name!r}"
                            f"{first_line}; YAML would keep only the last value: remove one"
                        )
                    first[name] = line
                walk(value, (*loc, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    walk(root, ())


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (the field, or its parent)."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


_E_NOTATION = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+")


def _e_notation_hint(text: str) -> str | None:
    """The message for an integer field given ``1e12``: YAML 1.1 (PyYAML) reads e-notation as a
    number only with a dot and a signed exponent (``1.0e+12``), anything else as text."""
    if not _E_NOTATION.fullmatch(text.strip()):
        return None
    value = float(text.replace("_", ""))
    why = (
        f"{text!r} is read as text, not a number (YAML reads e-notation as a number only with a "
        "dot and a signed exponent, as in 1.0e+12)"
    )
    if not value.is_integer():
        return f"{why}; this field takes a whole number, and {value:g} is not one"
    exact = np.format_float_scientific(value, trim="0", exp_digits=2)  # 1.2345678e+07
    return f"{why}; write {int(value)} (or {exact})"


def read_yaml(
    path: Path, *, what: str, error: type[Exception] = ValueError
) -> tuple[Any, yaml.Node | None]:
    """Safe-load the YAML file ``path`` (a key given twice refused): ``(data, node tree)``, the
    node tree for error lines. Unreadable files and bad YAML raise ``error`` naming the file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        check_duplicate_keys(root, str(path))
        return yaml.safe_load(text), root
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(raw: Any, source: str, where: str = "") -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in every string of the recipe, from the environment
    (``TRACE_DATA=/data/trace jaxcl run recipes/trace.yaml``). An unset variable without a
    default is an error naming the field."""
    if isinstance(raw, dict):
        return {k: expand_env(v, source, f"{where}.{k}".lstrip(".")) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand_env(v, source, f"{where}[{i}]") for i, v in enumerate(raw)]
    if not isinstance(raw, str) or "${" not in raw:
        return raw

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise RecipeError(
                f"{source}: {where}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )
        return default

    return _ENV.sub(value, raw)
