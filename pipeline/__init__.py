"""ICAR: complexity-aware early-exit CLIP embedding and FAISS indexing for image corpora."""

__version__ = "0.1.0"
