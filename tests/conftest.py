"""Shared fixtures, and the `slow` marker honoured.

`pytest` alone is the quick local loop: tests marked `slow` are skipped. `pytest --slow` runs them too, as
`scripts/test.sh` (and so CI) does. Model fixtures are built fresh for each test, in eval mode, so no test sees
running statistics or weights another test moved, whatever the order."""
import pytest
import torch
from unifuse.config import UniFuseConfig
from unifuse.model import UniFuse


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (scripts/test.sh and CI do)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"): return
    skip = pytest.mark.skip(reason="slow: run with --slow (scripts/test.sh does)")
    for item in items:
        if "slow" in item.keywords: item.add_marker(skip)


@pytest.fixture
def tiny():
    "A fresh tiny UniFuse, seed 0, in eval mode."
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.tiny()).eval()


@pytest.fixture
def tiny_cfg():
    "The tiny preset's config."
    return UniFuseConfig.tiny()
