"""Every BSR block shape against CSR on the same weights: no cliffs.

    python benchmarks/bench_block_shapes.py                 # 2 threads, wall clock
    python benchmarks/bench_block_shapes.py --threads 1     # this thread's CPU time (shared machine)
    python benchmarks/bench_block_shapes.py --blocks 16x16 8x8 --tokens 128

For each layer shape, block sparsity, token count and block shape, one weight
is pruned in whole R x C blocks and packed twice: as CSR and as BSR R x C.
Both run through sparsert's own kernel selection (the kernel each one would
get in a model) and are timed round-robin in this process; a cell is
CSR time / BSR time (>= 1: the block format is at least as fast as CSR).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsert._ext import native  # noqa: E402
from sparsert.bench import random_pruned_weight  # noqa: E402
from sparsert.formats import BSR, CSR  # noqa: E402
from sparsert.ops.backends.cpu import linear_bsr_cpu  # noqa: E402

from harness import cpu_name, git_commit, time_methods  # noqa: E402

SHAPES = [(768, 3072), (3072, 768)]  # (in_features, out_features)
BLOCKS = ["1x4", "4x1", "2x2", "8x1", "1x8", "4x4", "8x8", "16x1", "1x16", "16x16", "32x1", "3x5"]
SPARSITIES = [0.7, 0.9]
TOKENS = [1, 16, 128]


def _runner(fmt, x, threads):
    row_ptr, col_idx, values, r, c = fmt.kernel_arrays()
    rows = fmt.shape[0]
    return lambda: linear_bsr_cpu(x, row_ptr, col_idx, values, rows, r, c, None, 0, threads)


def run(shapes, blocks, sparsities, tokens_list, threads, rounds):
    clock = time.thread_time if threads == 1 else time.perf_counter
    rows = []
    for in_f, out_f in shapes:
        for sparsity in sparsities:
            for block in blocks:
                r, c = (int(v) for v in block.split("x"))
                w = random_pruned_weight(out_f, in_f, sparsity, block=(r, c))
                csr, bsr = CSR.from_dense(w), BSR.from_dense(w, (r, c))
                for tokens in tokens_list:
                    x = torch.randn(tokens, in_f)
                    t = time_methods({"csr": _runner(csr, x, threads), "bsr": _runner(bsr, x, threads)},
                                     rounds=rounds, clock=clock)
                    kernel = native().select_kernel(r, c, tokens)
                    rows.append(dict(shape=f"{in_f}->{out_f}", sparsity=sparsity, block=block, tokens=tokens,
                                     csr_us=t["csr"] * 1e6, bsr_us=t["bsr"] * 1e6,
                                     ratio=t["csr"] / t["bsr"], kernel=kernel))
                    print(f"{in_f}->{out_f} {sparsity:.0%} {block:>5} {tokens:4d} tok: csr {t['csr'] * 1e6:9.1f} us"
                          f"  bsr {t['bsr'] * 1e6:9.1f} us  csr/bsr {t['csr'] / t['bsr']:5.2f}x  ({kernel})",
                          flush=True)
    return rows


def markdown(rows, threads):
    lines = [f"Block shapes vs CSR on the same weights ({datetime.date.today()}, {cpu_name()}, commit "
             f"{git_commit()}, fp32, {threads} thread(s)); cell = CSR time / BSR time, >= 1 is no cliff.", ""]
    keys = sorted({(r["shape"], r["sparsity"], r["tokens"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2]))
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    lines.append("| layer | sparsity | tokens | " + " | ".join(blocks) + " |")
    lines.append("|---|---|---|" + "---|" * len(blocks))
    for key in keys:
        cells = {r["block"]: r["ratio"] for r in rows if (r["shape"], r["sparsity"], r["tokens"]) == key}
        lines.append(f"| {key[0]} | {key[1]:.0%} | {key[2]} | "
                     + " | ".join(f"{cells[b]:.2f}" if b in cells else "" for b in blocks) + " |")
    worst = min(rows, key=lambda r: r["ratio"])
    lines += ["", f"Worst: {worst['block']} on {worst['shape']} at {worst['sparsity']:.0%}, {worst['tokens']} "
              f"tokens: {worst['ratio']:.2f}x ({worst['kernel']}); median over all cells "
              f"{statistics.median(r['ratio'] for r in rows):.2f}x."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks", nargs="+", default=BLOCKS, metavar="RxC")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES], metavar="INxOUT")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = run(shapes, args.blocks, args.sparsities, args.tokens, args.threads, args.rounds)
    table = markdown(rows, args.threads)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
