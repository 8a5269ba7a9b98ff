"""Each importance criterion against a hand computation on tiny layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert.prune import CRITERIA, Hessian, get_criterion


def _tiny():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-0.25, 3.0, -1.0]]))
    return lin


def _xy():
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])
    y = torch.tensor([0, 1])
    return x, y


def _grad_by_hand(lin, x, y):
    w = lin.weight.detach().clone().requires_grad_(True)
    F.cross_entropy(x @ w.t(), y).backward()
    return w.grad


def test_magnitude_is_abs_w():
    lin = _tiny()
    s = get_criterion("magnitude").scores(lin, {"l": lin})["l"]
    assert torch.equal(s, lin.weight.detach().abs())


def test_taylor_equals_abs_w_times_grad():
    lin = _tiny()
    x, y = _xy()
    g = _grad_by_hand(lin, x, y)
    s = get_criterion("taylor").scores(lin, {"l": lin}, [(x, y)])["l"]
    torch.testing.assert_close(s, (lin.weight.detach() * g).abs())


def test_taylor_averages_over_batches():
    lin = _tiny()
    x, y = _xy()
    g1 = _grad_by_hand(lin, x[:1], y[:1])
    g2 = _grad_by_hand(lin, x[1:], y[1:])
    s = get_criterion("taylor").scores(lin, {"l": lin}, [(x[:1], y[:1]), (x[1:], y[1:])])["l"]
    w = lin.weight.detach()
    torch.testing.assert_close(s, ((w * g1).abs() + (w * g2).abs()) / 2)


def test_gradient_without_labels_is_dy_dw():
    # y = W x summed over outputs and batch: dy/dW_ij = sum_b x_bj for every row i
    lin = _tiny()
    x, _ = _xy()
    s = get_criterion("gradient").scores(lin, {"l": lin}, [x])["l"]
    expected = x.sum(0).abs().expand(2, 3)
    torch.testing.assert_close(s, expected)


def test_gradient_with_labels_uses_loss():
    lin = _tiny()
    x, y = _xy()
    s = get_criterion("gradient").scores(lin, {"l": lin}, [(x, y)])["l"]
    torch.testing.assert_close(s, _grad_by_hand(lin, x, y).abs())


def test_fisher_is_half_mean_sq_grad_times_w_sq():
    lin = _tiny()
    x, y = _xy()
    g1 = _grad_by_hand(lin, x[:1], y[:1])
    g2 = _grad_by_hand(lin, x[1:], y[1:])
    s = get_criterion("fisher").scores(lin, {"l": lin}, [(x[:1], y[:1]), (x[1:], y[1:])])["l"]
    w = lin.weight.detach()
    torch.testing.assert_close(s, 0.5 * (g1**2 + g2**2) / 2 * w**2)


def test_hessian_hutchinson_is_exact_for_diagonal_quadratic():
    # L = 0.5 * ||W x||^2 with a single one-hot-free input: the Hessian wrt W_ij
    # is block diagonal with H = x x^T per row, so for x = e_k scaled the
    # Hessian is diagonal and Hutchinson (z*Hz with z in {-1,1}) is exact.
    lin = _tiny()
    x = torch.tensor([[0.0, 2.0, 0.0]])
    crit = Hessian(estimator="hutchinson", samples=1)
    s = crit.scores(lin, {"l": lin}, [x])["l"]  # default objective 0.5*||y||^2
    h = torch.tensor([0.0, 4.0, 0.0]).expand(2, 3)  # d2L/dW_ij^2 = x_j^2
    torch.testing.assert_close(s, 0.5 * h * lin.weight.detach() ** 2)


def test_hessian_hutchinson_unbiased_on_general_input():
    lin = _tiny()
    x = torch.tensor([[1.0, 2.0, -1.0]])
    crit = Hessian(estimator="hutchinson", samples=4000, seed=1)
    s = crit.scores(lin, {"l": lin}, [x])["l"]
    diag = (x**2).expand(2, 3)
    torch.testing.assert_close(s, 0.5 * diag * lin.weight.detach() ** 2, rtol=0.1, atol=0.05)


def test_hessian_sqgrad_matches_fisher():
    lin = _tiny()
    x, y = _xy()
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    s = Hessian(estimator="sqgrad").scores(lin, {"l": lin}, data)["l"]
    f = get_criterion("fisher").scores(lin, {"l": lin}, data)["l"]
    torch.testing.assert_close(s, f)


def test_hessian_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        Hessian(estimator="exact")


def test_wanda_is_abs_w_times_input_column_norm():
    lin = _tiny()
    x, _ = _xy()
    s = get_criterion("wanda").scores(lin, {"l": lin}, [x[:1], x[1:]])["l"]
    norms = x.pow(2).sum(0).sqrt()
    torch.testing.assert_close(s, lin.weight.detach().abs() * norms)


def test_wanda_conv_uses_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2, bias=False)
    x = torch.randn(4, 2, 3, 3)
    s = get_criterion("wanda").scores(conv, {"c": conv}, [x])["c"]
    cols = F.unfold(x, 2)  # (4, 2*2*2, 4)
    norms = cols.pow(2).sum((0, 2)).sqrt()
    expected = conv.weight.detach().reshape(3, -1).abs() * norms
    torch.testing.assert_close(s.reshape(3, -1), expected)


@pytest.mark.parametrize("mode", ["mean", "apoz"])
def test_activation_unit_scores(mode):
    lin = _tiny()
    x, _ = _xy()
    out = x @ lin.weight.detach().t()
    a = out.abs().mean(0) if mode == "mean" else (out > 0).float().mean(0)
    crit = get_criterion("activation", mode=mode, weighted=False)
    s = crit.scores(lin, {"l": lin}, [x])["l"]
    torch.testing.assert_close(s, a[:, None].expand(2, 3))
    sw = get_criterion("activation", mode=mode).scores(lin, {"l": lin}, [x])["l"]
    torch.testing.assert_close(sw, a[:, None] * lin.weight.detach().abs())


def test_activation_conv_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    x = torch.randn(3, 1, 5, 5)
    out = conv(x).detach()
    s = get_criterion("activation", weighted=False).scores(conv, {"c": conv}, [x])["c"]
    torch.testing.assert_close(s[:, 0, 0, 0], out.abs().mean((0, 2, 3)))


@pytest.mark.parametrize("name", sorted(n for n, c in CRITERIA.items() if c.needs_data))
def test_data_criteria_leave_weights_grads_and_mode_alone(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[3].eval()  # a mixed mode must be restored exactly
    sentinel = torch.full_like(model[0].weight, 7.0)
    model[0].weight.grad = sentinel.clone()
    model[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    layers = {"0": model[0], "3": model[3]}
    scores = get_criterion(name).scores(model, layers, [(x, y), (x, y)])
    assert set(scores) == {"0", "3"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model[0].weight.grad, sentinel)
    assert model[3].weight.grad is None and model[0].bias.grad is None
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert model.training and model[1].training and not model[3].training
    # dropout is off while scoring: two identical batches give finite, deterministic scores
    again = get_criterion(name).scores(model, layers, [(x, y), (x, y)])
    for k in scores:
        assert scores[k].shape == layers[k].weight.shape
        assert torch.isfinite(scores[k]).all()
        torch.testing.assert_close(scores[k], again[k])


def test_unknown_criterion_is_a_value_error():
    with pytest.raises(ValueError, match="unknown importance"):
        get_criterion("random")
    with pytest.raises(TypeError):
        get_criterion(3)


@pytest.mark.parametrize("name", sorted(n for n, c in CRITERIA.items() if c.needs_data))
def test_data_criteria_need_data(name):
    lin = _tiny()
    with pytest.raises(ValueError, match="calibration data"):
        get_criterion(name).scores(lin, {"l": lin}, None)


class _TokenModel(nn.Module):
    """Takes HF-style keyword inputs: (B, T, 3) features and an attention mask."""

    def __init__(self):
        super().__init__()
        self.lin = _tiny()

    def forward(self, inputs_embeds, attention_mask):
        return self.lin(inputs_embeds)


@pytest.mark.parametrize("name", ["wanda", "activation"])
def test_padding_tokens_are_ignored_for_dict_batches(name):
    model = _TokenModel()
    x = torch.tensor([[[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]], [[2.0, 0.0, 1.0], [100.0, 100.0, 100.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])  # the huge last token is padding
    got = get_criterion(name).scores(model, {"l": model.lin}, [{"inputs_embeds": x, "attention_mask": mask}])["l"]
    real = x[mask.bool()].unsqueeze(0)
    ref_model = _TokenModel()
    want = get_criterion(name).scores(
        ref_model, {"l": ref_model.lin}, [{"inputs_embeds": real, "attention_mask": torch.ones(1, 3)}]
    )["l"]
    torch.testing.assert_close(got, want)


def test_progress_bars_can_be_switched_on(capsys):
    lin = _tiny()
    x, y = _xy()
    get_criterion("taylor").scores(lin, {"l": lin}, [(x, y)], progress=True)
    assert "taylor scores" in capsys.readouterr().err


def test_pruner_passes_hessian_estimator():
    from sparsert.prune import Pruner

    m = nn.Sequential(_tiny())
    p = Pruner(m, "hessian", estimator="sqgrad", sparsity=0.5)
    assert p.criterion.estimator == "sqgrad"
    with pytest.raises(ValueError, match="estimator"):
        Pruner(m, "hessian", estimator="bogus")
    with pytest.raises(TypeError):
        Pruner(m, "magnitude", estimator="sqgrad")
