"""Thin Ray adapters: Ray Data (ingest, window shards), Ray Train, Ray Tune."""
