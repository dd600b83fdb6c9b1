import os
from pathlib import Path

import pytest
import torch

# One thread: the tiny models here gain little from two, and on a busy 2-core machine two OpenMP
# threads stall at every barrier (10-20x slower generation was measured here).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EGAKU_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with EGAKU_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny seeded Stable Diffusion pipeline saved with save_pretrained, loaded through user paths."""
    from egaku.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd")
