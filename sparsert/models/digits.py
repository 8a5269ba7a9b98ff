"""scikit-learn's digits: an MLP and a small CNN trained to >= 97% test accuracy.

The data ships with scikit-learn (1,797 real 8x8 handwritten digits, no
download). Training is deterministic for a given seed and thread count and
takes a few seconds on 2 CPU cores; results are cached in-process, and every
call returns a fresh copy, so callers may prune it freely.

```python
from sparsert.models import digits
data = digits.load_data()
mlp = digits.train_mlp()            # DigitsMLP, eval mode
digits.accuracy(mlp, data.x_test, data.y_test)   # ~0.98
```
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._threads import torch_single_thread as single_thread

__all__ = [
    "DigitsData",
    "DigitsMLP",
    "DigitsCNN",
    "load_data",
    "batches",
    "accuracy",
    "train",
    "train_mlp",
    "train_cnn",
    "single_thread",
]


@dataclass(frozen=True)
class DigitsData:
    """Images ``(N, 1, 8, 8)`` float32 in [0, 1]; labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=4)
def _load(test_size: float, seed: int) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return DigitsData(x[tr], y[tr], x[te], y[te])


def load_data(test_size: float = 0.25, seed: int = 0) -> DigitsData:
    """Stratified train/test split of the digits (default 1,347 / 450)."""
    return _load(float(test_size), int(seed))


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of ``(x, y)`` batches (deterministic order for a given seed)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(y), batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    try:
        return (model(x).argmax(-1) == y).float().mean().item()
    finally:
        model.train(was)


class DigitsMLP(nn.Module):
    """64 → 256 → 128 → 10, ReLU. Layers: ``fc1``, ``fc2``, ``classifier``."""

    def __init__(self, hidden: tuple[int, int] = (256, 128)):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.classifier = nn.Linear(hidden[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.classifier(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """conv 1→32 → conv 32→64 → maxpool → fc 1024→128 → classifier 128→10.

    Layers: ``conv1``, ``conv2``, ``fc``, ``classifier``.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))


def train(
    model: nn.Module,
    data: DigitsData,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Adam + cross-entropy, cosine LR decay; deterministic for a given seed.

    Runs single-threaded: these models are far too small to gain from threads,
    and on a busy 2-core machine torch's thread pool makes them ~50x slower.
    """
    with single_thread():
        return _train(model, data, epochs, lr, batch_size, seed)


def _train(model, data, epochs, lr, batch_size, seed):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    model.train()
    for epoch in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


@functools.lru_cache(maxsize=8)
def _trained(kind: str, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsMLP() if kind == "mlp" else DigitsCNN()
    return train(model, load_data(), epochs, seed=seed)


def train_mlp(seed: int = 0, epochs: int = 60) -> DigitsMLP:
    """A trained :class:`DigitsMLP` (fresh copy of an in-process cached model)."""
    return copy.deepcopy(_trained("mlp", int(seed), int(epochs)))


def train_cnn(seed: int = 0, epochs: int = 20) -> DigitsCNN:
    """A trained :class:`DigitsCNN` (fresh copy of an in-process cached model)."""
    return copy.deepcopy(_trained("cnn", int(seed), int(epochs)))
