"""The checks every file hybridnas reads shares: key paths, types, ranges, a mixer's options.

Each raises `SpecError` naming the key path (``stages[2].options.heads``), the bad value and what is
allowed. Used by `spec` (architectures), `space` (search spaces), `experiment` and `ablation`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from hybridnas.blocks import MIXERS

from .config import check_range
from .errors import SpecError, did_you_mean, not_one_of

NORMS = ("batchnorm", "layernorm")

# Sanity bounds: far above anything a proxy search trains, low enough that a typo (an extra zero) is an error
# instead of a model that exhausts memory.
MAX_CHANNELS = 4096
MAX_DEPTH = 64
MAX_STAGES = 16
MAX_OPTION_INT = 256
MAX_MLP_RATIO = 16.0

# Integer options that must be >= 1 (everything else integer must be >= 0, e.g. a Swin shift of 0).
POSITIVE_OPTIONS = ("heads", "window", "kernel", "kernel_att", "kernel_conv", "span", "groups")
# Options that set how far an attention mixer looks; larger than the map means the block clamps it.
EXTENT_OPTIONS = ("window", "kernel_att", "kernel", "span")
# Widths above this are probed on the meta device (see _probe).
META_ABOVE = 512


# --------------------------------------------------------------------------------------------------------------
# validation helpers (shared with space.py and experiment.py)


def key_path(path: str, key: str | int) -> str:
    """``stages`` + 2 -> ``stages[2]``; ``stages[2]`` + ``mixer`` -> ``stages[2].mixer``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def check_mapping(
    d: Any, path: str, allowed: Iterable[str], required: Iterable[str] = (), what: str = "a mapping"
) -> dict:
    """`d` as a dict with only `allowed` keys (did-you-mean on a typo) and every `required` key."""
    if not isinstance(d, Mapping):
        raise SpecError(path, f"expected {what}, got {type_name(d)} {d!r}")
    allowed = list(allowed)
    for k in d:
        if not isinstance(k, str):
            raise SpecError(path, f"keys must be strings, got {k!r}")
        if k not in allowed:
            raise SpecError(
                key_path(path, k), f"unknown key; allowed: {', '.join(allowed)}{did_you_mean(k, allowed)}"
            )
    for k in required:
        if k not in d:
            raise SpecError(key_path(path, k), "required key is missing")
    return dict(d)


def as_int(value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(path, f"expected an integer, got {type_name(value)} {value!r}")
    check_range(value, path, lo, hi)
    return value


def as_float(
    value: Any, path: str, lo: float | None = None, hi: float | None = None, hi_open: bool = False
) -> float:
    """A finite float. Ints are accepted, and so are strings like ``1e-3`` (YAML 1.1 reads those as strings)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SpecError(path, f"expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SpecError(path, f"expected a number, got {type_name(value)} {value!r}")
    value = float(value)
    check_range(value, path, lo, hi, open_hi=hi_open)
    return value


def as_choice(value: Any, path: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise not_one_of(path, value, allowed)
    return value


def check_option(mixer: str, name: Any, value: Any, path: str) -> Any:
    """One mixer option, type-checked against the block's declared default. Returns the normalised value."""
    defaults = MIXERS[mixer].options
    if name not in defaults:
        allowed = ", ".join(defaults) or "none"
        raise SpecError(
            path,
            f"unknown option for mixer {mixer!r}; allowed: {allowed}{did_you_mean(name, list(defaults))}",
        )
    default = defaults[name]
    lo = 1 if name in POSITIVE_OPTIONS else 0
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SpecError(path, f"expected a boolean (true/false), got {type_name(value)} {value!r}")
        return value
    if isinstance(default, int):
        return as_int(value, path, lo, MAX_OPTION_INT)
    if isinstance(default, float):
        return as_float(value, path)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SpecError(path, f"expected a string, got {type_name(value)} {value!r}")
        return value
    if default is None:  # e.g. shift=None (window // 2), span=None (whole axis): null or an integer
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return as_int(value, path, lo, MAX_OPTION_INT)
        raise SpecError(path, f"expected an integer or null, got {type_name(value)} {value!r}")
    if not isinstance(value, type(default)):
        raise SpecError(path, f"expected {type(default).__name__}, got {type_name(value)} {value!r}")
    return value


@functools.lru_cache(maxsize=4096)
def _probe(mixer: str, dim: int, items: tuple[tuple[str, Any], ...]) -> str | None:
    """Construct the mixer once to learn whether the blocks accept these options; the block's message or None.

    Blocks validate their own arguments (ValueError naming the argument); asking them keeps this file from
    re-encoding rules such as "axial needs an even head dimension". Narrow layers are built on the CPU (about a
    millisecond); wide ones on the meta device so that they cost no memory, falling back to the CPU for init
    code that does not run on meta tensors.
    """
    import torch

    from hybridnas.blocks import build_mixer

    # Building initialises weights: keep the global RNG untouched, or the first build_model() after
    # torch.manual_seed() would differ from the next (cached) one.
    with torch.random.fork_rng(devices=[]):
        if dim > META_ABOVE:
            try:
                with torch.device("meta"):
                    build_mixer(mixer, dim, **dict(items))
                return None
            except ValueError as e:
                return str(e)
            except Exception:  # init code that does not run on meta tensors: the CPU decides below
                pass
        try:
            build_mixer(mixer, dim, **dict(items))
        except ValueError as e:
            return str(e)
    return None


def mixer_error(mixer: str, dim: int, options: Mapping[str, Any]) -> str | None:
    """Why `mixer` cannot be built with `dim` channels and these options, or None when it can."""
    return _probe(mixer, dim, tuple(sorted(options.items(), key=lambda kv: kv[0])))


def check_heads(mixer: str, channels: int, options: Mapping[str, Any], stage_path: str) -> None:
    """The common mistake first, with a helpful message: heads must divide the width."""
    if "heads" not in MIXERS[mixer].options:
        return
    heads = options.get("heads", MIXERS[mixer].options["heads"])
    if isinstance(heads, int) and heads >= 1 and channels % heads:
        divisors = [h for h in range(1, min(channels, 64) + 1) if channels % h == 0]
        if "heads" in options:
            where, note = key_path(stage_path, "options.heads"), ""
        else:
            where, note = key_path(stage_path, "channels"), f" (the {mixer} default)"
        raise SpecError(
            where,
            f"channels {channels} is not divisible by heads {heads}{note}; "
            f"heads that divide {channels}: {', '.join(map(str, divisors))}",
        )


def downsampled(side: int) -> int:
    """Map side after one downsampling (ceil, as every downsampler pads odd sizes)."""
    return (side + 1) // 2
