"""Recovery: gradual pruning + distillation, LR schedule, checkpoints, resumption, time budget."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsert.prune import Gradual, Pruner
from sparsert.prune.recover import distill_loss, recover, warmup_cosine


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    return [torch.randn(32, 6, generator=g) @ mix + 0.1 * torch.randn(32, 16, generator=g) for _ in range(n)]


def _error(model, teacher, data):
    with torch.no_grad():
        num = sum(float((model(x) - teacher(x)).pow(2).sum()) for x in data)
        den = sum(float(teacher(x).pow(2).sum()) for x in data)
    return (num / den) ** 0.5


def _gradual(student, calib, sparsity=0.8, end=60):
    return Pruner(student, importance="wanda", sparsity=sparsity, progress=False,
                  schedule=Gradual(begin_step=0, end_step=end, frequency=10)).calibrate(calib)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_recovery_beats_one_shot_at_the_same_sparsity():
    teacher = _teacher()
    train, test = _data(8, 1), _data(4, 2)
    one_shot = copy.deepcopy(teacher)
    Pruner(one_shot, importance="wanda", sparsity=0.8, progress=False).calibrate(train).step()
    student = copy.deepcopy(teacher)
    result = recover(student, teacher, train, steps=120, pruner=_gradual(student, train), lr=3e-3, progress=False)
    assert result.done and result.step == 120
    for name in ("0", "2", "4"):
        assert (student.get_submodule(name).weight == 0).float().mean().item() == pytest.approx(0.8, abs=0.02)
    e_one, e_rec = _error(one_shot, teacher, test), _error(student, teacher, test)
    assert e_rec < 0.6 * e_one, (e_rec, e_one)  # on held-out inputs
    assert sum(result.losses[-10:]) < sum(result.losses[60:70])  # still improving after the last prune


def test_resumption_continues_exactly_where_it_stopped(tmp_path):
    teacher = _teacher()
    train = _data(5, 3)
    ckpt = tmp_path / "run.pt"

    full = copy.deepcopy(teacher)
    recover(full, teacher, train, steps=40, pruner=_gradual(full, train, end=20), lr=2e-3, progress=False)

    part = copy.deepcopy(teacher)
    first = recover(part, teacher, train, steps=40, pruner=_gradual(part, train, end=20), lr=2e-3,
                    checkpoint=ckpt, checkpoint_every=7, stop_after=13, progress=False)
    assert not first.done and first.step == 13 and ckpt.is_file()

    fresh = copy.deepcopy(teacher)  # a new process: fresh model and pruner, same checkpoint
    second = recover(fresh, teacher, train, steps=40, pruner=_gradual(fresh, train, end=20), lr=2e-3,
                     checkpoint=ckpt, checkpoint_every=7, progress=False)
    assert second.done and second.resumed_from == 13 and len(second.losses) == 40
    for (n, a), (_, b) in zip(full.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="40-step"):
        recover(copy.deepcopy(teacher), teacher, train, steps=50, checkpoint=ckpt, progress=False)


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    ckpt = tmp_path / "budget.pt"
    result = recover(student, teacher, _data(3, 4), steps=10_000, time_budget=0.3, checkpoint=ckpt, progress=False)
    assert not result.done and 0 < result.step < 10_000 and ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == result.step


def test_distill_loss_uses_logits_and_hidden_states():
    s = {"logits": torch.randn(2, 3, 5), "hidden_states": (torch.randn(2, 3, 4), torch.randn(2, 3, 4))}
    t = {"logits": s["logits"].clone(), "hidden_states": (torch.randn(2, 3, 4), s["hidden_states"][1].clone())}
    assert float(distill_loss(s, t)) == pytest.approx(0.0, abs=1e-6)  # [0] (embeddings) is ignored
    t2 = {"logits": torch.randn(2, 3, 5), "hidden_states": t["hidden_states"]}
    assert float(distill_loss(s, t2, hidden_weight=0.0)) > 0
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    t3 = {"logits": s["logits"].clone(), "hidden_states": (s["hidden_states"][0], s["hidden_states"][1].clone())}
    t3["logits"][0, 2] += 10  # a padding token: ignored
    assert float(distill_loss(s, t3, {"attention_mask": mask})) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        distill_loss(s, t, logit_weight=0.0, hidden_weight=0.0)


def test_embedding_loss_is_one_minus_cosine_of_the_mean_over_real_tokens():
    h = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t = h.clone()
    t[0, 3] += 100.0  # padding: ignored
    t[1, 2:] -= 50.0
    kw = dict(hidden_weight=0.0, logit_weight=0.0, embedding_weight=1.0)
    assert float(distill_loss({"last_hidden_state": h}, {"last_hidden_state": t}, {"attention_mask": mask},
                              **kw)) == pytest.approx(0.0, abs=1e-6)
    s = h.clone()
    s[1, :2] = -s[1, :2]  # the second sentence's embedding reversed: cosine -1, loss 2 for it
    got = float(distill_loss({"last_hidden_state": s}, {"last_hidden_state": h}, {"attention_mask": mask}, **kw))
    assert got == pytest.approx(1.0, abs=1e-5)  # mean of 0 and 2
    # scale does not matter to a cosine, it does to the hidden-state MSE
    assert float(distill_loss({"last_hidden_state": 3 * h}, {"last_hidden_state": h}, {"attention_mask": mask},
                              **kw)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(3 * h, h, {"attention_mask": mask}, embedding_weight=1.0)) > 1.0


def _fixed_mask_student(teacher, data, sparsity=0.8):
    student = copy.deepcopy(teacher)
    Pruner(student, importance="wanda", sparsity=sparsity, progress=False).calibrate(data).step()
    return student


def test_fixed_masks_are_kept_exactly_and_only_the_pruned_layers_train():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    train = _data(6, 7)
    student = _fixed_mask_student(teacher, train)
    zeros = {n: (student.get_submodule(n).weight == 0).clone() for n in ("0", "2")}
    norm = {k: v.clone() for k, v in student[1].state_dict().items()}
    before = _error(student, teacher, train)
    result = recover(student, teacher, train, steps=60, lr=3e-3, train="pruned", dropout=False,
                     embedding_weight=1.0, progress=False)
    assert result.done
    for n, z in zeros.items():  # the same weights are zero, no more, no fewer
        assert torch.equal(student.get_submodule(n).weight == 0, z), n
    for k, v in student[1].state_dict().items():  # the LayerNorm is not a pruned layer: untouched
        assert torch.equal(v, norm[k]), k
    assert all(p.requires_grad for p in student.parameters())  # frozen only during the run
    assert _error(student, teacher, train) < 0.7 * before
    with pytest.raises(ValueError, match="train"):
        recover(copy.deepcopy(teacher), teacher, train, steps=1, train="some", progress=False)


def test_dropout_off_trains_the_student_as_it_runs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 8))
    data = _data(2, 8)
    # an unpruned copy of the teacher: without dropout it matches exactly, the loss is 0 and nothing moves
    same = copy.deepcopy(teacher)
    r = recover(same, teacher, data, steps=3, lr=1e-2, dropout=False, progress=False)
    assert max(r.losses) == pytest.approx(0.0, abs=1e-10)
    assert same.training  # the mode the caller left is restored
    noisy = copy.deepcopy(teacher)
    r = recover(noisy, teacher, data, steps=3, lr=1e-2, progress=False)  # default: dropout on
    assert min(r.losses) > 0.01
