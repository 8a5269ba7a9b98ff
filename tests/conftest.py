import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_workload():
    """``models.build("smollm2")`` (which calls ``smollm2.load()``), loaded once for the
    session: the real model is the slowest thing the suite loads. Tests that change its
    weights put them back."""
    from sparsert import models
    from sparsert.models import smollm2

    if not smollm2.available():
        pytest.skip(smollm2.unavailable_reason() or "SmolLM2 is not installed")
    return models.build("smollm2")
