"""Reading YAML the way every hybridnas file is read: duplicate keys refused, errors with line and
column as one `SpecError`, and the flow style an architecture file is written in."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .checks import key_path, type_name
from .errors import SpecError


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: let the base constructor produce its own error
            break
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text(text_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """(text, path or None). A `str` is a path when it is one line ending in .yaml/.yml or an existing file."""
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str)
        and "\n" not in text_or_path
        and (text_or_path.endswith((".yaml", ".yml")) or os.path.isfile(text_or_path))
    ):
        path = os.fspath(text_or_path)
        try:
            return Path(path).read_text(encoding="utf-8"), path
        except FileNotFoundError:
            raise SpecError(path, "file not found") from None
        except IsADirectoryError:
            raise SpecError(path, "is a directory, expected a YAML file") from None
        except UnicodeDecodeError as e:
            raise SpecError(path, f"not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise SpecError(path, f"cannot read: {e.strerror}") from None
    if not isinstance(text_or_path, str):
        raise SpecError("", f"expected YAML text or a file path, got {type_name(text_or_path)}")
    return text_or_path, None


def load_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML; a syntax error becomes a SpecError with the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise SpecError(source or "yaml", f"invalid YAML{where}: {problem}") from None
    except yaml.reader.ReaderError as e:  # a control character (binary junk): say where, on one line
        char = e.character if isinstance(e.character, str) else chr(e.character)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise SpecError(
            source or "yaml",
            f"invalid YAML at line {line}, column {column}: character {char!r} is not allowed "
            "(a binary file?)",
        ) from None
    except yaml.YAMLError as e:
        raise SpecError(source or "yaml", f"invalid YAML: {' '.join(str(e).split())}") from None


def load_mapping(text_or_path: str | os.PathLike, what: str) -> tuple[dict, str, str | None]:
    """Read and parse a YAML file or text whose top level must be a mapping: (dict, text, path)."""
    text, path = read_text(text_or_path)
    d = load_yaml(text, path)
    if d is None:
        raise SpecError(path or "", f"empty {what}")
    if not isinstance(d, dict):
        raise SpecError(path or "", f"expected {what} (a YAML mapping at the top level), got {type_name(d)}")
    return d, text, path


def plain_data(value: Any, path: str) -> Any:
    """metrics/provenance values as plain YAML/JSON data (numpy scalars unwrapped)."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SpecError(path, f"keys must be strings, got {k!r}")
            out[k] = plain_data(v, key_path(path, k))
        return out
    if isinstance(value, (list, tuple)):
        return [plain_data(v, key_path(path, i)) for i, v in enumerate(value)]
    raise SpecError(path, f"expected plain data (numbers, strings, lists, mappings), got {type_name(value)}")


def flow_yaml(d: Mapping) -> str:
    return yaml.safe_dump(dict(d), default_flow_style=True, sort_keys=False, width=1 << 30).strip()


def yaml_scalar(v: Any) -> str:
    return yaml.safe_dump(v, width=1 << 30).split("\n")[0]
