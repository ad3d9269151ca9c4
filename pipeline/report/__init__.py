"""The cost report: audit of a run directory, text and HTML renderings."""
