"""Training and evaluation: exit heads, the ConvNeXt-IC complexity scorer, multi-process training and the metrics they report."""
