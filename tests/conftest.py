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


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    """The tiny model loaded as generate loads it, one per test module (tests add embeddings and LoRAs to it)."""
    import egaku

    return egaku.load_pipeline(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def text_width(tiny_pipe) -> int:
    """The tiny model's token embedding width."""
    return tiny_pipe.text_encoder.get_input_embeddings().weight.shape[1]


@pytest.fixture
def ctrl_c_at_step(monkeypatch):
    """``ctrl_c_at_step(trainer_module, step)``: the trainer's per-step ``check_finite`` sends this process one
    SIGINT, as Ctrl-C does, the first time it is called for ``step``."""
    import signal

    def patch(module, step: int) -> None:
        real, sent = module.check_finite, []

        def check(loss, at, *args, **kwargs):
            if at == step and not sent:
                sent.append(at)
                signal.raise_signal(signal.SIGINT)
            return real(loss, at, *args, **kwargs)

        monkeypatch.setattr(module, "check_finite", check)

    return patch


@pytest.fixture
def tensorboard_events():
    """``tensorboard_events(folder)``: what TensorBoard shows of the event files in ``folder``, each scalar's
    (step, value) and each image's steps, read by tensorboard's own reader (which hides the events that a resumed
    run's ``purge_step`` replaced)."""
    return _tensorboard_events


def _tensorboard_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


@pytest.fixture
def assert_plain_mode():
    """``assert_plain_mode(*paths)``: each has the mode a plain open() or mkdir() gives under this process's
    umask, not tempfile's private 0600/0700 nor the 0600 safetensors writes its files with."""
    umask = os.umask(0o022)
    os.umask(umask)

    def check(*paths: Path) -> None:
        assert paths
        for path in paths:
            assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path

    return check


@pytest.fixture
def torchrun():
    """Runs ``torchrun --standalone --nproc_per_node 2 -m egaku ARGS...`` (2 CPU processes, gloo); returns
    (stdout, stderr) after checking that it succeeded. A run that hangs is ended with all its workers."""
    return _torchrun


def _torchrun(*args: str, timeout: int = 300) -> tuple[str, str]:
    import signal
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so that another job's torchrun on the same machine
    # (the default master port is 29500 for everyone) cannot meet this one
    command = [str(launcher), "--standalone", "--nproc_per_node", "2", "-m", "egaku", *args]
    # its own process group, so that a hang is ended with every worker, and reported with what it printed
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the 2-process run did not end in {timeout} s\nstdout:\n{stdout[-3000:]}\n"
                    f"stderr:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-2000:]
    return stdout, stderr


@pytest.fixture(scope="module")
def style_lora_dir(tmp_path_factory):
    """A folder with one LoRA for the tiny model ("style"), made with peft with random (non-zero) weights."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from egaku.models.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("loras")
    donor = tiny_pipeline()
    torch.manual_seed(0)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(donor.unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, weight_name="style.safetensors")
    return folder
