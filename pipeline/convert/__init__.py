"""make_shards' stages: inputs found and read (audio, Live Link CSVs, the synthetic corpus),
takes stored, cut into windows, split and written into an output folder or s3://."""
