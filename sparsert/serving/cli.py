"""``sparsert serve FILE``: the command-line entry of the serving package (registered by sparsert.cli)."""

from __future__ import annotations

import argparse

from .engine import DENSE_PATHS, FORWARDS, MINILM_TOKENIZER, SMOLLM2_TOKENIZER, TOKENIZER_SUFFIX
from .threads import DEFAULT_WORKER_NICE, RULE, usable_cores

__all__ = ["add_serve_parser", "cmd_serve"]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``serve`` subcommand to ``sub`` (an argparse subparsers object)."""
    cores = len(usable_cores())
    s = sub.add_parser(
        "serve", help="serve a sparsert file over HTTP (LitServe; Ray Serve with --ray)",
        description="Serve FILE over HTTP: POST /v1/embeddings (OpenAI-compatible, sentence encoders with a "
                    "tokenizer), POST /v1/completions (OpenAI-compatible, 'stream' as server-sent events; causal "
                    "LMs such as a pruned SmolLM2 with a tokenizer; batch 1 per request), "
                    "POST /predict (named tensors as JSON), GET /health (ready after load and warm-up), "
                    "GET /metrics (Prometheus). A file that fails validation stops the server from starting. "
                    f"Threads: {RULE} (here C = {cores}). Needs: pip install 'sparsert[serve]'.")
    s.add_argument("file", metavar="FILE", help="a sparsert file (sparsert prune / sparsify -o FILE)")
    s.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="address to listen on (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_positive, default=8000, help="port (default 8000)")
    s.add_argument("--workers", type=_positive, default=None,
                   help="model worker processes (default: 1, or C / --threads-per-worker)")
    s.add_argument("--threads-per-worker", type=_positive, default=None,
                   help="intra-op threads per worker (default: C / workers); workers x threads <= C")
    s.add_argument("--max-batch-size", type=_positive, default=8,
                   help="requests run together in one model call (default 8)")
    s.add_argument("--batch-timeout-ms", type=_nonneg_float, default=2.0,
                   help="how long a worker waits to fill a batch (default 2 ms)")
    s.add_argument("--max-queue", type=_positive, default=256,
                   help="requests in flight before new ones get 503 (default 256)")
    s.add_argument("--max-body-bytes", type=_positive, default=1 << 20,
                   help="largest request body; larger gets 413 (default 1 MiB)")
    s.add_argument("--max-tokens", type=_positive, default=None,
                   help="tokens per input text or prompt (default: the model's position limit); more gets 400")
    s.add_argument("--max-completion-tokens", type=_positive, default=256,
                   help="largest 'max_tokens' a completion may ask for (default 256); more gets 400")
    s.add_argument("--tokenizer", default=None,
                   help=f"tokenizer directory for /v1/embeddings and /v1/completions, {MINILM_TOKENIZER!r} for "
                        f"all-MiniLM-L6-v2's or {SMOLLM2_TOKENIZER!r} for SmolLM2-135M's "
                        f"(default: FILE{TOKENIZER_SUFFIX}/ beside FILE if it exists)")
    s.add_argument("--dense-path", choices=DENSE_PATHS, default="best",
                   help="plain dense Linear layers run on sparsert's best dense path (default: per layer the "
                        "faster of prepacked oneDNN and eager F.linear, timed at start-up) or torch eager")
    s.add_argument("--forward", choices=FORWARDS, default="streamlined",
                   help="BERT-style encoders and LLaMA-style causal LMs run sparsert.streamline's lean forward "
                        "(default: the same results without Hugging Face's per-call framework code) or Hugging "
                        "Face's own ('hf')")
    s.add_argument("--worker-nice", type=int, choices=range(0, 20), default=DEFAULT_WORKER_NICE, metavar="0..19",
                   help=f"lower the model workers' CPU priority by this much (default {DEFAULT_WORKER_NICE}), so the HTTP process "
                        "answers overload (503) and relays answers without waiting behind a running batch; "
                        "0 keeps them equal (LitServe only)")
    s.add_argument("--name", default=None, help="model name in answers and metrics (default: FILE's stem)")
    s.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of LitServe")
    s.add_argument("--replicas", type=_positive, default=1, help="Ray Serve replicas (with --ray; default 1)")
    s.set_defaults(func=cmd_serve)
    return s


def cmd_serve(args) -> int:
    common = dict(tokenizer=args.tokenizer, max_tokens=args.max_tokens, name=args.name,
                  max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                  max_queue=args.max_queue, max_completion_tokens=args.max_completion_tokens,
                  dense_path=args.dense_path, forward=args.forward)
    if args.ray:
        from .ray_serve import run_ray

        run_ray(args.file, host=args.host, port=args.port, replicas=args.replicas,
                threads_per_replica=args.threads_per_worker, **common)
        return 0
    from .litserve_app import serve

    serve(args.file, host=args.host, port=args.port, workers=args.workers, threads_per_worker=args.threads_per_worker,
          max_body_bytes=args.max_body_bytes, worker_nice=args.worker_nice, **common)
    return 0
