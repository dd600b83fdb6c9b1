"""A LoRA folder holding a train-lora run that has not ended: its checkpoints (training state) and its trained words
are not offered as LoRAs, its --save-every LoRAs are, and the run folder given as a LoRA says how to continue it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from egaku.errors import NotFoundError
from egaku.lora.apply import lora_catalog, resolve_lora


def test_an_unfinished_runs_checkpoints_and_words_are_not_listed_as_loras(tmp_path):
    tensor = {"x": torch.zeros(1)}
    loras = tmp_path / "loras"
    run = loras / "star"  # stopped with --stop-at: checkpoints, a step LoRA, its word, no final LoRA
    for step in (1, 2):
        checkpoint = run / "checkpoints" / f"step-{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.pt").write_bytes(b"")
        save_file(tensor, checkpoint / "unet_lora.safetensors")
    (run / "training_config.json").write_text("{}")
    (run / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(1, 4)}, run / "embeddings" / "star.safetensors")
    (run / "steps" / "star-step000001").mkdir(parents=True)
    save_file(tensor, run / "steps" / "star-step000001" / "pytorch_lora_weights.safetensors")
    save_file(tensor, loras / "style.safetensors")
    moved = loras / "kept" / "step-000009"  # a checkpoint copied out of its run
    moved.mkdir(parents=True)
    (moved / "state.pt").write_bytes(b"")
    save_file(tensor, moved / "unet_lora.safetensors")

    assert lora_catalog(loras) == ["star-step000001", "style"]
    with pytest.raises(NotFoundError, match=r"is a train-lora run that has not written its LoRA yet .*--out .*star "
                                            r"--resume latest` continues it"):
        resolve_lora(str(run), None)
