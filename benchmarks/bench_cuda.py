"""sparsert CUDA kernels vs torch dense and torch.sparse, bf16, one table.

    python benchmarks/bench_cuda.py                 # ~2-4 minutes on an H100
    python benchmarks/bench_cuda.py --quick         # 2 token counts, seconds

Weights (out x in): 4096x4096 and 4096x11008 (and their transpose with
--both-orientations). Per token count, every method computes
``x @ W.T`` for the same pruned bf16 weight in the same process:

- dense:      torch ``F.linear`` on the pruned weight stored dense (the baseline);
- bsrRxC:     sparsert BSR at 90% block sparsity, 32x32 and 64x64 blocks (tensor cores);
- csr:        sparsert CSR at 90% unstructured sparsity;
- 2:4:        sparsert N:M 2:4 (torch's ``to_sparse_semi_structured`` under our op);
- t.csr, t.bsrRxC: ``torch.sparse`` CSR / BSR tensors (the weights of csr and of
  the first BSR block) with ``torch.mm``.

Times are medians of CUDA-event timings of batches of back-to-back calls
after warm-up, divided by the batch size; with ``--graphs`` (default) each
batch is replayed from a CUDA graph so Python launch overhead is not
measured (a method whose capture fails is timed eagerly and marked ``*``).
Cells show microseconds and the speedup vs dense (``x``). Each method's
output is checked against dense once per shape; a mismatch is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sparsert.ops  # noqa: E402
from sparsert.formats import BSR, CSR, NM  # noqa: E402

TOKENS = [1, 4, 16, 64, 256, 1024, 2048, 4096]
SHAPES = [(4096, 4096), (4096, 11008)]


def make_weights(rows, cols, blocks, sparsity, gen):
    """Dense bf16-valued weights pruned per pattern (on the CPU, where sparsert
    packs): "bsrRxC" for each block, "csr", "24"."""
    w = torch.randn(rows, cols, generator=gen) * 0.02
    out = {}
    for r, c in blocks:
        keep_blocks = torch.rand(-(-rows // r), -(-cols // c), generator=gen) >= sparsity
        out[f"bsr{r}x{c}"] = w * keep_blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    out["csr"] = w * (torch.rand(rows, cols, generator=gen) >= sparsity)
    pairs = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                         dtype=w.dtype)  # the six ways to keep 2 of 4
    out["24"] = w * pairs[torch.randint(0, 6, (rows, cols // 4), generator=gen)].reshape(rows, cols)
    return {k: v.to(torch.bfloat16).float() for k, v in out.items()}


def timed(fn, graphs, budget_s):
    """Median microseconds per call, and whether a CUDA graph was used."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    batch = int(min(max(2e-3 / once, 1), 200))       # ~2 ms per batch
    reps = int(min(max(budget_s / (once * batch), 3), 25))
    run = None
    used_graph = False
    if graphs:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(batch):
                    fn()
            run, used_graph = graph.replay, True
        except Exception:  # noqa: BLE001 - any capture failure: time eagerly instead
            torch.cuda.synchronize()
            run = None
    if run is None:
        def run():
            for _ in range(batch):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / batch)
    return statistics.median(times), used_graph


def _sparsert(fmt):
    return lambda x: sparsert.ops.linear(x, fmt)


def methods_for(weights, blocks, device):
    """name -> (fn(x), key of the weight it computes with); dense weights by key."""
    bf16 = torch.bfloat16
    dense = {k: v.to(device, bf16) for k, v in weights.items()}
    out = {"dense": (lambda x: F.linear(x, dense["csr"]), "csr")}
    for r, c in blocks:
        key = f"bsr{r}x{c}"
        out[key] = (_sparsert(BSR.from_dense(weights[key], (r, c)).to(device, dtype=bf16)), key)
    out["csr"] = (_sparsert(CSR.from_dense(weights["csr"]).to(device, dtype=bf16)), "csr")
    out["2:4"] = (_sparsert(NM.from_dense(weights["24"], 2, 4).to(device, dtype=bf16)), "24")
    try:
        t_csr = dense["csr"].to_sparse_csr()
        out["t.csr"] = (lambda x: torch.mm(t_csr, x.t()).t(), "csr")
    except (RuntimeError, NotImplementedError) as err:
        print(f"  torch.sparse CSR unavailable: {err}", file=sys.stderr)
    key = f"bsr{blocks[0][0]}x{blocks[0][1]}"
    probe = torch.randn(16, dense[key].shape[1], device=device, dtype=bf16)
    try:
        t_bsr = dense[key].to_sparse_bsr(blocks[0])
        fn = lambda x: torch.mm(t_bsr, x.t()).t()  # noqa: E731
        try:
            fn(probe)
        except (RuntimeError, NotImplementedError):
            # cuSPARSE's BSR product has no bf16; torch's own bf16 BSR kernel is Triton's.
            from torch.sparse._triton_ops import bsr_dense_mm
            fn = lambda x: bsr_dense_mm(t_bsr, x.t()).t()  # noqa: E731
            fn(probe)
        out[f"t.{key}"] = (fn, key)
    except (RuntimeError, NotImplementedError, ImportError, ValueError, TypeError) as err:
        print(f"  torch.sparse BSR unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    return out, dense


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--blocks", nargs="+", default=["32x32", "64x64"], help="BSR blocks, RxC (default 32x32 64x64)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--both-orientations", action="store_true", help="also 11008x4096")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds of timing per cell (default 0.15)")
    ap.add_argument("--quick", action="store_true", help="tokens 16 and 2048 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA GPU")
    device = torch.device("cuda")
    blocks = [tuple(int(v) for v in b.lower().split("x")) for b in args.blocks]
    tokens_list = [16, 2048] if args.quick else args.tokens
    shapes = SHAPES + ([(11008, 4096)] if args.both_orientations else [])
    gen = torch.Generator().manual_seed(0)
    props = torch.cuda.get_device_properties(device)
    print(f"# {props.name}, torch {torch.__version__}, bf16, sparsity {args.sparsity:.0%} (BSR {' '.join(args.blocks)}, CSR), "
          f"2:4; graphs={'on' if args.graphs else 'off'}; us per call and speedup vs dense F.linear")
    header = None
    for rows, cols in shapes:
        weights = make_weights(rows, cols, blocks, args.sparsity, gen)
        methods, dense = methods_for(weights, blocks, device)
        names = list(methods)
        if header is None:
            header = f"| {'shape':>11} | {'tokens':>6} | " + " | ".join(f"{n:>15}" for n in names) + " |"
            print(header)
            print("|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|")
        # correctness once per shape
        x = torch.randn(16, cols, device=device, dtype=torch.bfloat16)
        for name, (fn, wkey) in list(methods.items()):
            try:
                ref = F.linear(x.float(), dense[wkey].float())
                err = (fn(x).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                if err > 2e-2:
                    print(f"  MISMATCH {name} {rows}x{cols}: max rel error {err:.3g}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - report and drop the method
                print(f"  {name} failed on {rows}x{cols}: {type(exc).__name__}: {exc}", file=sys.stderr)
                methods.pop(name)
        for tokens in tokens_list:
            x = torch.randn(tokens, cols, device=device, dtype=torch.bfloat16)
            cells, base = [], None
            for name in names:
                if name not in methods:
                    cells.append(f"{'n/a':>15}")
                    continue
                fn = methods[name][0]
                try:
                    us, graphed = timed(lambda: fn(x), args.graphs, args.budget)
                except Exception as exc:  # noqa: BLE001
                    print(f"  {name} failed at {tokens} tokens: {type(exc).__name__}: {exc}", file=sys.stderr)
                    cells.append(f"{'error':>15}")
                    continue
                base = us if name == "dense" else base
                mark = "" if graphed or not args.graphs else "*"
                ratio = f"{base / us:.2f}x" if base else "-"
                cells.append(f"{f'{us:.1f}{mark} {ratio}' if name != 'dense' else f'{us:.1f}{mark}':>15}")
            print(f"| {f'{rows}x{cols}':>11} | {tokens:>6} | " + " | ".join(cells) + " |", flush=True)
        del methods, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
