"""Everything that runs: data, training, measuring, search, ablation, export and the CLI."""

from hybridnas import __version__

__all__ = ["__version__"]
