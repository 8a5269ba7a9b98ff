"""An offline corpus of unlabeled English text, from what installed packages carry.

Pruning needs calibration text, recovery needs training text, and honest
evaluation needs text from a *different source* than either. This builder
takes prose sentences from documentation that ships with installed
packages — no download:

| source | where the text comes from | split |
| ------ | ------------------------- | ----- |
| `stdlib` | docstrings of the Python standard library, and its language reference (``pydoc_data.topics``, the text behind ``help("topic")``) | `calibration`, `train`, `recovery` |
| `sympy`, `networkx`, `sklearn`, `matplotlib` | docstrings of those packages, where installed | `train`, `recovery` |
| `transformers`, `ray`, `IPython`, `hypothesis`, `pydantic`, `docutils`, `jinja2`, `click`, `pygments`, `rich`, `fastapi` | docstrings of those packages, where installed | `recovery` |
| `numpy`, `scipy`, `torch` | docstrings of numpy's and scipy's sub-packages, torch, ``torch.nn``, ... | `eval` |

The split is **by source**: calibration text comes only from the standard
library, training text (``"train"``) from the standard library and four
scientific packages, and evaluation text (``"eval"``) only from
numpy/scipy/torch. Any evaluation sentence that also occurs in the
calibration or training text (case- and space-insensitive) is dropped from
``"eval"``. ``"recovery"`` is the larger training text for long distillation
runs: ``"train"`` plus eleven more packages' docs; any sentence of those
eleven that occurs in the evaluation sources is dropped (so ``"eval"`` stays
exactly what it was, and the two never overlap). Within a split, sentences
keep their extraction order (sentences of one docstring stay together, which
language-model perplexity needs); ``shuffled=True`` gives a seeded shuffle.
A source whose package is not installed contributes nothing.

A sentence is kept when it is prose: 6–60 words, starts with a capital
letter, ends with ``.``/``!``/``?``, and has few code characters. Extraction
is deterministic for a given set of package versions; the result is cached
under ``~/.cache/sparsert/corpus`` (``SPARSERT_CACHE`` overrides), keyed by
the versions.

```python
from sparsert.data import corpus
train = corpus.split("train")            # ~23,000 sentences
more = corpus.split("recovery")          # ~37,000: "train" and eleven more packages' docs
held = corpus.split("eval", n=400, shuffled=True, seed=0)
corpus.describe()                        # {source: count}
```
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import random
import re
import sys
import warnings
from pathlib import Path

__all__ = ["SOURCES", "SPLITS", "sentences", "split", "describe", "extract_sentences", "cache_dir"]

SPLITS: dict[str, tuple[str, ...]] = {
    "calibration": ("stdlib",),
    "train": ("stdlib", "sympy", "networkx", "sklearn", "matplotlib"),
    "eval": ("numpy", "scipy", "torch"),
}
#: more packages' prose for long recovery runs (a source is named as its module is imported)
_RECOVERY_EXTRA = ("transformers", "ray", "IPython", "hypothesis", "pydantic", "docutils", "jinja2", "click",
                   "pygments", "rich", "fastapi")
SPLITS["recovery"] = SPLITS["train"] + _RECOVERY_EXTRA
#: the splits that evaluation text must never overlap
_TRAINING_SPLITS = ("calibration", "train")

_NUMPY = ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial",
          "numpy.polynomial.polynomial", "numpy.lib", "numpy.lib.recfunctions", "numpy.strings", "numpy.char",
          "numpy.testing", "numpy.dtypes", "numpy.exceptions", "numpy.emath"]
_SCIPY = ["scipy.cluster.hierarchy", "scipy.cluster.vq", "scipy.constants", "scipy.fft", "scipy.integrate",
          "scipy.interpolate", "scipy.io", "scipy.linalg", "scipy.ndimage", "scipy.optimize", "scipy.signal",
          "scipy.sparse", "scipy.sparse.linalg", "scipy.sparse.csgraph", "scipy.spatial", "scipy.special",
          "scipy.stats", "scipy.odr", "scipy.differentiate", "scipy.datasets"]
_TORCH = ["torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.nn.utils", "torch.optim",
          "torch.optim.lr_scheduler", "torch.utils.data", "torch.distributions", "torch.linalg", "torch.fft",
          "torch.sparse", "torch.autograd", "torch.special", "torch.cuda", "torch.distributed", "torch.jit",
          "torch.export", "torch.fx", "torch.profiler", "torch.hub", "torch.random", "torch.testing",
          "torch.backends", "torch.quantization", "torch.amp", "torch.func", "torch.library", "torch.serialization",
          "torch.multiprocessing", "torch.onnx", "torch.nn.parallel", "torch.overrides"]
# stdlib modules that act on import (open a browser, print, start a GUI) or are tests/tools
_STDLIB_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test",
                "pydoc_data", "ensurepip", "venv", "msilib", "winreg", "winsound", "msvcrt", "_winapi",
                "nt", "__main__", "__future__", "sre_compile", "sre_constants", "sre_parse", "asynchat",
                "asyncore", "smtpd", "imp", "distutils", "crypt", "nntplib", "telnetlib", "cgi", "cgitb",
                "pipes", "sndhdr", "spwd", "sunau", "uu", "xdrlib", "nis", "ossaudiodev", "audioop", "chunk",
                "imghdr", "mailcap", "aifc"}


def _stdlib_modules() -> list[str]:
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_")
                   and n not in _STDLIB_SKIP)
    extra = ["collections.abc", "concurrent.futures", "email.message", "email.utils", "http.client",
             "http.server", "http.cookies", "importlib.metadata", "importlib.resources", "json.decoder",
             "logging.handlers", "logging.config", "multiprocessing.pool", "os.path", "unittest.mock",
             "urllib.parse", "urllib.request", "xml.dom.minidom", "xml.etree.ElementTree", "asyncio.tasks",
             "asyncio.streams", "asyncio.events", "dataclasses", "wsgiref.simple_server", "sqlite3.dbapi2"]
    return names + [e for e in extra if e not in names]


def _package_modules(root: str, limit: int = 400) -> list[str]:
    """``root`` and its public sub-modules (sorted, at most ``limit``), found without importing them."""
    import pkgutil

    try:
        spec = importlib.util.find_spec(root)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return [root] if spec is not None else []
    names = [root]

    def walk(paths, prefix):
        for info in sorted(pkgutil.iter_modules(paths), key=lambda i: i.name):
            if info.name.startswith("_") or info.name in ("tests", "test", "testing", "conftest", "benchmarks"):
                continue
            names.append(prefix + info.name)
            if info.ispkg:
                walk([os.path.join(p, info.name) for p in paths], prefix + info.name + ".")

    walk(list(spec.submodule_search_locations), root + ".")
    return sorted(names)[:limit]


SOURCES: dict[str, "callable"] = {
    "stdlib": _stdlib_modules,
    "sympy": lambda: _package_modules("sympy"),
    "networkx": lambda: _package_modules("networkx"),
    "sklearn": lambda: _package_modules("sklearn"),
    "matplotlib": lambda: _package_modules("matplotlib"),
    "numpy": lambda: _NUMPY,
    "scipy": lambda: _SCIPY,
    "torch": lambda: _TORCH,
    **{name: (lambda root=name: _package_modules(root)) for name in _RECOVERY_EXTRA},
}

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r"[{}\[\]=<>`*|#@~^\\]|\.\.|\d{5,}|https?:|::|>>>|\)\w")
_ABBREV = re.compile(r"\b(e\.g|i\.e|etc|cf|vs|approx|resp|Eq|eq|Fig|Ref|No|al)\.$")


def _docs_of_module(name: str):
    """Docstrings of a module, its public functions and classes, and the classes' methods."""
    try:
        mod = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - optional or platform-specific parts may be missing
        return
    seen: set[int] = set()

    def doc(obj):
        if id(obj) in seen:
            return ""
        seen.add(id(obj))
        try:
            return inspect.getdoc(obj) or ""
        except Exception:  # noqa: BLE001
            return ""

    yield doc(mod)
    try:
        attrs = sorted(a for a in dir(mod) if not a.startswith("_"))
    except Exception:  # noqa: BLE001
        return
    for attr in attrs:
        try:
            obj = getattr(mod, attr)
        except Exception:  # noqa: BLE001
            continue
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj) or callable(obj):
            yield doc(obj)
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                member = vars(obj)[meth]
                if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)):
                    yield doc(getattr(member, "__func__", member))


def _texts(source: str):
    if source == "stdlib":
        try:
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield topics[key]
        except Exception:  # noqa: BLE001
            pass
    for name in SOURCES[source]():
        yield from _docs_of_module(name)


def _paragraphs(text: str):
    """Prose paragraphs: code samples, tables, directives and headings left out."""
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines:
            continue
        if any(ln.lstrip().startswith((">>>", "...", ".. ", "|", "+-", "--", "==", "$ ")) for ln in lines):
            continue
        if all(ln.startswith((" ", "\t")) for ln in lines if ln.strip()):
            continue  # an indented block: code or a literal
        yield " ".join(para.split())


def extract_sentences(text: str) -> list[str]:
    """The prose sentences of one docstring / document, in order."""
    out = []
    for para in _paragraphs(text):
        parts, buf = _SENT.split(para), ""
        for p in parts:  # re-join splits after abbreviations ("e.g. Foo")
            buf = f"{buf} {p}" if buf else p
            if _ABBREV.search(buf):
                continue
            s, buf = buf.strip(), ""
            words = s.split()
            if not 6 <= len(words) <= 60 or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if _CODE.search(s):
                continue
            if sum(c.isalpha() or c == " " for c in s) / len(s) < 0.9:
                continue
            out.append(s)
    return out


def _key(s: str) -> str:
    return " ".join(s.lower().split())


def cache_dir() -> Path:
    root = os.environ.get("SPARSERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsert")
    return Path(root) / "corpus"


_BUILDER_VERSION = 3  # 3: each source extracted in a fresh interpreter


def _versions(source: str) -> str:
    import platform

    if source == "stdlib":
        return f"python-{platform.python_version()}"
    try:
        mod = importlib.import_module(source)
        return f"{source}-{getattr(mod, '__version__', '?')}"
    except Exception:  # noqa: BLE001
        return f"{source}-absent"


def _build_source(source: str) -> list[str]:
    """The source's sentences, extracted in a fresh interpreter: what a docstring says can depend
    on what the process imported before (importing SciPy appends an "Array API Standard Support"
    section to ``numpy.sinc.__doc__``), and the corpus must not. In this process only where a
    child process cannot run."""
    import subprocess

    code = ("import json, sys; from sparsert.data.corpus import _build_source_here; "
            "json.dump(_build_source_here(sys.argv[1]), sys.stdout)")
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the sparsert package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-c", code, source], capture_output=True, env=env, timeout=600,
                              check=True)
        return json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return _build_source_here(source)


def _build_source_here(source: str) -> list[str]:
    # importing every sub-module makes some packages (transformers) log and print pages of warnings
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = _extract_all(source)
    finally:
        logging.disable(logging.NOTSET)
    return out


def _extract_all(source: str) -> list[str]:
    """The source's sentences, deduplicated, in extraction order."""
    seen, out = set(), []
    for text in _texts(source):
        for s in extract_sentences(text):
            k = _key(s)
            if k not in seen:
                seen.add(k)
                out.append(s)
    return out


def sentences(source: str, *, cache: bool = True) -> list[str]:
    """All sentences of one source, in extraction order (deduplicated within the source)."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}")
    tag = hashlib.sha1(f"{_BUILDER_VERSION}|{_versions(source)}".encode()).hexdigest()[:12]
    path = cache_dir() / f"{source}-{tag}.json"
    if cache and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    out = _build_source(source)
    if cache and out:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(out), encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass
    return out


def split(name: str, n: int | None = None, *, shuffled: bool = False, seed: int = 0,
          cache: bool = True) -> list[str]:
    """The sentences of a split (one of :data:`SPLITS`), first ``n`` of them.

    ``"eval"`` never contains a sentence of ``"calibration"``, ``"train"`` or
    ``"recovery"`` (see the module docstring for how). Sources are
    interleaved round-robin so that a prefix mixes all of a split's sources.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLITS)}")
    lists = [sentences(s, cache=cache) for s in SPLITS[name]]
    if name == "eval":
        train = {_key(s) for sp in _TRAINING_SPLITS for src in SPLITS[sp] for s in sentences(src, cache=cache)}
        lists = [[s for s in lst if _key(s) not in train] for lst in lists]
    elif name not in _TRAINING_SPLITS:  # sources beyond the training splits' give way to the evaluation text
        trained = {src for sp in _TRAINING_SPLITS for src in SPLITS[sp]}
        held = {_key(s) for src in SPLITS["eval"] for s in sentences(src, cache=cache)}
        lists = [lst if src in trained else [s for s in lst if _key(s) not in held]
                 for src, lst in zip(SPLITS[name], lists)]
    # interleave in runs of 8 so that neighbouring sentences stay together
    out, seen = [], set()
    pos = [0] * len(lists)
    while any(p < len(lst) for p, lst in zip(pos, lists)):
        for i, lst in enumerate(lists):
            for s in lst[pos[i]:pos[i] + 8]:
                k = _key(s)
                if k not in seen:
                    seen.add(k)
                    out.append(s)
            pos[i] += 8
    if shuffled:
        random.Random(seed).shuffle(out)
    if n is not None:
        if n < 1:
            raise ValueError("n must be >= 1")
        if n > len(out):
            raise ValueError(f"split {name!r} has only {len(out)} sentences, asked for {n}")
        out = out[:n]
    return out


def describe(cache: bool = True) -> dict[str, int]:
    """``{source: number of sentences}``."""
    return {s: len(sentences(s, cache=cache)) for s in SOURCES}
