"""Loading ``transformers`` models offline and quietly (one home for the set-up
the catalogue, MiniLM and SmolLM2 loaders share)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def offline_quiet():
    """Offline hub, errors-only logging and no "Loading weights" bars (noise in the CLI's
    output and logs) inside the block; logging and bars are restored after it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
