"""The Hugging Face hub when it cannot be reached (an air-gapped cluster node, a machine without network).

    offline_unless_reachable()   # before the first hub id is looked up

transformers and datasets retry each file they look for on the hub, about 50 s apiece, before they look in the
local cache. flame tries the hub once (a TCP connection, 3 s at most); when it cannot be reached, it sets
HF_HUB_OFFLINE=1 for this process and says so, and the cache answers at once: what it holds loads, what it lacks is
one error line. With a proxy set, flame cannot tell, and leaves the hub client to find out.
"""

import os
import socket
import sys
from urllib.parse import urlparse

PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_offline: bool | None = None  # this process's answer, once asked


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Whether this process works offline: it was told to, or the hub cannot be reached (then it goes offline)."""
    global _offline
    if is_offline():
        return True
    if _offline is None:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        _offline = False
        if url.hostname and not any(os.environ.get(name) for name in PROXIES):
            try:
                port = url.port or (80 if url.scheme == "http" else 443)
                socket.create_connection((url.hostname, port), timeout=timeout).close()
            except OSError as e:
                from flame import ui

                go_offline()
                _offline = True
                ui.warn(
                    f"the Hugging Face hub ({url.hostname}) cannot be reached ({e.strerror or e}): working offline "
                    "from the local cache (HF_HUB_OFFLINE=1)"
                )
    return _offline


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for this process, also where huggingface_hub and datasets already read it at import."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for name in ("huggingface_hub.constants", "datasets.config"):
        if (module := sys.modules.get(name)) is not None:
            module.HF_HUB_OFFLINE = True
