"""The shipped demo: the seeded synthetic corpus and the small CLIP trained on it."""
