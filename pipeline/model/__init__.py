"""The model side: CLIP loading, the early-exit encoder, token merging, GFLOP counting, the complexity scorer, the router and the per-actor worker that ties them together. Plain torch, no Ray."""
