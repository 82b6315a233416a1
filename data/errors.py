"""The bottom layer of data/: the error type, path resolution and the hub reachability check. It imports
nothing from the package, so every other module may import it (the layers, bottom up: errors; tokenizer,
megatron, source, loader; inputs, shards, synthetic; prepare, prepared, blend; the package's __init__)."""
from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(ValueError):
    """A data problem the user must fix (missing or inconsistent files, empty corpus, ...): message says how."""


def resolve_path(path: str | Path, must_exist: bool = False) -> Path:
    """A relative path is taken from the working directory, or else from the repository root (so recipes that
    name ../shared/... work from either)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    if alt.exists():
        return alt
    if must_exist:
        raise FileNotFoundError(f"{path} does not exist (looked in {Path.cwd()} and {REPO_ROOT})")
    return p


def hub_unreachable(timeout: float = 5.0) -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached right now, or None. Fast: probes the endpoint with a short
    timeout (the hub clients themselves retry for tens of seconds before giving up)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    m = re.match(r"^(\w+)://([^/:]+)(?::(\d+))?", endpoint)
    host = m.group(2) if m else "huggingface.co"
    port = int(m.group(3)) if m and m.group(3) else (80 if m and m.group(1) == "http" else 443)
    result: list = []

    def probe():  # name resolution has no timeout of its own: run it where we can stop waiting
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    if not result:
        return f"no answer from {host}:{port} within {timeout:.0f} s"
    return result[0]


OFFLINE_HINT = ("this machine has no network access to the Hugging Face Hub. Use a recipe with local files "
                "(configs/shakespeare.yaml), prepare from local files with `python -m data.prepare --input ...`, "
                "or, with the files already in the HF cache, set HF_HUB_OFFLINE=1")


def _offline_flag() -> Optional[str]:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def check_hub(what: str) -> Optional[str]:
    """Fail fast when the hub is unreachable. Returns the offline flag's name when the user asked for cache-only
    access (then the hub clients themselves fail fast)."""
    flag = _offline_flag()
    if flag:
        return flag
    reason = hub_unreachable()
    if reason is not None:
        raise DataError(f"cannot load {what}: {reason}; {OFFLINE_HINT}")
    return None
