"""flame.hub: without a reachable hub, flame goes offline at once instead of the hub client's retries."""

import socket
import sys
import time

import pytest

from flame import hub
from flame.data.tokenizer import load_tokenizer
from flame.errors import DataError


@pytest.fixture
def online(monkeypatch):
    """As on a machine where nobody set HF_HUB_OFFLINE (the tests run offline); restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_offline", None)
    for name in hub.PROXIES:
        monkeypatch.delenv(name, raising=False)
    tried = []

    def unreachable(address, timeout=None):
        tried.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    return tried


def test_an_unreachable_hub_means_offline_at_once(online, capsys):
    import datasets.config
    import huggingface_hub.constants

    started = time.perf_counter()
    with pytest.raises(DataError, match="cannot load tokenizer 'nobody/no-such-tokenizer'"):
        load_tokenizer("nobody/no-such-tokenizer")
    assert time.perf_counter() - started < 20  # the hub client's retries alone took 49 s here
    assert online == [(("huggingface.co", 443), 3.0)]
    assert hub.is_offline() and huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: the Hugging Face hub (huggingface.co) cannot be reached (Name or service not known): working " \
        "offline from the local cache (HF_HUB_OFFLINE=1)" in err  # fmt: skip
    with pytest.raises(DataError):
        load_tokenizer("nobody/no-such-tokenizer")
    assert len(online) == 1  # asked once a process


def test_a_proxy_or_a_set_endpoint_is_respected(online, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.offline_unless_reachable() is False and online == [] and not hub.is_offline()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(hub, "_offline", None)
    for endpoint, address in [
        ("https://hf-mirror.example.org:8443", ("hf-mirror.example.org", 8443)),
        ("http://mirror.local", ("mirror.local", 80)),  # a plain-http mirror on its own port, not 443
        ("hf-mirror.com", ("hf-mirror.com", 443)),
    ]:
        monkeypatch.setattr(hub, "_offline", None)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the last round went offline
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert hub.offline_unless_reachable() is True
        assert online[-1] == (address, 3.0)


def test_a_reachable_hub_changes_nothing(online, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: socket.socket())
    assert hub.offline_unless_reachable() is False and not hub.is_offline()
    assert "HF_HUB_OFFLINE" not in sys.modules["os"].environ
