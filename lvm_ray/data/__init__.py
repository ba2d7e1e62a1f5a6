"""Data: corpus sources -> chunks -> embeddings -> the Parquet concept bank, splits and windows.

Submodules are imported directly (`from lvm_ray.data.ingest import ingest`); nothing heavy
(sentence-transformers, torch) loads at package import.
"""
