"""Strict reading of YAML documents: every key known, every number checked, every error named.

``Section`` wraps one mapping of a parsed YAML document and hands out typed fields; ``finish()``
rejects the keys nobody asked for. Errors are ``SchemaError`` (a ``ValueError``) that name the file,
the dotted key, the value found and what was expected. PyYAML reads ``3.35e12`` (no sign in the
exponent) as a string; ``number()`` converts such strings and rejects anything else, so a number
is never silently kept as text.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class SchemaError(ValueError):
    """A document does not match its schema. The message names file, key, value and expectation."""


def read_yaml_mapping(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """``yaml.safe_load`` a file that must hold one mapping; any failure is a SchemaError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read {what} file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: malformed YAML in {what} file: {exc}") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a mapping at the top of the {what} file, got {type(data).__name__}")
    return data


def resolve_bundled(name: str | os.PathLike[str], folder: Path, what: str) -> Path:
    """A bundled file's stem (``folder/<name>.yaml``) or an existing ``.yaml``/``.yml`` path.

    The name is never joined onto ``folder``: only the listed stems match, so ``"../../etc/passwd"``
    reads nothing; anything else is a ValueError that lists the bundled names."""
    text = os.fspath(name)
    bundled = {p.stem: p for p in folder.glob("*.yaml")}
    if text in bundled:
        return bundled[text]
    path = Path(text)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ValueError(f"{what}: {text!r} is neither a bundled name nor an existing .yaml file; "
                     f"bundled: {sorted(bundled)}")


def to_number(value: Any) -> float | None:
    """A finite float from an int, float or numeric string ('3.35e12'); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


class Section:
    """Typed, strict access to one mapping of a YAML document."""

    def __init__(self, data: Any, where: str, file: str) -> None:
        if not isinstance(data, dict):
            raise SchemaError(f"{file}: {where or 'top level'}: expected a mapping, got {data!r}")
        self.data = data
        self.where = where
        self.file = file
        self._seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, value: Any, expected: str) -> SchemaError:
        return SchemaError(f"{self.file}: {self._name(key)}: got {value!r}; expected {expected}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def _get(self, key: str, optional: bool) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if optional:
                return None
            raise SchemaError(f"{self.file}: {self._name(key)}: missing required key")
        return self.data[key]

    def number(self, key: str, *, optional: bool = False, minimum: float = 0.0, strict: bool = True) -> float | None:
        """A finite number > minimum (strict) or >= minimum; ints and numeric strings are converted."""
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        number = to_number(raw)
        relation = ">" if strict else ">="
        if number is None or number < minimum or (strict and number == minimum):
            raise self.fail(key, raw, f"a finite number {relation} {minimum:g}")
        return number

    def integer(self, key: str, *, optional: bool = False, minimum: int = 1) -> int | None:
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
            raise self.fail(key, raw, f"an integer >= {minimum}")
        return raw

    def string(self, key: str, *, optional: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        if not isinstance(raw, str) or not raw.strip():
            raise self.fail(key, raw, "a non-empty string")
        if choices is not None and raw not in choices:
            raise self.fail(key, raw, f"one of {list(choices)}")
        return raw

    def boolean(self, key: str, *, optional: bool = False, default: bool = False) -> bool:
        raw = self._get(key, optional)
        if raw is None and optional:
            return default
        if not isinstance(raw, bool):
            raise self.fail(key, raw, "true or false")
        return raw

    def int_list(self, key: str, *, optional: bool = False, minimum: int = 1) -> tuple[int, ...] | None:
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        ok = isinstance(raw, list) and raw and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in raw
        )
        if not ok:
            raise self.fail(key, raw, f"a non-empty list of integers >= {minimum}")
        return tuple(raw)

    def section(self, key: str, *, optional: bool = False) -> Section | None:
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        if not isinstance(raw, dict):
            raise self.fail(key, raw, "a mapping")
        return Section(raw, self._name(key), self.file)

    def finish(self) -> None:
        """Reject keys that were never read: a typo must not pass silently."""
        unknown = sorted(str(k) for k in self.data if k not in self._seen)
        if unknown:
            raise SchemaError(
                f"{self.file}: {self.where or 'top level'}: unknown key(s) {unknown}; "
                f"expected only {sorted(self._seen)}"
            )
