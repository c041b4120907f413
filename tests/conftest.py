"""Shared test setup: offline Hub, deterministic CPU, helpers importable as `helpers`."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Tiny models: one intra-op thread is faster, and does not spin against other processes on a
# small shared CPU (two spinning threads made some tests tens of times slower).
torch.set_num_threads(int(os.environ.get("SDKIT_TEST_THREADS", "1")))
