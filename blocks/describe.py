"""The text behind `hybridnas blocks`: every registered block with its paper and options.

Reads only the registries and each class's ``paper`` / ``options`` attributes (nothing is built), so
it stays correct as blocks are added and costs no tensor work.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from .registry import ADDONS, DOWNSAMPLES, MIXERS

_SECTIONS = (
    ("Mixers", "build_mixer(name, dim, **options)", "(B, C, H, W) -> (B, C, H, W), any H, W >= 1", MIXERS),
    ("Add-ons", "build_addon(name, dim)", "after the mixer's residual, (B, C, H, W) -> same", ADDONS),
    (
        "Downsamplers",
        "build_downsample(name, in_dim, out_dim)",
        "(B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2))",
        DOWNSAMPLES,
    ),
)
_GAP = "  "


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) if options else "-"


def _paper_lines(cls: type, width: int) -> list[str]:
    """The paper wrapped to ``width``, its link (the first http... word) on a line of its own."""
    paper = str(getattr(cls, "paper", "") or "").strip()
    if paper in ("", "-"):  # e.g. the identity add-on: say what it is instead
        paper = ((cls.__doc__ or "").strip().splitlines() or ["-"])[0]
    words = paper.split()
    links = [w for w in words if w.startswith(("http://", "https://"))]
    text = " ".join(w for w in words if w not in links)
    lines = textwrap.wrap(text, width, break_on_hyphens=False) if text else []
    return lines + links


def describe(width: int | None = None) -> str:
    """A table of every mixer, add-on and downsampler: name, options with defaults, paper and link.

    ``width`` defaults to the terminal's (100 columns when not a terminal, e.g. piped into a file).
    """
    if width is None:
        width = shutil.get_terminal_size(fallback=(100, 24)).columns
    width = max(72, min(int(width), 140))
    tables = [table for *_, table in _SECTIONS]
    name_w = max(len("name"), *(len(n) for t in tables for n in t))
    opt_strings = [_options_text(dict(getattr(c, "options", {}))) for t in tables for c in t.values()]
    # Options get at most a third of the line; longer lists wrap at their commas.
    opt_w = max(len("options"), min(max(map(len, opt_strings)), width // 3))
    paper_col = 2 + name_w + len(_GAP) + opt_w + len(_GAP)
    paper_w = max(24, width - paper_col)

    out: list[str] = ["hybridnas blocks: what a stage can be built from", ""]
    for title, call, shape, table in _SECTIONS:
        out.append(f"{title}: {call}")
        out.append(f"  {shape}")
        out.append("")
        out.append(f"  {'name':<{name_w}}{_GAP}{'options':<{opt_w}}{_GAP}paper")
        out.append(f"  {'-' * name_w}{_GAP}{'-' * opt_w}{_GAP}{'-' * min(paper_w, 40)}")
        for name, cls in table.items():
            opts = textwrap.wrap(_options_text(dict(getattr(cls, "options", {}))), opt_w) or ["-"]
            paper = _paper_lines(cls, paper_w)
            for i in range(max(len(opts), len(paper))):
                cells = (
                    name if i == 0 else "",
                    opts[i] if i < len(opts) else "",
                    paper[i] if i < len(paper) else "",
                )
                out.append(f"  {cells[0]:<{name_w}}{_GAP}{cells[1]:<{opt_w}}{_GAP}{cells[2]}".rstrip())
        out.append("")
    out.append("Options are set per stage in the YAML (e.g. options: {heads: 4, window: 7}).")
    return "\n".join(out)
