"""Test-wide settings: offline hub, Triton's CPU interpreter, deterministic threads.

TRITON_INTERPRET must be set before any module that defines Triton kernels is imported.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

# Reference fixtures for the converters: $TOKENLOOM_FIXTURES, default ../shared/fixtures beside the repository.
os.environ.setdefault("TOKENLOOM_FIXTURES", str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
