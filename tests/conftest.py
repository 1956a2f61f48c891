import os

import pytest

# Tests never reach the hub and never start an online wandb run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A CUDA illegal memory access (a kernel bug) ruins the process's CUDA context: every later GPU test would fail with
# the same error and hide whether it works. Say so once and skip them instead; run them again in a new process.
_CUDA_LOST: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.excinfo is not None and "gpu" in item.keywords and "illegal memory access" in str(call.excinfo.value):
        _CUDA_LOST.append(item.nodeid)
    return report


def pytest_runtest_setup(item):
    if _CUDA_LOST and "gpu" in item.keywords:
        pytest.skip(f"CUDA context lost in {_CUDA_LOST[0]} (illegal memory access); run this test in a new process")
