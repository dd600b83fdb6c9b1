import os
from pathlib import Path

import pytest
import torch

# These machines have 2 cores shared with other work; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
