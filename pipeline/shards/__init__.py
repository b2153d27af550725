"""The shard format: manifest, members, tars, where a dataset lies (storage), the verifier and
the sample index the loaders read from."""
