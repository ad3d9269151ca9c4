"""The embed job's wiring onto Ray: configuration, the driver loop, shard tasks and model actors."""
