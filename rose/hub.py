"""Fail fast without a hub: probe it once instead of letting every library retry for half a minute."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

HUB_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when the Hugging Face hub (or HF_ENDPOINT) accepts a TCP connection and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False
