"""The ``sparsert`` command line (also ``python -m sparsert``).

```
sparsert prune    MODEL --sparsity 0.9 --importance taylor --pattern 4x1 [--calib DATA] -o OUT
sparsert prune    MODEL --target-speedup 2 [--baseline best_dense|torch] [--recover-minutes 5] -o OUT   (planned)
sparsert prune    minilm --sparsity 0.8 --importance wanda --recover-minutes 30 --checkpoint DIR -o OUT
sparsert sparsify MODEL --example-shape 1x128 -o OUT          (OUT.pt2: a torch.export program)
sparsert bench    MODEL [--dense DENSE] [--threads N] [--plot speedup.png]
sparsert inspect  FILE
```

MODEL is a built-in example (``digits-mlp``, ``digits-cnn``, ``bert-base``,
``minilm``, ``smollm2``), a Hugging Face model directory, a sparsert file or (bench) a
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


class UsageError(Exception):
    """Bad command-line arguments: reported as one line, exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see '{prog} --help')")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block; main() says it (as JSON under --json)
        raise UsageError(self.prog, message)


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


def _resolve(spec: str, *, allow_pt2: bool = False, trust_pickle: bool = False):
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
        from .io.export import PickleRefused, load_program

        try:
            program = load_program(p, trust_pickle=trust_pickle)
        except PickleRefused as e:
            raise CliError(str(e)) from None
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
    """The example inputs: the model's usual ones, or --example-shape's, checked to run the model."""
    from .models import parse_shape

    if shape is None and "example_inputs" in wl.extra:
        return wl.extra["example_inputs"]
    if shape is None and not wl.default_shape:
        raise CliError(f"{wl.name}: give the input shape with --example-shape (e.g. 1x128)")
    if shape is None:
        return wl.example_inputs(None)
    flag = f"--example-shape {shape}"
    try:
        dims = parse_shape(shape)
        positions = getattr(getattr(wl.model, "config", None), "max_position_embeddings", None)
        if wl.family == "hf" and len(dims) == 2 and isinstance(positions, int) and dims[1] > positions:
            raise ValueError(f"{wl.name} takes at most {positions} tokens per sequence, got {dims[1]}")
        if "example_inputs" in wl.extra:  # a .pt2: inputs like those it was exported with, at this shape
            inputs = _inputs_like(wl.extra["example_inputs"], dims)
        else:
            inputs = wl.example_inputs(dims)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None
    _check_runs(wl, inputs, flag)
    return inputs


def _inputs_like(example, dims: tuple):
    """``example``'s structure and dtypes at shape ``dims``: random floats, and integers
    drawn from the example's own values (token ids, masks)."""
    import torch
    import torch.utils._pytree as pytree

    def like(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() != len(dims):
            raise ValueError(f"the program takes {t.dim()}-D inputs (it was exported with "
                             f"{'x'.join(map(str, t.shape))}), got {len(dims)}-D")
        if t.is_floating_point() or t.numel() == 0:
            return torch.randn(dims, generator=torch.Generator().manual_seed(0)).to(t.dtype)
        flat = t.reshape(-1)
        return flat[torch.randint(0, flat.numel(), dims, generator=torch.Generator().manual_seed(0))]

    return pytree.tree_map(like, example)


def _check_runs(wl, inputs, flag: str) -> None:
    """One forward on ``inputs``; a CliError in the CLI's terms (what the model takes) if it fails."""
    import torch

    from .convert import call_model

    try:
        with torch.no_grad():
            call_model(wl.model, inputs)
    except Exception:
        raise CliError(f"{flag}: {wl.name} does not run on inputs of this shape; {_expected_inputs(wl)}") from None


def _expected_inputs(wl) -> str:
    """What a model takes, in words, for error messages."""
    from torch import nn

    if "example_inputs" in wl.extra or type(wl.model).__name__ in ("GraphModule", "_UnliftedModule"):
        from .io.export import input_shapes

        try:
            shapes = input_shapes(wl.model)
        except Exception:  # noqa: BLE001 - only a hint
            shapes = {}
        if shapes:
            return "it takes " + ", ".join(f"{name} {s}" for name, s in shapes.items())
    if wl.family == "hf":
        positions = getattr(getattr(wl.model, "config", None), "max_position_embeddings", None)
        return "it takes token ids BATCHxTOKENS" + (f", at most {positions} tokens" if positions else "")
    if wl.family == "digits":
        return "it takes images Nx1x8x8"
    for m in wl.model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear":
            return f"its first layer takes {m.in_features} features (e.g. 1x{m.in_features})"
        if isinstance(m, nn.Conv2d) or type(m).__name__ == "SparseConv2d":
            return f"its first layer takes {m.in_channels} channels (e.g. 1x{m.in_channels}x32x32)"
    return "give the shape the model takes"


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
    rows = [[r["layer"], r["type"], r["kind"], r["runtime"], r.get("precision", "fp32"), "x".join(map(str, r["shape"])),
             f"{r['density']:.3f}", _fmt_bytes(r["bytes"]), _fmt_bytes(r["dense_bytes"]),
             f"{r['dense_bytes'] / max(r['bytes'], 1):.2f}x"]
            for r in s["layers"]]
    out = [_table(["layer", "type", "stored as", "runs", "precision", "shape", "density", "bytes", "dense bytes",
                   "smaller"], rows)]
    out.append(f"sparse layers: {_fmt_bytes(s['sparse_layer_dense_bytes'])} dense -> "
               f"{_fmt_bytes(s['sparse_layer_bytes'])} ({s['layer_compression']:.2f}x); "
               f"other weights {_fmt_bytes(s['other_bytes'])}")
    out.append(f"file {_fmt_bytes(s['file_bytes'])} vs {_fmt_bytes(s['dense_equivalent_bytes'])} as a dense "
               f"float32 state_dict: {s['compression']:.2f}x smaller "
               f"(format v{s['format_version']}, sparsert {s['sparsert_version']}"
               + (f", model {s['model']})" if s["model"] else ")"))
    return "\n".join(out)


def _show_progress(args) -> bool:
    """Progress bars (on stderr) only for a person at a terminal: never under --json, never into a log."""
    return not args.json and sys.stderr.isatty()


class _Steps:
    """One progress bar over a command's steps, named as they start (stderr; off unless ``enabled``)."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm

        self._bar = tqdm(disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True,
                         bar_format="{desc} [{elapsed}]")
        self._started = False

    def start(self, step: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(step)

    def close(self) -> None:
        self._bar.close()


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


#: what -o accepts: a sparsert file (prune, sparsify) or a torch.export program (sparsify)
SPARSERT_SUFFIXES = (".sparsert", ".safetensors")
PROGRAM_SUFFIX = ".pt2"


def _check_writable(path: str, flag: str) -> Path:
    """``path`` can be written: not a directory, in an existing, writable directory."""
    out = Path(path)
    if out.is_dir():
        raise CliError(f"{flag} {path}: is a directory; give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{flag} {path}: directory {str(parent)!r} is not writable")
    return out


def _check_output(path: str, program: bool = False) -> Path:
    """The -o file, checked before any work: its suffix says what is written."""
    name = Path(path).name.lower()
    if not name.endswith(SPARSERT_SUFFIXES + ((PROGRAM_SUFFIX,) if program else ())):
        wanted = "a sparsert file name ending in .sparsert (or .safetensors)"
        if program:
            wanted += ", or .pt2 for a torch.export program"
        raise CliError(f"-o {path}: expected {wanted}")
    return _check_writable(path, "-o")


def _check_plot(path: str) -> None:
    """--plot's file, checked before the benchmark runs: matplotlib present, a format it writes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in supported:
        raise CliError(f"--plot {path}: expected an image file name ending in "
                       f"{', '.join('.' + k for k in sorted(supported))}")
    _check_writable(path, "--plot")


def cmd_prune_to_speedup(args) -> int:
    """``prune --target-speedup X``: plan, prune, refit, pack per plan, save, measure (sparsert.planner)."""
    from .planner.workflow import GRADUAL_PRUNE_FRACTION, prune_to_speedup

    if args.sparsity is not None:
        raise CliError("--target-speedup picks each layer's sparsity: drop --sparsity")
    refused = [flag for flag, given in (("--finetune-epochs", args.finetune_epochs > 0),
                                        ("--allocation", args.allocation != "uniform")) if given]
    if refused:
        raise CliError(f"{', '.join(refused)}: not used with --target-speedup (the plan fixes each layer's sparsity "
                       "and pattern; recovery there is --recover-minutes); drop "
                       + ("it" if len(refused) == 1 else "them"))
    recovering = args.recover_minutes > 0
    needs = [flag for flag, given in (("--recover-steps", args.recover_steps is not None),
                                      ("--recover-lr", args.recover_lr is not None),
                                      ("--recover-start", args.recover_start is not None),
                                      ("--recover-prune-frac", args.recover_prune_frac is not None),
                                      ("--checkpoint-every", args.checkpoint_every is not None),
                                      ("--checkpoint", args.checkpoint is not None)) if given]
    if needs and not recovering:
        raise CliError(f"{', '.join(needs)}: for a recovery run; give --recover-minutes too")
    if args.checkpoint is not None and args.recover_steps is None:
        raise CliError("--checkpoint with --target-speedup continues a run of a fixed length: give --recover-steps too")
    if args.score_candidates < 0:
        raise CliError("--score-candidates must be >= 0 (0: the solver's plan, unscored)")
    if args.score_batches < 0:
        raise CliError("--score-batches must be >= 0 (0: hold calibration batches out instead)")
    out = _check_output(args.output)
    if args.plot_plan:
        _check_plot(args.plot_plan)
    wl = _resolve(args.model)
    if _has_sparse(wl.model):
        wl.model = densify(wl.model)
    inputs = _inputs(wl, args.example_shape)
    importance = args.importance  # None: the workflow's default (sparsegpt for Hugging Face models)
    quiet = args.json
    try:
        r = prune_to_speedup(wl, args.target_speedup, baseline=args.baseline, importance=importance,
                             patterns=[p.strip() for p in args.patterns.split(",") if p.strip()],
                             example_inputs=inputs, threads=args.threads, calib_batches=args.calib_batches,
                             calib=args.calib, exclude=args.exclude or (), reconstruct=args.reconstruct,
                             recover_minutes=args.recover_minutes, recover_steps=args.recover_steps,
                             recover_lr=args.recover_lr, recover_start=args.recover_start or "auto",
                             recover_prune_frac=(GRADUAL_PRUNE_FRACTION if args.recover_prune_frac is None
                                                 else args.recover_prune_frac),
                             checkpoint=Path(args.checkpoint) / "recover.pt" if args.checkpoint else None,
                             checkpoint_every=args.checkpoint_every or 100,
                             output=out, plot=args.plot_plan, score_candidates=args.score_candidates,
                             score_batches=args.score_batches, score_metric=args.score_metric,
                             calibrate_groups=args.calibrate_groups, measure_candidates=args.measure_candidates,
                             forward=args.forward, progress=_show_progress(args),
                             log=(lambda s: None) if quiet else print)
    except ValueError as e:
        raise CliError(str(e)) from None
    base = "best dense" if args.baseline == "best_dense" else "torch eager"
    data = {k: v for k, v in r.items() if k not in ("plan", "sparse_model")}
    data["plan"] = r["plan"].as_dict()
    text = "\n".join([
        f"speedup vs {base}: predicted {r['predicted_speedup']:.2f}x, measured {r['measured_speedup']:.2f}x "
        f"(asked {args.target_speedup:g}x; torch eager {r['eager_ms']:.2f} ms, best dense {r['best_dense_ms']:.2f} ms, "
        f"sparse {r['sparse_ms']:.2f} ms, {r['threads']} threads, "
        + ("the lean forward, as served)" if r["forward"] == "streamlined" else "the model's own forward)"),
        f"quality kept: {_q(r['quality'])} (dense: {_q(r['quality_dense'])}; pruned with {r['importance']}"
        + (f"; one-shot before recovery: {_q(r['quality_oneshot'])}" if r["quality_oneshot"] else "") + ")",
        *([_recovery_line(_Recovered(**r["recovery"]), args)] if r["recovery"] else []),
        f"wrote {out}: {_fmt_bytes(r['file_bytes'])}",
    ])
    _emit(args, data, text)
    return 0


def cmd_prune(args) -> int:
    import torch

    if args.target_speedup is not None:
        return cmd_prune_to_speedup(args)
    if args.sparsity is None:
        args.sparsity = 0.9
    if args.importance is None:
        args.importance = "magnitude"
    if args.recover_start is not None:
        raise CliError("--recover-start chooses how a planned (--target-speedup) recovery starts; without it the "
                       "start follows --importance (sparsegpt: one-shot, others: gradual): drop --recover-start")
    args.recover_steps = 2000 if args.recover_steps is None else args.recover_steps
    args.recover_prune_frac = 0.5 if args.recover_prune_frac is None else args.recover_prune_frac
    args.checkpoint_every = 100 if args.checkpoint_every is None else args.checkpoint_every

    from . import io
    from .convert import sparsify
    from .io.sizes import size_breakdown, size_note
    from .prune import Pruner, finetune, parse_pattern, report

    out = _check_output(args.output)
    try:
        parse_pattern(args.pattern)
    except (ValueError, TypeError) as e:
        raise CliError(f"--pattern {args.pattern!r}: {e}") from None
    show = _show_progress(args)
    steps = _Steps(show)
    try:
        t0 = time.perf_counter()
        steps.start(f"loading {args.model}")
        wl = _resolve(args.model)
        if _has_sparse(wl.model):
            wl.model = densify(wl.model)
        dense = copy.deepcopy(wl.model)
        steps.start("measuring the dense model's quality")
        before = wl.quality(dense, dense)
        recovering = args.recover_minutes > 0
        if args.checkpoint and not recovering:
            raise CliError("--checkpoint keeps a recovery run: give --recover-minutes too")
        recovery_steps = args.recover_steps
        schedule: Any = "oneshot"
        # SparseGPT prunes one-shot (its weight update needs the whole mask at once); recovery then
        # distils with the masks fixed
        oneshot_then_recover = recovering and args.importance == "sparsegpt"
        ckpt = Path(args.checkpoint) / "recover.pt" if recovering and args.checkpoint else None
        if recovering and not oneshot_then_recover:
            from .prune import Gradual

            # prune along the cubic schedule over the first half, distil all along
            end = max(1, int(recovery_steps * args.recover_prune_frac))
            schedule = Gradual(begin_step=0, end_step=end, frequency=max(1, end // 20))
        try:
            pruner = Pruner(wl.model, importance=args.importance, pattern=args.pattern, sparsity=args.sparsity,
                            scope=args.scope, exclude=args.exclude or (), include=wl.extra.get("include"),
                            allocation=args.allocation, schedule=schedule, progress=show)
        except ValueError as e:
            raise CliError(str(e)) from None
        resuming = oneshot_then_recover and ckpt is not None and ckpt.is_file()  # weights and masks are in it
        if not resuming and (pruner.criterion.needs_data or args.calib or args.allocation != "uniform"):
            steps.start(f"calibrating ({args.importance})")
            pruner.calibrate(wl.calibration(args.calib, limit=args.calib_batches), wl.loss_fn())
        recovered = None
        if recovering:
            from .models.catalogue import RECOVERY_SENTENCES, recovery_recipe

            data = wl.train_batches(RECOVERY_SENTENCES)
            if data is None:
                raise CliError(f"{wl.name}: no training data for recovery with this model")
            from .prune import recover

            if oneshot_then_recover and not resuming:
                steps.start(f"pruning to {args.sparsity:g} ({args.pattern})")
                while not pruner.done:
                    pruner.step()
            steps.start(("distilling with the masks fixed" if oneshot_then_recover else
                         f"gradual pruning to {args.sparsity:g} ({args.pattern}) with distillation")
                        + f" (at most {args.recover_minutes:g} min)")
            recipe = recovery_recipe(wl, oneshot=oneshot_then_recover)
            if args.recover_lr is not None:
                recipe["lr"] = args.recover_lr
            try:
                recovered = recover(wl.model, dense, data, steps=recovery_steps,
                                    pruner=None if oneshot_then_recover else pruner,
                                    checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                                    time_budget=args.recover_minutes * 60.0, progress=show, **recipe)
            except ValueError as e:  # e.g. a checkpoint of a run with other settings
                raise CliError(f"--checkpoint {args.checkpoint}: {e}") from None
        else:
            steps.start(f"pruning to {args.sparsity:g} ({args.pattern})")
            while True:
                pruner.step()
                if pruner.done:
                    break
        refit = {}
        if args.reconstruct:
            from .prune import reconstruct
            steps.start("reconstructing the kept weights")
            refit = reconstruct(wl.model, dense, list(wl.calibration(args.calib, limit=args.calib_batches)),
                                progress=show)
        tuned = []
        if args.finetune_epochs:
            steps.start("fine-tuning")
            data = wl.train_batches()
            if data is None:
                raise CliError(f"{wl.name}: no fine-tuning data for this model; use --finetune-epochs 0")
            kw: dict[str, Any] = {}
            if wl.family == "hf":
                kw = {"teacher": dense, "alpha": 1.0, "distill_fn": lambda s, t: torch.nn.functional.mse_loss(s, t)}
            tuned = finetune(wl.model, data, epochs=args.finetune_epochs, lr=args.lr, progress=show, **kw)
        wl.model.eval()
        steps.start("measuring the pruned model's quality")
        after = wl.quality(wl.model, dense)
        rep = report(wl.model)
        kind = _kind_for_pattern(args.pattern)
        if recovered is not None and not recovered.done and rep.sparsity == 0:
            raise CliError(f"recovery stopped at step {recovered.step}/{recovered.steps} (time budget spent) before "
                           "any weight was pruned; " + ("run the same command again to continue from the checkpoint"
                                                        if args.checkpoint else "give more --recover-minutes"))
        steps.start(f"packing ({kind}) and saving")
        sparse = sparsify(wl.model, format=kind, check=False, progress=False)
        info = io.save(sparse, out)
        summ = io.summary(out)
        sizes = size_breakdown(out, sparse)
    finally:
        steps.close()
    data = {"model": wl.name, "output": str(out), "sparsity": rep.sparsity, "format": kind,
            "quality_before": before, "quality_after": after, "finetune_loss": tuned,
            "reconstruct": {name: None if e is None else {"error_before": e[0], "error_after": e[1]}
                            for name, e in refit.items()},
            "file_bytes": info["file_bytes"], "dense_equivalent_bytes": summ["dense_equivalent_bytes"],
            "compression": summ["compression"], "sizes": sizes, "size_note": size_note(sizes),
            "seconds": time.perf_counter() - t0, "allocation": args.allocation,
            "recovery": None if recovered is None else {
                "start": "oneshot" if oneshot_then_recover else "gradual",
                "step": recovered.step, "steps": recovered.steps, "done": recovered.done,
                "resumed_from": recovered.resumed_from, "seconds": recovered.elapsed,
                "first_loss": recovered.losses[0] if recovered.losses else None,
                "last_loss": recovered.losses[-1] if recovered.losses else None},
            "layers": [{"layer": l.name, "sparsity": l.sparsity, "params": l.params} for l in rep.layers]}
    text = "\n".join([
        str(rep),
        "",
        f"quality before: {_q(before)}   after: {_q(after)}",
        *([_recovery_line(recovered, args)] if recovered is not None else []),
        *([_refit_line(refit)] if refit else []),
        f"wrote {out} ({kind}): {_fmt_bytes(info['file_bytes'])}, {summ['compression']:.2f}x smaller than the "
        f"dense state_dict ({_fmt_bytes(summ['dense_equivalent_bytes'])}); "
        f"next: sparsert sparsify {out} -o {out.with_suffix('')}-fast.sparsert",
        f"size: {size_note(sizes)}",
    ])
    _emit(args, data, text)
    return 0


class _Recovered:
    """A recovery result read back from the planned path's numbers (for :func:`_recovery_line`)."""

    def __init__(self, step, steps, done, seconds, resumed_from, first_loss, last_loss, start=None):
        self.step, self.steps, self.done, self.elapsed, self.resumed_from = step, steps, done, seconds, resumed_from
        self.start = start
        self.losses = [] if first_loss is None else [first_loss, last_loss]


def _recovery_line(r, args) -> str:
    start = getattr(r, "start", None)
    line = (f"recovery{' (' + start + ')' if start else ''}: {r.step}/{r.steps} steps in {r.elapsed:.0f} s"
            + (f" (resumed from step {r.resumed_from})" if r.resumed_from else ""))
    if r.losses:
        line += f", distillation loss {r.losses[0]:.4g} -> {r.losses[-1]:.4g}"
    if not r.done:
        line += ("; PARTIAL (time budget spent): " + (
            "run the same command again to continue from the checkpoint" if args.checkpoint
            else "give --checkpoint DIR to continue a run later"))
    return line


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
    from .io.sizes import size_breakdown, size_note

    out = _check_output(args.output, program=True)
    wl = _resolve(args.model)
    if _has_sparse(wl.model):
        wl.model = densify(wl.model)
    inputs = _inputs(wl, args.example_shape)
    # a progress bar over the layers being timed (stderr, on a terminal only)
    sparse = sparsify(wl.model, format=args.format, example_inputs=inputs, min_speedup=args.min_speedup,
                      threads=args.threads, progress=_show_progress(args), precision=args.precision)
    plan = sparse.sparsity_plan
    notes = [n for n in [plan.kept_dense_note()] if n]
    if out.name.lower().endswith(PROGRAM_SUFFIX):
        program = io.export(sparse, inputs, out)
        written = {"path": str(out), "file_bytes": out.stat().st_size, "sparsert_ops": io.sparse_op_count(program)}
        sizes = None
    else:
        written = io.save(sparse, out)
        sizes = size_breakdown(out, sparse)
        notes.append(f"size: {size_note(sizes)}")
    data = {"model": wl.name, "output": written, "plan": plan.as_dicts(), "sizes": sizes, "notes": notes}
    text = "\n".join([plan.table(), f"wrote {out}: {_fmt_bytes(written['file_bytes'])}", *notes])
    _emit(args, data, text)
    return 0


def cmd_bench(args) -> int:
    from .bench import benchmark

    if args.plot:
        _check_plot(args.plot)  # before minutes of benchmarking, not after
    wl = _resolve(args.model, allow_pt2=True, trust_pickle=args.trust_pickle)
    if args.dense:
        dense = _resolve(args.dense, allow_pt2=True, trust_pickle=args.trust_pickle).model
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
    import matplotlib.pyplot as plt  # present: _check_plot ran first

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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {v}")
    return v


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .convert.streamline import FORWARDS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    models = "a built-in example (digits-mlp, digits-cnn, bert-base, minilm, smollm2), a Hugging Face model directory or a sparsert file"
    p = _Parser(prog=PROG, description="Prune, sparsify, benchmark and inspect sparse PyTorch models.")
    p.add_argument("--version", action="version", version=f"sparsert {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("prune", parents=[common], help="prune a model and write a sparsert file",
                       description=f"Prune MODEL ({models}) and write its pruned layers, packed, to OUT.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--sparsity", type=_sparsity, default=None, help="fraction of weights removed (default 0.9)")
    s.add_argument("--importance", default=None,
                   help="magnitude, gradient, taylor, activation, hessian, fisher, wanda, sparsegpt (default "
                        "magnitude; with --target-speedup: sparsegpt for Hugging Face models, else magnitude)")
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
    s.add_argument("--lr", type=_positive_float, default=1e-3, help="fine-tuning learning rate")
    s.add_argument("--allocation", choices=["uniform", "owl", "sensitivity"], default="uniform",
                   help="how the sparsity is spread over the layers: the same everywhere, OWL (outlier-weighted) "
                        "or by measured sensitivity; the mean stays --sparsity (default uniform)")
    s.add_argument("--recover-minutes", type=_nonneg_float, default=0.0,
                   help="recovery: prune gradually (with --target-speedup: see --recover-start) "
                        "while distilling from the dense model on the example's training "
                        "text, for at most this many minutes (default 0: one-shot pruning)")
    s.add_argument("--recover-start", choices=["auto", "oneshot", "gradual"], default=None,
                   help="with --target-speedup: oneshot = prune to the plan at once, then distil with the masks "
                        "fixed; gradual = raise each layer to its planned sparsity while distilling; auto "
                        "(default) = gradual when the budget holds 1500 steps or more (about 20 min for MiniLM "
                        "on 2 cores), else oneshot")
    s.add_argument("--recover-steps", type=_positive_int, default=None,
                   help="recovery optimizer steps in all (the schedules span them; default 2000; with "
                        "--target-speedup: as many as fit --recover-minutes, from a timed probe)")
    s.add_argument("--recover-prune-frac", type=_fraction, default=None,
                   help="share of the recovery steps over which the sparsity ramps up (default 0.5)")
    s.add_argument("--recover-lr", type=_positive_float, default=None,
                   help="recovery peak learning rate (default 1e-3 for sentence encoders and after one-shot "
                        "pruning, else 1e-4)")
    s.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="recovery checkpoint folder: written as the run goes; the same command again continues "
                        "where the last one stopped")
    s.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="recovery steps between checkpoints (default 100)")
    s.add_argument("-o", "--output", required=True, metavar="OUT", help="sparsert file to write (.sparsert)")
    # the latency-budget planner (sparsert.planner): instead of --sparsity and --pattern
    s.add_argument("--target-speedup", type=_positive_float, default=None, metavar="X",
                   help="plan per-layer sparsity and pattern from measured time tables to run X times faster "
                        "than --baseline, with the least estimated loss")
    s.add_argument("--baseline", choices=["best_dense", "torch"], default="best_dense",
                   help="what --target-speedup is measured against (default best_dense)")
    s.add_argument("--patterns", default="unstructured,4x1,2:4", help="patterns the planner may use (comma list)")
    s.add_argument("--example-shape", metavar="SHAPE", help="input shape the planner times (default: the model's)")
    s.add_argument("--threads", type=_positive_int, default=None, help="threads for timing and measuring")
    s.add_argument("--plot-plan", metavar="PNG", help="write the planner's speed/quality frontier")
    s.add_argument("--score-candidates", type=int, default=4, metavar="N",
                   help="candidate plans the planner prunes on a copy and scores by the model's output error on "
                        "held-out text before choosing (default 4; 0: the solver's plan unscored)")
    s.add_argument("--score-batches", type=int, default=8, metavar="N",
                   help="batches of 32 training-split sentences, none used for calibration, that score the "
                        "candidates (default 8; 0 or a model without a tokenizer: a quarter of the calibration "
                        "batches is held out instead)")
    s.add_argument("--score-metric", choices=["cosine", "pooled_cosine", "mse"], default=None,
                   help="what the candidates are chosen by: 1 - cosine of the output vectors (tokens' hidden states, "
                        "logits), of each sample's outputs averaged over its tokens (a sentence embedding), or the "
                        "relative squared error (default: pooled_cosine for sentence encoders, else cosine)")
    s.add_argument("--calibrate-groups", action="store_true",
                   help="with --score-candidates: also probe each layer group (the same layer of every block) "
                        "pruned alone, weight the per-layer losses by the output error that left, and score the "
                        "solver's plans on them as two more candidates")
    s.add_argument("--forward", choices=FORWARDS, default="streamlined",
                   help="with --target-speedup: time the model while planning, and measure it at the end, through "
                        "sparsert.streamline's lean forward as `sparsert serve` runs it (default; BERT-style "
                        "encoders and LLaMA-style causal LMs) or through its own forward ('hf')")
    s.add_argument("--measure-candidates", action="store_true",
                   help="with --score-candidates: also pack and time each candidate end to end; one measured "
                        "below 90%% of the target does not win (use on an idle machine)")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("sparsify", parents=[common], help="choose each layer's fastest format and save it",
                       description=f"Time each pruned layer of MODEL ({models}) in every candidate format, keep "
                                   "the fastest and write OUT (a sparsert file, or a torch.export program if OUT "
                                   "ends in .pt2).")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--example-shape", metavar="SHAPE", help="input shape, e.g. 1x128 (token ids) or 64x1x8x8")
    s.add_argument("--format", default="auto", help="auto (time the candidates) or csr, bsrRxC, nmN:M for all")
    s.add_argument("--min-speedup", type=_positive_float, default=1.05,
                   help="keep a layer dense unless this much faster (default 1.05)")
    s.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: pruned Linear layers choose between int8 sparse (q8bsr1x4) and torch's dynamic "
                        "int8 dense; the other Linear layers run int8 dense (default fp32)")
    s.add_argument("--threads", type=_positive_int, default=None, help="threads for timing")
    s.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="sparsert file (.sparsert) or torch.export program (.pt2) to write")
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
    s.add_argument("--trust-pickle", action="store_true",
                   help="load .pt2 archives with pickled parts (unpickling runs code: only for files you trust)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("inspect", parents=[common], help="per-layer formats, densities and bytes of a file",
                       description="Per-layer format, density and bytes of a sparsert file, and its compression.")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=cmd_inspect)

    from .serving.cli import add_serve_parser  # sparsert serve: all of it lives in sparsert.serving

    add_serve_parser(sub)
    return p


def _fail(where: str, msg: str, kind: str, status: int, as_json: bool) -> int:
    """Reports an error: one line on stderr, and under --json also one JSON object on stdout."""
    print(f"{where}: error: {msg}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": msg, "type": kind, "command": where, "exit_status": status}))
    return status


_EXPECTED = (CliError, ValueError, TypeError, KeyError, OSError, RuntimeError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(e.prog, str(e), "usage", 2, as_json)
    where = f"{PROG} {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _fail(where, "interrupted", "interrupted", 130, getattr(args, "json", as_json))
    except Exception as e:
        if os.environ.get("SPARSERT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing {msg}"
        if not isinstance(e, _EXPECTED):  # a bug, not the user's input
            msg = f"internal error ({type(e).__name__}: {msg}); SPARSERT_DEBUG=1 shows the traceback"
        kind = "input" if isinstance(e, CliError) else type(e).__name__
        return _fail(where, msg, kind, 1, getattr(args, "json", as_json))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
