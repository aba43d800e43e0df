"""Everything that runs: data, training, measuring, search, ablation, export and the CLI."""

__version__ = "0.1.0"
