"""What the planner tests share: a tiny MLP and a private time-table cache per test."""

import pytest
import torch
from torch import nn


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The planner's time tables go to an empty folder of this test (shadows pytest's own ``cache``
    fixture in the modules that import it)."""
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
