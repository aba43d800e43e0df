"""The example experiment, architecture and ablation files shipped with hybridnas (`hybridnas examples`)."""
