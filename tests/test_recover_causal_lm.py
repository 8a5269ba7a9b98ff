"""Recovery of a causal language model (SmolLM2's architecture, tiny): SparseGPT one-shot, then
distillation of the logits and hidden states with the masks fixed, with the catalogue's recipe."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsert.models.catalogue import Workload, recovery_recipe
from sparsert.prune import Pruner, get_mask, recover

transformers = pytest.importorskip("transformers")

VOCAB = 96
SEEN = 12  # the texts use a few of the tokens: a distribution the half-sized student can learn to imitate


def _tiny_llama():
    """Two Llama blocks with a wide initialisation, so that the next-token distributions are
    peaked and differ between inputs (a default-initialised Llama predicts nearly uniform ones)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, initializer_range=0.3)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, SEEN, (4, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False})
    return out


@torch.no_grad()
def _kl(student, teacher, batches):
    """Mean per-token KL(teacher || student) of the next-token distributions."""
    total, count = 0.0, 0
    for b in batches:
        t = torch.log_softmax(teacher(**b).logits.double(), -1)
        s = torch.log_softmax(student(**b).logits.double(), -1)
        total += float((t.exp() * (t - s)).sum(-1).sum())
        count += t.shape[0] * t.shape[1]
    return total / count


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (".self_attn." in n or ".mlp." in n)]


def test_causal_lm_recipe_trains_only_the_pruned_layers_in_eval_mode():
    wl = Workload("tiny", _tiny_llama(), "hf", extra={"causal_lm": True})
    recipe = recovery_recipe(wl)
    assert recipe["train"] == "pruned" and recipe["dropout"] is False
    assert recipe.get("embedding_weight", 0.0) == 0.0  # a language model is judged by its next tokens


def test_sparsegpt_then_distillation_improves_a_tiny_causal_lm_and_keeps_its_masks():
    teacher = _tiny_llama()
    train, held = _batches(16, 1), _batches(4, 2)
    names = _linear_names(teacher)
    student = copy.deepcopy(teacher)
    Pruner(student, importance="sparsegpt", sparsity=0.5, include=names, scope="layer",
           progress=False).calibrate(train[:4]).step()
    layers = dict(student.named_modules())
    masks = {n: get_mask(layers[n]).clone() for n in names}
    frozen = {k: v.clone() for k, v in student.state_dict().items()
              if not any(k.startswith(n + ".") for n in names)}  # embeddings (= tied lm_head), norms
    before = _kl(student, teacher, held)
    assert before > 0.3  # the one-shot model does lose something to recover

    recipe = recovery_recipe(Workload("tiny", student, "hf", extra={"causal_lm": True}))
    result = recover(student, teacher, train, steps=60, progress=False, **{**recipe, "lr": 1e-2})
    assert result.done
    after = _kl(student, teacher, held)
    assert after < 0.75 * before, (before, after)  # on held-out token batches
    for n in names:  # exactly the same weights are zero: none revived, none newly lost
        assert torch.equal(get_mask(layers[n]), masks[n]), n
        assert torch.equal(layers[n].weight != 0, masks[n]), n
    for k, v in student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_the_planned_workflow_judges_a_causal_lm_by_its_own_measure_not_embeddings(monkeypatch):
    # `sparsert prune smollm2 --target-speedup` used to take a tokenizer to mean a sentence
    # encoder and crashed pooling a CausalLMOutput; a causal LM is judged by wl.quality (perplexity)
    from sparsert.planner import workflow

    wl = Workload("tiny", _tiny_llama(), "hf", tokenizer=object(), extra={"causal_lm": True})
    calls = []
    monkeypatch.setattr(Workload, "quality", lambda self, model, reference=None: calls.append(model) or
                        {"perplexity": 2.0})
    assert workflow.reference_embeddings(wl, wl.model) is None
    assert workflow.quality(wl, wl.model, wl.model) == {"perplexity": 2.0} and calls == [wl.model]
