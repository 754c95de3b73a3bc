import os
import random

import pytest
import torch

# "auto" times afresh in every test (tests of the timing expect it to run); a test that checks the
# tuning cache names one. Subprocesses inherit this.
os.environ["IMAML_TUNING_CACHE"] = "none"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and the CUDA kernels")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs each run; the seed is printed (shown on failure) and
    IMAML_TEST_SEED replays it."""
    seed = int(os.environ.get("IMAML_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"IMAML_TEST_SEED={seed}")
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture
def scratch_registry(monkeypatch):
    """Forwards and stacked conv2d rules registered in a test (or a docs snippet it runs) are gone
    after it: the registries are process-wide, and a later test's expected name lists are the built-ins'."""
    from imaml_ext.batched import forwards, stacked

    monkeypatch.setattr(forwards, "_REGISTRY", dict(forwards._REGISTRY))
    monkeypatch.setattr(stacked, "_RULES", dict(stacked._RULES))
