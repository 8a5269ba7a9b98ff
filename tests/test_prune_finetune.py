"""Fine-tuning with distillation, gradual pruning inside fine-tuning, report()."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert.prune import Gradual, Pruner, finetune, kd_loss, report


def _setup(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 10, generator=g)
    y = teacher(x).argmax(-1).detach()
    return teacher, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 5)
    assert kd_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(a, torch.randn(4, 5)).item() > 0


def test_finetune_with_teacher_moves_student_towards_teacher():
    import copy

    teacher, data = _setup()
    student = copy.deepcopy(teacher)
    Pruner(student, sparsity=0.7).step()
    zeros = student[0].weight.detach() == 0
    x = torch.cat([b[0] for b in data])
    gap0 = kd_loss(student(x), teacher(x)).item()
    finetune(student, data, epochs=5, lr=1e-2, teacher=teacher, alpha=1.0, progress=False)
    gap1 = kd_loss(student(x), teacher(x)).item()
    assert gap1 < gap0
    assert bool((student[0].weight.detach()[zeros] == 0).all())
    assert teacher.training  # teacher's mode restored


def test_finetune_distill_only_on_unlabelled_batches():
    import copy

    teacher, data = _setup()
    student = copy.deepcopy(teacher)
    Pruner(student, sparsity=0.5).step()
    xs = [b[0] for b in data]
    hist = finetune(student, xs, epochs=2, teacher=teacher, distill_fn=F.mse_loss, progress=False)
    assert len(hist) == 2
    with pytest.raises(ValueError, match="no target"):
        finetune(student, xs, epochs=1)


def test_finetune_steps_a_gradual_pruner():
    teacher, data = _setup()
    pruner = Pruner(teacher, sparsity=0.8, schedule=Gradual(begin_step=0, end_step=8, frequency=2))
    finetune(teacher, data, epochs=3, pruner=pruner, progress=False)  # 12 optimizer steps
    assert pruner.done
    assert (teacher[0].weight == 0).float().mean().item() == pytest.approx(0.8, abs=1 / 320)


def test_finetune_restores_mode_and_validates():
    teacher, data = _setup()
    teacher.eval()
    finetune(teacher, data, epochs=1)
    assert not teacher.training
    with pytest.raises(ValueError):
        finetune(teacher, data, epochs=-1)
    with pytest.raises(TypeError):
        finetune(teacher, data, optimizer=3)


def test_report_counts_zeros_params_and_flops():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8))
    with torch.no_grad():
        m[0].weight[:2] = 0  # 2 of 4 filters
        m[2].weight[:, :16] = 0  # a quarter of the linear
    r = report(m)
    rows = {l.name: l for l in r.layers}
    assert rows["0"].params == 72 and rows["0"].nonzero == 36 and rows["0"].sparsity == 0.5
    assert rows["2"].sparsity == 0.25
    assert rows["0"].flops == 2 * 72  # per output position without example input
    assert r.prunable_params == 72 + 512
    assert r.total_params == 72 + 4 + 512 + 8
    r2 = report(m, torch.randn(3, 2, 6, 6))
    rows2 = {l.name: l for l in r2.layers}
    assert rows2["0"].flops == 2 * 72 * 3 * 16  # 3 images x 4x4 output positions
    assert rows2["0"].flops_removed == 72 * 3 * 16
    assert rows2["2"].flops == 2 * 512 * 3
    text = str(r2)
    assert "| **total** |" in text and "0" in text
