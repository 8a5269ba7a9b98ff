"""Helpers for the serving tests: small model files and a real server on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

import sparsert

WORDS = ("the a sparse model runs fast on small machines and every layer keeps its weights zero one two three "
         "kernels serve text with batches of tokens hello world data is here test").split()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bert_file(folder: Path, sparsity: float = 0.8) -> Path:
    """A 2-layer BERT (hidden 32) with 80%-pruned encoder Linears, sparsified to CSR, saved with its tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from sparsert.serving import save_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tok("hello world")["input_ids"] == [2, words.index("hello"), words.index("world"), 3]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("encoder."):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values] = 0
    sparse = sparsert.sparsify(model, format="csr")
    path = folder / "tiny-bert.sparsert"
    sparsert.save(sparse, path)
    save_tokenizer(tok, path)
    return path


def smollm2_tokenizer_reason() -> str | None:
    """Why SmolLM2's tokenizer cannot be read here (for a skip), or ``None``."""
    from sparsert.models import smollm2

    try:
        smollm2.gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        return str(e)
    for pkg in ("transformers", "gguf"):
        try:
            __import__(pkg)
        except ImportError:
            return f"SmolLM2's tokenizer needs {pkg!r}: pip install {pkg}"
    return None


def tiny_llama_file(folder: Path, sparsity: float = 0.8) -> Path:
    """A 2-block Llama (hidden 64, SmolLM2's vocabulary, 256 positions), randomly initialised (offline,
    no weights downloaded) with 80%-pruned block Linears, sparsified to CSR and saved with SmolLM2's
    tokenizer. A wide initialisation keeps its greedy output varied rather than one repeated token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsert.serving import load_tokenizer, save_tokenizer

    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values] = 0
    sparse = sparsert.sparsify(model, format="csr")
    path = folder / "tiny-llama.sparsert"
    sparsert.save(sparse, path)
    save_tokenizer(tok, path)
    return path


def process_tree_stats(root_pid: int) -> tuple[list[str], dict[int, list[str]]]:
    """The /proc/PID/stat fields (after the command name) of ``root_pid``, and of each of its
    descendants by pid (Linux)."""
    parent, stats = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(entry)], stats[int(entry)] = int(fields[1]), fields
    seen, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        seen += kids
        todo += kids
    return stats[root_pid], {p: stats[p] for p in seen}


def server_processes(root_pid: int) -> dict[str, dict[int, list[str]]]:
    """A ``sparsert serve`` process tree's /proc stat fields by pid, split into ``workers`` (the model
    processes, which LitServe starts with multiprocessing's spawn) and ``http`` (the rest: the HTTP
    process that parses, tokenises and relays, LitServe's main process and its idle helpers)."""
    root, tree = process_tree_stats(root_pid)
    split = {"workers": {}, "http": {root_pid: root}}
    for pid, fields in tree.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            spawned = False
        split["workers" if spawned else "http"][pid] = fields
    return split


def server_cpu_seconds(root_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of a ``sparsert serve`` process tree: ``workers`` and ``http``
    as :func:`server_processes` splits them (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    return {role: sum(int(f[11]) + int(f[12]) for f in procs.values()) / tick
            for role, procs in server_processes(root_pid).items()}


def sentences(n: int, words: int = 6, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (words + k % 4,), generator=g))
            for k in range(n)]


class Server:
    """``sparsert serve FILE ...`` in a subprocess on 127.0.0.1:<free port>; ``stop()`` sends SIGTERM."""

    def __init__(self, model_file: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sparsert", "serve", str(model_file), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.log = open(Path(model_file).with_suffix(f".{self.port}.log"), "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(OSError):
                if self.get("/health")[0] == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path, timeout=5.0)

    def post(self, path: str, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, raw = self.request("POST", path, body)
        return status, json.loads(raw)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server's own process group only
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
