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


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (they run anyway where CI is set, as .ci/run sets it)")


def pytest_collection_modifyitems(config, items):
    """Tests marked openvino run last: with OpenVINO's runtime loaded into the process, two tests
    that came after it (a self-sent SIGTERM, an accelerate launch) crashed the whole run with a
    segfault now and then. Tests marked slow (each more than a few seconds: whole bundled-model
    runs, OpenVINO compiles) are skipped unless ``--slow`` is given, ``CI`` is set, or ``-m``
    selects by marker."""
    import pytest

    items.sort(key=lambda item: "openvino" in item.keywords)  # stable: the order is kept otherwise
    if config.getoption("--slow") or os.environ.get("CI") or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI runs them)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
