"""Pruned weights stay exactly zero through optimizers, state_dict, copies."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert.prune import (
    Pruner, apply_masks, finetune, get_mask, masked_modules, masks_from_zeros, remove_masks,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _zeros(model):
    return {n: (m.weight.detach() == 0).clone() for n, m in model.named_modules() if hasattr(m, "weight")}


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw_decay": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zeros_survive_optimizer_created_before_pruning(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    data = _data()
    for x, y in data:  # build up momentum / Adam state on the dense model
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    Pruner(model, sparsity=0.7, pattern="4x1").step()
    zeros = _zeros(model)
    for _ in range(3):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for n, m in masked_modules(model).items():
        w = m.weight.detach()
        assert bool((w[zeros[n]] == 0).all()), f"{n}: pruned weights moved under {name}"
        assert bool((w[~zeros[n]] != 0).any()), f"{n}: the kept weights should still train"


def test_finetune_keeps_zeros_and_trains():
    model = _model()
    Pruner(model, sparsity=0.8).step()
    zeros = _zeros(model)
    before = model[3].weight.detach().clone()
    hist = finetune(model, _data(), epochs=2, optimizer=torch.optim.AdamW, progress=False)
    assert len(hist) == 2 and all(h > 0 for h in hist)
    for n in ("0", "3"):
        w = dict(model.named_modules())[n].weight.detach()
        assert bool((w[zeros[n]] == 0).all())
    assert not torch.equal(model[3].weight.detach(), before)


def test_state_dict_has_no_mask_doubling_and_round_trips():
    model = _model()
    Pruner(model, sparsity=0.6).step()
    sd = model.state_dict()
    assert set(sd) == set(_model().state_dict())  # no weight_orig / weight_mask / sparsert_mask
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = _model(seed=1)
    fresh.load_state_dict(torch.load(buf))
    for n, z in _zeros(model).items():
        assert torch.equal(_zeros(fresh)[n], z)
    got = masks_from_zeros(fresh)
    assert set(got) == {"0", "3"} and got["3"] == pytest.approx(0.6)
    zeros = _zeros(fresh)
    finetune(fresh, _data(), epochs=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
    assert bool((fresh[3].weight.detach()[zeros["3"]] == 0).all())


def test_load_state_dict_into_masked_model_keeps_masks():
    model = _model()
    Pruner(model, sparsity=0.5).step()
    sd = copy.deepcopy(model.state_dict())
    model.load_state_dict(sd)
    assert get_mask(model[3]) is not None


def test_deepcopy_keeps_masks_and_stays_protected():
    model = _model()
    Pruner(model, sparsity=0.5).step()
    clone = copy.deepcopy(model)
    assert get_mask(clone[3]) is not None
    zeros = _zeros(clone)
    opt = torch.optim.Adam(clone.parameters(), lr=0.05)
    for x, y in _data():
        opt.zero_grad()
        F.cross_entropy(clone(x), y).backward()
        opt.step()
    assert bool((clone[3].weight.detach()[zeros["3"]] == 0).all())


def test_two_forwards_before_backward_are_fine():
    model = _model()
    Pruner(model, sparsity=0.5).step()
    x, y = _data(1)[0]
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x * 2), y)
    loss.backward()  # a hook that modified weights in forward would break this
    assert model[3].weight.grad is not None


def test_remove_masks_keeps_zeros_and_drops_bookkeeping():
    model = _model()
    Pruner(model, sparsity=0.5).step()
    zeros = _zeros(model)
    remove_masks(model)
    assert masked_modules(model) == {}
    assert not any(b for b in dict(model.named_buffers()))
    assert len(model[3]._forward_pre_hooks) == 0
    assert torch.equal(_zeros(model)["3"], zeros["3"])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = _data(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not bool((model[3].weight.detach()[zeros["3"]] == 0).all())  # nothing protects them now


def test_apply_masks_restores_after_manual_edit():
    model = _model()
    Pruner(model, sparsity=0.5).step()
    zeros = _zeros(model)
    with torch.no_grad():
        model[3].weight.add_(1.0)
    apply_masks(model)
    assert bool((model[3].weight.detach()[zeros["3"]] == 0).all())
