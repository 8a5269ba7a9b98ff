"""The ``sparsert`` command line (also ``python -m sparsert``).

```
sparsert prune    MODEL --sparsity 0.9 --importance taylor --pattern 4x1 [--calib DATA] -o OUT
sparsert sparsify MODEL --example-shape 1x128 -o OUT          (OUT.pt2: a torch.export program)
sparsert bench    MODEL [--dense DENSE] [--threads N] [--plot speedup.png]
sparsert inspect  FILE
```

MODEL is a built-in example (``digits-mlp``, ``digits-cnn``, ``bert-base``,
``minilm``), a Hugging Face model directory, a sparsert file or (bench) a
``.pt2``. Every subcommand takes ``--json`` (one JSON document on stdout).
Bad arguments or files end with exit status 2 (usage) or 1 (anything else)
and one line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]

PROG = "sparsert"


class CliError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------
# Models


def _has_sparse(model) -> bool:
    from .nn import SparseConv2d, SparseLinear

    return any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())


def densify(model):
    """A copy of ``model`` with every SparseLinear/SparseConv2d (and DenseLinear) back as
    nn.Linear/nn.Conv2d (the same weights, zeros included): the torch-eager dense baseline
    of a sparse model."""
    from torch import nn

    from .nn import DenseLinear, SparseConv2d, SparseLinear
    from .nn.surgery import swap
    from .ops import epilogue

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, DenseLinear):
            plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            swap(model, name, plain)
        elif isinstance(m, (SparseLinear, SparseConv2d)):
            dense = m.to_dense()
            after = epilogue.as_module(epilogue.code_of(m.activation))
            swap(model, name, dense if after is None else nn.Sequential(dense, after))
    return model


def _resolve(spec: str, *, allow_pt2: bool = False):
    """MODEL argument -> Workload."""
    from . import models

    if spec in models.EXAMPLES:
        return models.build(spec)
    p = Path(spec)
    if not p.exists():
        raise CliError(f"MODEL {spec!r} is not a built-in example ({', '.join(models.EXAMPLES)}), "
                       "a Hugging Face model directory, a sparsert file or a .pt2 (no such file)")
    if p.is_dir():
        return models.from_hf_dir(str(p))
    if p.suffix == ".pt2":
        if not allow_pt2:
            raise CliError(f"{spec}: a .pt2 program can only be benchmarked; give the model it came from")
        import torch

        import sparsert.ops  # noqa: F401  (registers the ops the program calls)

        import logging

        logger = logging.getLogger("torch.export")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # torch logs the deserialisation traceback; we say it in one line
        try:
            program = torch.export.load(str(p))
        except Exception as e:
            raise CliError(f"{spec}: cannot load the exported program ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            logger.setLevel(level)
        module = program.module()
        wl = models.Workload(p.name, module, "generic")
        ex = getattr(program, "example_inputs", None)
        if ex is not None:
            args, kwargs = ex
            wl.extra["example_inputs"] = kwargs if (kwargs and not args) else tuple(args)
        return wl
    from . import io

    model = io.load(p)
    return models.workload_for_model(p.name, model)


def _inputs(wl, shape: str | None):
    from .models import parse_shape

    if shape is None and "example_inputs" in wl.extra:
        return wl.extra["example_inputs"]
    if shape is None and not wl.default_shape:
        raise CliError(f"{wl.name}: give the input shape with --example-shape (e.g. 1x128)")
    return wl.example_inputs(parse_shape(shape) if shape else None)


def _kind_for_pattern(pattern: str) -> str:
    from .formats import kind_name
    from .prune import parse_pattern

    pat = parse_pattern(pattern)
    if pat.kind == "nm":
        return kind_name("nm", pat.a, pat.b)
    if pat.kind == "block" and (pat.a, pat.b) != (1, 1):
        return kind_name("bsr", pat.a, pat.b)
    return kind_name("csr")  # unstructured, and channel pruning (whole zero rows cost nothing in CSR)


# ---------------------------------------------------------------------------
# Output


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _table(head: list, rows: list) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def _inspect_text(s: dict) -> str:
    rows = [[r["layer"], r["type"], r["kind"], r["runtime"], "x".join(map(str, r["shape"])), f"{r['density']:.3f}",
             _fmt_bytes(r["bytes"]), _fmt_bytes(r["dense_bytes"]), f"{r['dense_bytes'] / max(r['bytes'], 1):.2f}x"]
            for r in s["layers"]]
    out = [_table(["layer", "type", "stored as", "runs", "shape", "density", "bytes", "dense bytes", "smaller"], rows)]
    out.append(f"sparse layers: {_fmt_bytes(s['sparse_layer_dense_bytes'])} dense -> "
               f"{_fmt_bytes(s['sparse_layer_bytes'])} ({s['layer_compression']:.2f}x); "
               f"other weights {_fmt_bytes(s['other_bytes'])}")
    out.append(f"file {_fmt_bytes(s['file_bytes'])} vs {_fmt_bytes(s['dense_equivalent_bytes'])} as a dense "
               f"float32 state_dict: {s['compression']:.2f}x smaller "
               f"(format v{s['format_version']}, sparsert {s['sparsert_version']}"
               + (f", model {s['model']})" if s["model"] else ")"))
    return "\n".join(out)


def _emit(args, data: dict, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


# ---------------------------------------------------------------------------
# Subcommands


def cmd_inspect(args) -> int:
    from . import io

    s = io.summary(args.file)
    _emit(args, s, _inspect_text(s))
    return 0


def _check_output(path: str, suffixes=(".sparsert", ".safetensors")) -> Path:
    out = Path(path)
    if out.is_dir():
        raise CliError(f"-o {path}: is a directory; give a file name")
    if not out.parent.exists():
        raise CliError(f"-o {path}: directory {str(out.parent)!r} does not exist")
    return out


def cmd_prune(args) -> int:
    import torch

    from . import io
    from .convert import sparsify
    from .prune import Pruner, finetune, parse_pattern, report

    out = _check_output(args.output)
    try:
        parse_pattern(args.pattern)
    except (ValueError, TypeError) as e:
        raise CliError(f"--pattern {args.pattern!r}: {e}") from None
    t0 = time.perf_counter()
    wl = _resolve(args.model)
    if _has_sparse(wl.model):
        wl.model = densify(wl.model)
    dense = copy.deepcopy(wl.model)
    before = wl.quality(dense, dense)
    pruner = Pruner(wl.model, importance=args.importance, pattern=args.pattern, sparsity=args.sparsity,
                    scope=args.scope, exclude=args.exclude or ())
    if pruner.criterion.needs_data or args.calib:
        pruner.calibrate(wl.calibration(args.calib, limit=args.calib_batches), wl.loss_fn())
    while True:
        pruner.step()
        if pruner.done:
            break
    refit = {}
    if args.reconstruct:
        from .prune import reconstruct
        refit = reconstruct(wl.model, dense, list(wl.calibration(args.calib, limit=args.calib_batches)))
    tuned = []
    if args.finetune_epochs:
        data = wl.train_batches()
        if data is None:
            raise CliError(f"{wl.name}: no fine-tuning data for this model; use --finetune-epochs 0")
        kw: dict[str, Any] = {}
        if wl.family == "hf":
            kw = {"teacher": dense, "alpha": 1.0, "distill_fn": lambda s, t: torch.nn.functional.mse_loss(s, t)}
        tuned = finetune(wl.model, data, epochs=args.finetune_epochs, lr=args.lr, **kw)
    wl.model.eval()
    after = wl.quality(wl.model, dense)
    rep = report(wl.model)
    kind = _kind_for_pattern(args.pattern)
    sparse = sparsify(wl.model, format=kind, check=False)
    info = io.save(sparse, out)
    summ = io.summary(out)
    data = {"model": wl.name, "output": str(out), "sparsity": rep.sparsity, "format": kind,
            "quality_before": before, "quality_after": after, "finetune_loss": tuned,
            "reconstruct": {name: None if e is None else {"error_before": e[0], "error_after": e[1]}
                            for name, e in refit.items()},
            "file_bytes": info["file_bytes"], "dense_equivalent_bytes": summ["dense_equivalent_bytes"],
            "compression": summ["compression"], "seconds": time.perf_counter() - t0,
            "layers": [{"layer": l.name, "sparsity": l.sparsity, "params": l.params} for l in rep.layers]}
    text = "\n".join([
        str(rep),
        "",
        f"quality before: {_q(before)}   after: {_q(after)}",
        *([_refit_line(refit)] if refit else []),
        f"wrote {out} ({kind}): {_fmt_bytes(info['file_bytes'])}, {summ['compression']:.2f}x smaller than the "
        f"dense state_dict ({_fmt_bytes(summ['dense_equivalent_bytes'])}); "
        f"next: sparsert sparsify {out} -o {out.with_suffix('')}-fast.sparsert",
    ])
    _emit(args, data, text)
    return 0


def _refit_line(refit: dict) -> str:
    from .prune.reconstruct import mean_errors

    layers, before, after = mean_errors(refit)
    line = f"reconstructed {layers} layer(s)"
    if layers:
        line += f": relative output error on the calibration data {before:.3f} -> {after:.3f} (mean over layers)"
    skipped = [n for n, e in refit.items() if e is None]
    return line + (f"; left as pruned (unsupported kind): {', '.join(skipped)}" if skipped else "")


def _q(q: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in q.items()) or "n/a"


def cmd_sparsify(args) -> int:
    from . import io
    from .convert import sparsify

    out = _check_output(args.output)
    wl = _resolve(args.model)
    if _has_sparse(wl.model):
        wl.model = densify(wl.model)
    inputs = _inputs(wl, args.example_shape)
    sparse = sparsify(wl.model, format=args.format, example_inputs=inputs, min_speedup=args.min_speedup,
                      threads=args.threads, verbose=not args.json and sys.stdout.isatty())  # a line per layer
    plan = sparse.sparsity_plan
    if out.suffix == ".pt2":
        program = io.export(sparse, inputs, out)
        written = {"path": str(out), "file_bytes": out.stat().st_size, "sparsert_ops": io.sparse_op_count(program)}
    else:
        written = io.save(sparse, out)
    data = {"model": wl.name, "output": written, "plan": plan.as_dicts()}
    text = f"{plan.table()}\nwrote {out}: {_fmt_bytes(written['file_bytes'])}"
    _emit(args, data, text)
    return 0


def cmd_bench(args) -> int:
    from .bench import benchmark

    wl = _resolve(args.model, allow_pt2=True)
    if args.dense:
        dense = _resolve(args.dense, allow_pt2=True).model
    elif Path(args.model).suffix == ".pt2":
        raise CliError("benchmarking a .pt2 needs the dense model to compare with: --dense MODEL")
    elif not _has_sparse(wl.model):
        raise CliError(f"{args.model} has no sparse layers: run 'sparsert sparsify {args.model} -o OUT' and "
                       "benchmark OUT (or pass --dense)")
    else:
        dense = densify(wl.model)
    inputs = _inputs(wl, args.example_shape)
    result = benchmark(dense, wl.model, inputs, threads=args.threads, repeats=args.repeats, verbose=False)
    if args.plot:
        _plot(result, args.plot, wl.name)
    data = result.as_dict()
    _emit(args, data, str(result) + (f"\nplot: {args.plot}" if args.plot else ""))
    return 0


def _plot(result, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    layers = [t for t in result.layers if t.speedup is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers) + 2), 4))
    names = [t.name for t in layers] + ["end to end"]
    values = [t.speedup for t in layers] + [result.speedup]
    colors = ["tab:blue" if t.format != "dense" else "tab:gray" for t in layers] + ["tab:orange"]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(values)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs torch dense")
    ax.set_title(f"{title}: {result.threads} threads (blue: sparse layers, gray: dense)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Parser


def _sparsity(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low; errors say it must be `what`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    models = "a built-in example (digits-mlp, digits-cnn, bert-base, minilm), a Hugging Face model directory or a sparsert file"
    p = _Parser(prog=PROG, description="Prune, sparsify, benchmark and inspect sparse PyTorch models.")
    p.add_argument("--version", action="version", version=f"sparsert {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("prune", parents=[common], help="prune a model and write a sparsert file",
                       description=f"Prune MODEL ({models}) and write its pruned layers, packed, to OUT.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--sparsity", type=_sparsity, default=0.9, help="fraction of weights removed (default 0.9)")
    s.add_argument("--importance", default="magnitude",
                   help="magnitude, gradient, taylor, activation, hessian, fisher, wanda (default magnitude)")
    s.add_argument("--pattern", default="unstructured",
                   help="unstructured, RxC blocks (e.g. 4x1), N:M (e.g. 2:4) or channel (default unstructured)")
    s.add_argument("--scope", choices=["layer", "global", "row"], default=None,
                   help="rank weights per layer, across layers or per row (default: the criterion's)")
    s.add_argument("--exclude", action="append", metavar="LAYER", help="a layer (or prefix/regex) never pruned")
    s.add_argument("--calib", metavar="DATA", help="calibration data: .txt sentences or .npz with x (and y); "
                                                   "default: the example's own data")
    s.add_argument("--calib-batches", type=_positive_int, default=8, help="calibration batches (default 8)")
    s.add_argument("--reconstruct", action="store_true",
                   help="after pruning, refit the kept weights of every pruned layer to the dense model's outputs "
                        "on the calibration data (least squares, no training; zeros stay zero)")
    s.add_argument("--finetune-epochs", type=_nonneg_int, default=0, help="mask-preserving fine-tuning epochs")
    s.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="sparsert file to write")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("sparsify", parents=[common], help="choose each layer's fastest format and save it",
                       description=f"Time each pruned layer of MODEL ({models}) in every candidate format, keep "
                                   "the fastest and write OUT (a sparsert file, or a torch.export program if OUT "
                                   "ends in .pt2).")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--example-shape", metavar="SHAPE", help="input shape, e.g. 1x128 (token ids) or 64x1x8x8")
    s.add_argument("--format", default="auto", help="auto (time the candidates) or csr, bsrRxC, nmN:M for all")
    s.add_argument("--min-speedup", type=float, default=1.05, help="keep a layer dense unless this much faster")
    s.add_argument("--threads", type=_positive_int, default=None, help="threads for timing")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="sparsert file or .pt2 to write")
    s.set_defaults(func=cmd_sparsify)

    s = sub.add_parser("bench", parents=[common], help="time a sparse model against its dense baseline",
                       description="End-to-end and per-layer latency of MODEL (a sparsert file, a built-in "
                                   "example, or a .pt2 with --dense) against torch dense.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--dense", metavar="DENSE", help="the dense model (default: MODEL's weights run densely)")
    s.add_argument("--threads", type=_positive_int, default=None, help="torch and sparsert threads")
    s.add_argument("--example-shape", metavar="SHAPE", help="input shape (default: the model's usual input)")
    s.add_argument("--repeats", type=_positive_int, default=50, help="timed calls of each model (default 50)")
    s.add_argument("--plot", metavar="PNG", help="write a per-layer speedup chart")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("inspect", parents=[common], help="per-layer formats, densities and bytes of a file",
                       description="Per-layer format, density and bytes of a sparsert file, and its compression.")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    where = f"{PROG} {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError) as e:
        if os.environ.get("SPARSERT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing {msg}"
        print(f"{where}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
