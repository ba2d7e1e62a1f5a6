"""Workflows: the stages wired end to end, shared by the `lvm` CLI, jobs/ and the demo.

prepare (ingest -> bank -> windows) -> train (Ray Train or the plain loop) -> evaluate (test vs
baselines, reports) ; sweep (Ray Tune + tables) ; ablate (one trained row per change) ; demo.
"""
