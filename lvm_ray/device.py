"""Where tensors live: "auto" means the GPU when one is present, else the CPU."""

from __future__ import annotations


def resolve_device(name: str = "auto") -> str:
    """"auto" -> "cuda" or "cpu"; any other name is returned as given ("cpu", "cuda:1", ...)."""
    if name != "auto":
        return name
    import torch  # lazy: config-level code must not pay for torch at import

    return "cuda" if torch.cuda.is_available() else "cpu"
