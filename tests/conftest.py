"""Shared test setup: one model cache for the whole suite, quiet CPU defaults."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("EPRL_CACHE_DIR", str(REPO / ".cache" / "eprl"))
os.environ.setdefault("APPWORLD_CACHE", str(REPO / ".cache" / "appworld"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
