"""From a checkpoint to animation: ``python -m infer`` (Live Link CSVs, npy, reports)."""
