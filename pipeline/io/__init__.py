"""Storage and data formats: fsspec storage, input readers, safe decoding, the shard schema, run-directory files and the output lock. The bottom layer: imports nothing else of pipeline."""
