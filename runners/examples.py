"""The example files shipped inside the package (`hybridnas examples`), found by name.

``hybridnas search quickstart`` works from any directory: a name that is not an existing file is
looked up among the shipped experiment, ablation and architecture files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from hybridnas.search_space.errors import SpecError, did_you_mean


def example_files() -> list[Path]:
    """The shipped YAML files, sorted by name."""
    folder = resources.files("hybridnas.experiments")
    return sorted(
        (Path(str(f)) for f in folder.iterdir() if f.name.endswith((".yaml", ".yml"))), key=lambda p: p.name
    )


def kind_of(path: Path) -> str:
    """experiment, ablation or architecture, from the file's top-level keys."""
    import yaml

    keys = set((yaml.safe_load(path.read_text()) or {}).keys())
    if "space" in keys:
        return "experiment"
    if "vary" in keys:
        return "ablation"
    return "architecture"


def resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """``name_or_path`` itself when it is a file (or YAML text), else the shipped example of that
    name (``quickstart`` or ``quickstart.yaml``). An unknown bare name is a `SpecError` listing the
    shipped ones."""
    text = os.fspath(name_or_path)
    if "\n" in text or Path(text).exists():
        return name_or_path
    if os.sep in text or "/" in text:
        return name_or_path  # a path that does not exist: the loader says so, naming it
    stem = text.removesuffix(".yaml").removesuffix(".yml")
    shipped = {p.stem: p for p in example_files()}
    if stem in shipped:
        return str(shipped[stem])
    if text.endswith((".yaml", ".yml")):
        return name_or_path
    raise SpecError(
        text, f"no such file, nor a shipped example{did_you_mean(stem, list(shipped))} ({', '.join(shipped)})"
    )
