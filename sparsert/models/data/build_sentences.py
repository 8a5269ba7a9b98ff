"""Regenerate ``sentences.txt``: real English sentences, offline.

Source: the documentation prose shipped inside installed packages — the
scikit-learn dataset descriptions (``sklearn/datasets/descr/*.rst``) and the
docstrings of Python standard-library modules, functions and classes. Prose
sentences only (8–40 words, starting with a capital letter, ending with a
full stop, no code characters). The committed file was produced with
Python 3.11 and scikit-learn 1.9; re-running on other versions gives a
slightly different set, which is why the file is committed.

    python sparsert/models/data/build_sentences.py
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from pathlib import Path

MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox",
    "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "queue", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "zipfile", "zlib",
]

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BAD = re.compile(r"[(){}\[\]=<>_`*|#@~^\\:;/]|\.\.|\d{3,}|https?|e\.g|i\.e|etc\.")


def _texts():
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    for f in sorted(descr.glob("*.rst")):
        yield f.read_text(encoding="utf-8")
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional stdlib parts may be missing
            continue
        yield inspect.getdoc(mod) or ""
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
                yield inspect.getdoc(obj) or ""


def build() -> list[str]:
    seen, out = set(), []
    for text in _texts():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            for s in _SENT.split(para):
                s = s.strip()
                words = s.split()
                if not (8 <= len(words) <= 40) or not s[0].isupper() or not s.endswith("."):
                    continue
                if _BAD.search(s) or s.lower() in seen:
                    continue
                if sum(c.isalpha() or c == " " for c in s) / len(s) < 0.93:
                    continue
                seen.add(s.lower())
                out.append(s)
    random.Random(0).shuffle(out)
    return out


if __name__ == "__main__":
    sents = build()[:800]
    path = Path(__file__).with_name("sentences.txt")
    path.write_text("\n".join(sents) + "\n", encoding="utf-8")
    print(f"wrote {len(sents)} sentences to {path}")
