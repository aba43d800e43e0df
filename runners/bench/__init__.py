"""`hybridnas bench ...`: benchmarks that print ratios measured side by side in one run."""

from pathlib import Path

from hybridnas.search_space.errors import SpecError

QUICKSTART = Path("experiments") / "quickstart.yaml"


def quickstart_path(hint: str) -> Path:
    """The quickstart experiment: ./experiments/quickstart.yaml from the repository root, else the
    copy installed with the package; a `SpecError` ending in ``hint`` when neither exists."""
    if QUICKSTART.is_file():
        return QUICKSTART
    packaged = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"  # installed copy
    if packaged.is_file():
        return packaged
    raise SpecError(str(QUICKSTART), f"file not found; {hint}")
