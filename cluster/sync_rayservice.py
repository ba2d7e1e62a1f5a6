"""Copy serve_configs/hybrid.yaml, verbatim, into the serveConfigV2 string of
cluster/kuberay/rayservice.yaml (KubeRay takes the Serve config as one YAML string).

    python cluster/sync_rayservice.py           # rewrite rayservice.yaml's serveConfigV2
    python cluster/sync_rayservice.py --check   # exit 1 if the two have drifted apart

Only the serveConfigV2 block is rewritten; the rest of the manifest, comments included, is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve_configs" / "hybrid.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
KEY = re.compile(r"^(?P<indent> *)serveConfigV2:")


def render_scalar(content: str, indent: int) -> list[str]:
    """`content` as a YAML block scalar (lines after the key get `indent` spaces)."""
    if not content:
        return ['""']
    if content.endswith("\n\n"):
        chomp = "+"  # keep every trailing newline
    elif content.endswith("\n"):
        chomp = ""
    else:
        chomp = "-"
    first = next((line for line in content.split("\n") if line.strip()), "")
    # An explicit indentation indicator when the text itself starts with spaces.
    header = "|" + ("2" if first.startswith(" ") else "") + chomp
    body = content[:-1] if content.endswith("\n") else content
    pad = " " * indent
    return [header] + [pad + line if line else "" for line in body.split("\n")]


def replace_block(manifest: str, content: str) -> str:
    lines = manifest.split("\n")
    start = next((i for i, line in enumerate(lines) if KEY.match(line)), None)
    if start is None:
        raise SystemExit(f"{RAYSERVICE}: no serveConfigV2 key")
    key_indent = len(KEY.match(lines[start]).group("indent"))
    end = start + 1
    # The old value: every following line that is blank or indented deeper than the key.
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip(" ")) > key_indent):
        end += 1
    old_header = lines[start][KEY.match(lines[start]).end():].strip()
    if not (old_header.startswith("|") and "+" in old_header):
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # blank lines before the next key are not part of a clipped value
    scalar = render_scalar(content, key_indent + 2)
    new_lines = lines[:start] + [f"{' ' * key_indent}serveConfigV2: {scalar[0]}"] + scalar[1:]
    out = "\n".join(new_lines + lines[end:])
    if _serve_config(out) != content:
        # Text a block scalar cannot hold (e.g. carriage returns): a double-quoted string.
        quoted = json.dumps(content)
        out = "\n".join(lines[:start] + [f"{' ' * key_indent}serveConfigV2: {quoted}"]
                        + lines[end:])
    if _serve_config(out) != content or _rest(out) != _rest(manifest):
        raise SystemExit("could not rewrite serveConfigV2 faithfully; edit it by hand")
    return out


def _serve_config(manifest: str) -> str | None:
    return (yaml.safe_load(manifest).get("spec") or {}).get("serveConfigV2")


def _rest(manifest: str) -> dict:
    doc = yaml.safe_load(manifest)
    doc.get("spec", {}).pop("serveConfigV2", None)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    content = SERVE_CONFIG.read_text()
    manifest = RAYSERVICE.read_text()
    if _serve_config(manifest) == content:
        print(f"{RAYSERVICE.relative_to(ROOT)} matches {SERVE_CONFIG.relative_to(ROOT)}")
        return 0
    if args.check:
        print(f"{RAYSERVICE.relative_to(ROOT)}: serveConfigV2 differs from "
              f"{SERVE_CONFIG.relative_to(ROOT)}; run python cluster/sync_rayservice.py",
              file=sys.stderr)
        return 1
    RAYSERVICE.write_text(replace_block(manifest, content))
    print(f"updated {RAYSERVICE.relative_to(ROOT)} from {SERVE_CONFIG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
