"""Strict reading of YAML documents: every key known, every number checked, every error named.

``Section`` wraps one mapping of a parsed YAML document and hands out typed fields; ``finish()``
rejects the keys nobody asked for. Errors are ``SchemaError`` (a ``ValueError``) that name the file,
the dotted key, the value found and what was expected. PyYAML reads ``3.35e12`` (no sign in the
exponent) as a string; ``number()`` converts such strings and rejects anything else, so a number
is never silently kept as text.

Every document is read by one bounded reader (``read_yaml_mapping`` for files, ``parse_yaml_mapping`` for
uploaded bytes): regular files only, at most MAX_YAML_BYTES, nesting at most MAX_YAML_DEPTH, at most
MAX_YAML_ALIASES aliases and MAX_YAML_NODES nodes once aliases are expanded, and no duplicate keys. Values in
error messages are shortened (``short_repr``), so a hostile file cannot make a huge message.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

from moeplan.bounds import FILE_MAX

_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

MAX_YAML_BYTES = 8 * 1024 * 1024  # a YAML document larger than this is refused unread
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings
MAX_YAML_ALIASES = 100  # ``*alias`` references in one document
MAX_YAML_NODES = 1_000_000  # nodes with every alias expanded: a "billion laughs" document is refused
MAX_REPR_CHARS = 200  # the longest value an error message shows

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxlevel = 3


class SchemaError(ValueError):
    """A document does not match its schema. The message names file, key, value and expectation."""


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to at most MAX_REPR_CHARS characters: error messages never echo a huge value."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_REPR_CHARS else text[: MAX_REPR_CHARS - 3] + "..."


def _clip(text: str, limit: int = 600) -> str:
    """A long message's head and tail (a YAML error ends with its line and column)."""
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2:]}"


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document is beyond one of the reader's limits (depth, aliases, expanded size)."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (pure Python) with limits on depth, aliases and expanded size, and no duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = self._aliases = self._nodes = 0

    def _limit(self, problem: str) -> YAMLLimitError:
        return YAMLLimitError(problem=problem, problem_mark=self.peek_event().start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise self._limit(f"more than {MAX_YAML_ALIASES} aliases")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise self._limit(f"more than {MAX_YAML_NODES:,} nodes")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise self._limit(f"nesting deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # The scanner looks ahead across open '[' / '{' (quadratic in their number): stop it at the depth cap too.
        super().fetch_flow_collection_start(token_class)
        if self.flow_level > MAX_YAML_DEPTH:
            raise YAMLLimitError(problem=f"nesting deeper than {MAX_YAML_DEPTH} levels", problem_mark=self.get_mark())

    def compose_document(self) -> Any:
        node = super().compose_document()
        if _expanded_size(node) > MAX_YAML_NODES:
            raise YAMLLimitError(problem=f"more than {MAX_YAML_NODES:,} nodes once aliases are expanded "
                                 "(or an alias that contains itself)", problem_mark=node.start_mark)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class names it
                    continue
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {short_repr(key)} (lines {earlier.start_mark.line + 1} "
                        f"and {key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(root: Any) -> float:
    """Nodes under ``root`` with every alias expanded; memoised per node, so linear in the composed graph.

    Iterative (the graph may be deeper than Python's stack through aliases); a cycle counts as infinite."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[id(node)] > MAX_YAML_NODES:
                return sizes[id(node)]
        elif id(node) in open_nodes:
            return math.inf
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))
    return sizes[id(root)]


def read_bounded(path: str | os.PathLike[str], what: str, limit: int = MAX_YAML_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; FIFOs, devices, directories are a SchemaError."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # follows symlinks: a link to /dev/zero is refused too
            raise SchemaError(f"{path}: cannot read {what} file: not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped after the stat
                raise SchemaError(f"{path}: cannot read {what} file: not a regular file")
            data = fh.read(limit + 1)
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read {what} file: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise SchemaError(f"{path}: {what} file is larger than {limit:,} bytes")
    return data


def parse_yaml_mapping(data: str | bytes, source: str, what: str) -> dict[str, Any]:
    """Parse a YAML document (text or UTF-8 bytes) that must hold one mapping, within the reader's limits.

    Files and uploads both come here; any failure is a SchemaError that names ``source``."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "replace"))
    if size > MAX_YAML_BYTES:
        raise SchemaError(f"{source}: {what} file is larger than {MAX_YAML_BYTES:,} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{source}: cannot read {what} file: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        loader = BoundedLoader(text)  # refuses control characters already
        loader.name = source  # marks in error messages name the file
        doc = loader.get_single_data()
    except YAMLLimitError as exc:
        raise SchemaError(f"{source}: {what} file refused: {_clip(str(exc))}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date like 2024-02-30, an int of 5,000 digits
        raise SchemaError(f"{source}: malformed YAML in {what} file: {_clip(str(exc))}") from None
    if not isinstance(doc, dict):
        raise SchemaError(f"{source}: expected a mapping at the top of the {what} file, got {type(doc).__name__}")
    return doc


def read_yaml_mapping(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a regular file of at most MAX_YAML_BYTES holding one YAML mapping; any failure is a SchemaError."""
    return parse_yaml_mapping(read_bounded(path, what), os.fspath(path), what)


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
    raise ValueError(f"{what}: {short_repr(text)} is neither a bundled name nor an existing .yaml file; "
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


def _at_most(maximum: float) -> str:
    return "" if math.isinf(maximum) else f" and at most {maximum:g}"


class Section:
    """Typed, strict access to one mapping of a YAML document."""

    def __init__(self, data: Any, where: str, file: str) -> None:
        if not isinstance(data, dict):
            raise SchemaError(f"{file}: {where or 'top level'}: expected a mapping, got {short_repr(data)}")
        self.data = data
        self.where = where
        self.file = file
        self._seen: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, value: Any, expected: str) -> SchemaError:
        return SchemaError(f"{self.file}: {self._name(key)}: got {short_repr(value)}; expected {expected}")

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
        """A finite number > minimum (strict) or >= minimum, and at most the key's ``bounds.FILE_MAX``; ints and
        numeric strings are converted."""
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        number = to_number(raw)
        relation = ">" if strict else ">="
        maximum = FILE_MAX.get(key, math.inf)
        if number is None or number < minimum or (strict and number == minimum) or number > maximum:
            raise self.fail(key, raw, f"a finite number {relation} {minimum:g}" + _at_most(maximum))
        return number

    def integer(self, key: str, *, optional: bool = False, minimum: int = 1) -> int | None:
        """An integer >= minimum and at most the key's ``bounds.FILE_MAX``."""
        raw = self._get(key, optional)
        if raw is None and optional:
            return None
        maximum = FILE_MAX.get(key, math.inf)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum or raw > maximum:
            raise self.fail(key, raw, f"an integer >= {minimum}" + _at_most(maximum))
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
                f"{self.file}: {self.where or 'top level'}: unknown key(s) {short_repr(unknown)}; "
                f"expected only {sorted(self._seen)}"
            )
