"""FAISS index directories: parameter choice, build (train, add, merge), nprobe tuning and search."""
