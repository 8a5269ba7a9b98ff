"""``sparsert prune`` with a layer allocation and with recovery (gradual pruning + distillation,
time-bounded, resumable from a checkpoint folder)."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import cli, one_line_error


def _prune(tmp_path, *extra, out="m.sparsert"):
    r = cli("prune", "digits-mlp", "--exclude", "classifier", "-o", tmp_path / out, "--json", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_allocation_owl_spreads_the_sparsity_and_keeps_the_mean(tmp_path):
    data = _prune(tmp_path, "--sparsity", "0.6", "--importance", "wanda", "--allocation", "owl")
    assert data["allocation"] == "owl"
    layers = {l["layer"]: (l["sparsity"], l["params"]) for l in data["layers"] if l["layer"] != "classifier"}
    assert set(layers) == {"fc1", "fc2"}
    spars = [s for s, _ in layers.values()]
    assert max(spars) - min(spars) > 0.05, layers  # OWL gives the two layers different sparsities
    mean = sum(s * n for s, n in layers.values()) / sum(n for _, n in layers.values())
    assert mean == pytest.approx(0.6, abs=0.01)
    uniform = _prune(tmp_path, "--sparsity", "0.6", "--importance", "wanda", out="u.sparsert")
    assert uniform["allocation"] == "uniform"
    assert all(l["sparsity"] == pytest.approx(0.6, abs=0.01) for l in uniform["layers"] if l["layer"] != "classifier")


def test_allocation_flag_errors_are_one_line(tmp_path):
    one_line_error(cli("prune", "digits-mlp", "--allocation", "best", "-o", tmp_path / "x.sparsert"), 2,
                   "sparsert prune: error:", "--allocation")
    one_line_error(cli("prune", "digits-mlp", "--allocation", "owl", "--scope", "global", "--importance", "wanda",
                       "-o", tmp_path / "x.sparsert"), 1, "sparsert prune: error:", "pick one")
    one_line_error(cli("prune", "digits-mlp", "--checkpoint", tmp_path / "ck", "-o", tmp_path / "x.sparsert"), 1,
                   "sparsert prune: error:", "--recover-minutes")
    one_line_error(cli("prune", "digits-mlp", "--recover-minutes", "-1", "-o", tmp_path / "x.sparsert"), 2,
                   "sparsert prune: error:", "--recover-minutes")


def test_recovery_beats_one_shot_and_a_stopped_run_continues_from_its_checkpoint(tmp_path):
    one_shot = _prune(tmp_path, "--sparsity", "0.95", out="one.sparsert")
    ck = tmp_path / "ck"
    common = ("--sparsity", "0.95", "--recover-steps", "60", "--recover-lr", "1e-2", "--checkpoint", ck,
              "--checkpoint-every", "5")
    # a budget of a few milliseconds: one step (nothing pruned yet), then a checkpoint and a clear stop
    r = cli("prune", "digits-mlp", "--exclude", "classifier", *common, "--recover-minutes", "0.00001",
            "-o", tmp_path / "r.sparsert")
    one_line_error(r, 1, "sparsert prune: error:", "run the same command again to continue")
    first_step = torch.load(ck / "recover.pt", weights_only=True)["step"]
    assert 1 <= first_step < 60
    second = _prune(tmp_path, *common, "--recover-minutes", "10", out="r.sparsert")
    rec = second["recovery"]
    assert rec["done"] and rec["step"] == 60 and rec["resumed_from"] == first_step
    assert torch.load(ck / "recover.pt", weights_only=True)["step"] == 60
    layers = {l["layer"]: l["sparsity"] for l in second["layers"]}
    assert layers["fc1"] == pytest.approx(0.95, abs=0.01) and layers["classifier"] == 0.0
    # distillation wins back what one-shot magnitude pruning at 95% loses
    assert second["quality_after"]["agreement"] > one_shot["quality_after"]["agreement"] + 0.2, \
        (second["quality_after"], one_shot["quality_after"])
    r = cli("prune", "digits-mlp", "--exclude", "classifier", "--sparsity", "0.95", "--recover-steps", "61",
            "--recover-minutes", "1", "--checkpoint", ck, "-o", tmp_path / "y.sparsert")
    one_line_error(r, 1, "sparsert prune: error:", "60-step")


def test_sparsegpt_recovery_prunes_one_shot_then_distils_with_the_masks_fixed(tmp_path):
    ck = tmp_path / "ck"
    common = ("--sparsity", "0.9", "--importance", "sparsegpt", "--recover-steps", "40", "--recover-lr", "1e-2",
              "--checkpoint", ck, "--checkpoint-every", "5")
    # stopped after a step or so: the masks are already at the target (one-shot), so the model is written
    first = _prune(tmp_path, *common, "--recover-minutes", "0.00001", out="a.sparsert")
    rec = first["recovery"]
    assert rec["start"] == "oneshot" and not rec["done"] and 1 <= rec["step"] < 40
    layers = {l["layer"]: l["sparsity"] for l in first["layers"]}
    assert layers["fc1"] == pytest.approx(0.9, abs=0.01), layers
    masks = torch.load(ck / "recover.pt", weights_only=True)["masks"]
    second = _prune(tmp_path, *common, "--recover-minutes", "10", out="b.sparsert")
    rec = second["recovery"]
    assert rec["done"] and rec["resumed_from"] == first["recovery"]["step"]
    assert second["quality_after"]["agreement"] >= first["quality_after"]["agreement"] - 0.01
    for name, keep in torch.load(ck / "recover.pt", weights_only=True)["masks"].items():
        assert torch.equal(keep, masks[name]), name  # the one-shot masks, kept exactly
