"""Test and benchmark harness: load generation, malformed inputs, fault scenarios, real Ray
clusters started by pid. Shared by tests/ and bench/ (which never import each other); not part of
the lvm_ray product and not installed with it."""
