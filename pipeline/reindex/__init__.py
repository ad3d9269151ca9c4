"""Scheduled incremental reindex: the YAML job config and the versioned embed + index run."""
