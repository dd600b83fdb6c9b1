"""GANs: architectures as defined in issue 5, the training loop, sampling and the bad-input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from egaku.cli import main as cli_main
from egaku.config import build, load_preset
from egaku.data.digits import load_digits_split
from egaku.errors import EgakuError
from egaku.gan.commands import SampleGanOptions, sample_gan_command
from egaku.gan.models import (DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator, build_gan,
                              load_generator)
from egaku.training import gan as gan_training
from egaku.training.gan import TrainGanOptions, train_gan_command
from egaku.training.runtime import Checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not isinstance(m, nn.Sequential) and m is not model]


# ---- architectures ------------------------------------------------------------------------------

def test_mlp_generator_matches_the_classic_definition():
    gen = MLPGenerator()
    layers = _layers(gen)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear, nn.Tanh]
    dense = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(100, 256), (256, 512), (512, 28 * 28)]
    assert all(m.bias is None for m in dense)  # no biases in the generator's dense layers
    out = gen(torch.randn(5, 100))
    assert out.shape == (5, 1, 28, 28)
    assert out.min() >= -1 and out.max() <= 1


def test_mlp_discriminator_matches_the_classic_definition():
    disc = MLPDiscriminator()
    kinds = [type(m) for m in _layers(disc)]
    assert kinds == [nn.Flatten, nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    dense = [m for m in _layers(disc) if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dense] == [(784, 512), (512, 256), (256, 1)]
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert disc(x).shape == (5,)
    p = disc.probability(x)
    assert ((p > 0) & (p < 1)).all()


def test_dcgan_upsamples_with_transposed_convolutions_and_downsamples_with_strides():
    gen, disc = DCGANGenerator(), DCGANDiscriminator()
    sizes = []
    for m in gen.modules():
        if isinstance(m, nn.ConvTranspose2d):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[1:])))
    x = gen(torch.randn(3, 100))
    assert x.shape == (3, 1, 28, 28)
    assert sizes == [(128, 7, 7), (64, 14, 14), (1, 28, 28)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gen.modules()) == 2
    convs = [m for m in disc.features if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 1
    assert disc(x).shape == (3,)
    # other sizes divisible by 4 work; others are refused with a message
    assert DCGANGenerator(image_size=32, base_channels=4)(torch.randn(2, 100)).shape == (2, 1, 32, 32)
    with pytest.raises(EgakuError, match="divisible by 4"):
        DCGANGenerator(image_size=30)


def test_dcgan_first_layer_is_a_transposed_convolution_computed_as_one_product():
    first = DCGANGenerator(base_channels=8, num_classes=10).net[0]
    assert isinstance(first, nn.ConvTranspose2d) and first.kernel_size == (7, 7)
    h = torch.randn(5, 110, 1, 1)
    torch.testing.assert_close(first(h), nn.ConvTranspose2d.forward(first, h))


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_conditional_variants_take_labels_and_round_trip_through_safetensors(arch, tmp_path):
    torch.manual_seed(0)
    gen, disc = build_gan(arch, class_names=["a", "b", "c"], base_channels=8)
    z, y = torch.randn(4, 100), torch.tensor([0, 1, 2, 0])
    gen.eval()
    disc.eval()
    x = gen(z, y)
    assert x.shape == (4, 1, 28, 28) and disc(x, y).shape == (4,)
    # the label changes the output
    assert not torch.allclose(gen(z, torch.tensor([1, 1, 1, 1])), gen(z, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="pass labels"):
        gen(z)
    gen.save_pretrained(tmp_path / "generator")
    assert (tmp_path / "generator" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_generator(tmp_path)
    assert type(loaded) is type(gen) and loaded.config.class_names == ["a", "b", "c"]
    torch.testing.assert_close(loaded(z, y), x)
    other = "dcgan" if arch == "mlp" else "mlp"
    with pytest.raises(EgakuError, match=f"--arch {arch}"):
        load_generator(tmp_path, arch=other)


def test_minibatch_std_discriminator_sees_the_variety_of_its_batch(tmp_path):
    torch.manual_seed(0)
    _, disc = build_gan("dcgan", base_channels=8, minibatch_std=True)
    plain = DCGANDiscriminator(base_channels=8)
    assert disc.head.in_channels == plain.head.in_channels + 1
    disc.eval()
    x = torch.randn(6, 1, 28, 28)
    same = x[:1].expand(6, -1, -1, -1)
    # the first image's logit depends on the rest of its batch: varied or all alike
    assert not torch.allclose(disc(x)[:1], disc(torch.cat([x[:1], same[1:]]))[:1])
    assert torch.allclose(disc(same), disc(same[:1]).expand(6))  # copies carry no spread, like one image alone
    disc.save_pretrained(tmp_path / "d")
    assert DCGANDiscriminator.from_pretrained(tmp_path / "d").config.minibatch_std
    with pytest.raises(EgakuError, match="DCGAN option"):
        build_gan("mlp", minibatch_std=True)


# ---- data ---------------------------------------------------------------------------------------

def test_digit_split_is_fixed_stratified_and_scaled():
    train, test = load_digits_split("train", 28), load_digits_split("test", 28)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 28, 28)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert sorted(set(test.labels.tolist())) == list(range(10))
    again = load_digits_split("test", 8)
    assert torch.equal(again.labels, test.labels)


def _write_folder(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    for name, arrays in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            Image.fromarray(arr.astype(np.uint8), "L").save(root / name / f"{i:03d}.png")
    return root


def _halves(n: int, size: int = 8, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """An easy synthetic set: ink in the top half or in the bottom half, with a little noise."""
    rng = np.random.default_rng(seed)
    top, bottom = [], []
    for _ in range(n):
        a = rng.uniform(0, 40, (size, size))
        b = a.copy()
        a[: size // 2] = rng.uniform(215, 255, (size // 2, size))
        b[size // 2:] = rng.uniform(215, 255, (size // 2, size))
        top.append(a)
        bottom.append(b)
    return {"top": top, "bottom": bottom}


def _opts(tmp_path: Path, **kw) -> TrainGanOptions:
    base = dict(arch="mlp", data="digits", out=str(tmp_path / "run"), image_size=8, batch_size=32, max_steps=10,
                checkpoint_every=5, progress=False, sample_grid=16, base_channels=8)
    base.update(kw)
    return build(TrainGanOptions, base)


# ---- training -----------------------------------------------------------------------------------

def _losses(run: Path) -> tuple[list[int], list[float]]:
    lines = (run / "metrics.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return [int(r["step"]) for r in rows], [float(r["d_loss"]) for r in rows]


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_training_reduces_discriminator_loss_and_writes_a_checkpoint_that_loads(arch, tmp_path, assert_plain_mode):
    opts = _opts(tmp_path, arch=arch, image_size=28, max_steps=30, checkpoint_every=10)
    train_gan_command(opts)
    run = Path(opts.out)
    assert_plain_mode(*run.glob("*/diffusion_pytorch_model.safetensors"))  # generator/, discriminator/
    assert _losses(run)[0] == list(range(1, 31))
    ckpt = Checkpoints(run).latest()
    assert ckpt.name == "step-000030"
    weights, state = load_checkpoint(ckpt, json.loads((ckpt / "config.json").read_text()))
    assert state["step"] == 30
    torch.manual_seed(opts.seed)  # the run's initial networks
    gen0, disc0 = build_gan(arch, image_size=28, base_channels=8)
    gen, disc = build_gan(arch, image_size=28, base_channels=8)
    gen.load_state_dict(weights["generator"])
    disc.load_state_dict(weights["discriminator"])
    for m in (gen0, disc0, gen, disc):
        m.eval()
    # on held-out real digits and the trained generator's fakes, the trained D separates what the
    # initial one cannot (its loss sits at chance, 2 ln 2 ≈ 1.39)
    real = load_digits_split("test", 28).images[:64]
    with torch.no_grad():
        fake = gen(torch.randn(64, 100, generator=torch.Generator().manual_seed(1)))
        before = float(gan_training.discriminator_loss(disc0(real), disc0(fake), 0.0))
        after = float(gan_training.discriminator_loss(disc(real), disc(fake), 0.0))
    assert before == pytest.approx(2 * np.log(2), abs=0.05)
    assert after < before - 0.1
    # the exported generator is the weight average that the checkpoint also holds
    gen.load_state_dict(weights["generator_ema"])
    exported = load_generator(run, arch=arch)
    z = torch.randn(4, 100)
    with torch.no_grad():
        torch.testing.assert_close(exported(z), gen(z))


def test_translate_shifts_whole_images_and_fills_with_background():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 6, 5, requires_grad=True)
    y = gan_training.translate(x, 2)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x.detach(), (2, 2, 2, 2), value=-1.0)
    shifts = set()
    for a, b in zip(padded, y.detach()):
        # every output is its input moved by some (dy, dx) in [-2, 2]², paper (-1) shifted in
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(a[:, 2 - dy:2 - dy + 6, 2 - dx:2 - dx + 5], b)]
        assert found, "not a whole-pixel shift"
        shifts.add(found[0])
    assert len(shifts) > 10  # independent shifts per image
    y.sum().backward()  # differentiable: the generator learns through it
    assert x.grad is not None and x.grad.max() == 1.0


def test_augment_shifts_what_the_discriminator_sees_in_training(tmp_path, monkeypatch):
    seen = []
    real_translate = gan_training.translate

    def counting(x, max_shift):
        seen.append((x.requires_grad, max_shift))
        return real_translate(x, max_shift)

    monkeypatch.setattr(gan_training, "translate", counting)
    opts = _opts(tmp_path, arch="dcgan", max_steps=3, checkpoint_every=3, augment=2)
    train_gan_command(opts)
    # per step: the real batch (no gradient) and the fakes (gradient to the generator), shifted by up to 2
    assert seen == [(False, 2), (True, 2)] * 3
    for bad in (4, -1):
        with pytest.raises(EgakuError, match="--augment"):
            train_gan_command(_opts(tmp_path, augment=bad))


def test_resume_continues_the_step_count_exactly(tmp_path, tensorboard_events):
    straight = _opts(tmp_path, out=str(tmp_path / "straight"), max_steps=16, checkpoint_every=10)
    train_gan_command(straight)
    first = _opts(tmp_path, out=str(tmp_path / "resumed"), max_steps=10, checkpoint_every=10, log_with="tensorboard")
    train_gan_command(first)
    train_gan_command(_opts(tmp_path, out=str(tmp_path / "resumed"), max_steps=16, checkpoint_every=10,
                            resume="latest", log_with="tensorboard"))
    steps, losses = _losses(tmp_path / "resumed")
    assert steps == list(range(1, 17))
    # --log-with tensorboard: the same numbers as the CSV, across the resume, and the sample grids
    scalars, images = tensorboard_events(tmp_path / "resumed" / "logs")
    assert {"d_loss", "g_loss", "d_of_fake", "epoch"} <= set(scalars)
    assert [step for step, _ in scalars["d_loss"]] == steps
    np.testing.assert_allclose([value for _, value in scalars["d_loss"]], losses, rtol=1e-6)
    assert images["samples"] == [10, 16]  # each run's last generator (no epoch ends within 16 steps)
    assert Checkpoints(tmp_path / "resumed").latest().name == "step-000016"
    # same batches, noise and optimizer state as the uninterrupted run
    np.testing.assert_allclose(losses, _losses(tmp_path / "straight")[1], rtol=1e-5)
    a = load_generator(tmp_path / "straight").state_dict()
    b = load_generator(tmp_path / "resumed").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_ctrl_c_checkpoints_the_step_it_finishes_and_resume_continues_exactly(tmp_path, ctrl_c_at_step):
    straight = _opts(tmp_path, out=str(tmp_path / "straight"), max_steps=12, checkpoint_every=10)
    train_gan_command(straight)
    stopped = _opts(tmp_path, out=str(tmp_path / "stopped"), max_steps=12, checkpoint_every=10)
    ctrl_c_at_step(gan_training, 3)  # sent during step 4 (check_finite gets the step before it counts)
    with pytest.raises(KeyboardInterrupt):
        train_gan_command(stopped)
    assert Checkpoints(tmp_path / "stopped").latest().name == "step-000004"
    train_gan_command(_opts(tmp_path, out=str(tmp_path / "stopped"), max_steps=12, checkpoint_every=10,
                            resume="latest"))
    steps, losses = _losses(tmp_path / "stopped")
    assert steps == list(range(1, 13))
    np.testing.assert_allclose(losses, _losses(tmp_path / "straight")[1], rtol=1e-5)
    a = load_generator(tmp_path / "straight").state_dict()
    b = load_generator(tmp_path / "stopped").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # Ctrl-C during the last step: training is done, so the generator is exported rather than left to a resume
    ctrl_c_at_step(gan_training, 11)
    train_gan_command(_opts(tmp_path, out=str(tmp_path / "last"), max_steps=12, checkpoint_every=10))
    assert Checkpoints(tmp_path / "last").latest().name == "step-000012"
    b = load_generator(tmp_path / "last").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_sample_grids_every_n_epochs_and_after_the_last(tmp_path):
    data = _write_folder(tmp_path / "halves", _halves(32))  # one batch per epoch
    opts = _opts(tmp_path, data=str(data), epochs=7, max_steps=0, sample_every_epochs=3, checkpoint_every=100)
    train_gan_command(opts)
    grids = sorted(p.name for p in (Path(opts.out) / "samples").glob("epoch-*.png"))
    assert grids == ["epoch-0003.png", "epoch-0006.png", "epoch-0007.png"]
    assert not list((Path(opts.out) / "samples").glob("final-*.png"))  # the last epoch's grid is the final one
    # stopped mid-epoch (by --max-steps here, or a time limit): the generator it ends with gets a grid too
    data = _write_folder(tmp_path / "halves64", _halves(64))  # 128 images: two batches of 64 per epoch
    cut = _opts(tmp_path, data=str(data), out=str(tmp_path / "cut"), epochs=7, max_steps=3, sample_every_epochs=1,
                batch_size=64)
    train_gan_command(cut)
    assert sorted(p.name for p in (Path(cut.out) / "samples").glob("*.png")) == [
        "epoch-0001.png", "final-step-000003.png"]
    with pytest.raises(EgakuError, match="--sample-every-epochs"):
        train_gan_command(_opts(tmp_path, out=str(tmp_path / "zero"), sample_every_epochs=0))


def test_conditional_sampling_honours_the_label(tmp_path):
    data = _write_folder(tmp_path / "halves", _halves(48))
    opts = _opts(tmp_path, data=str(data), conditional=True, max_steps=150, batch_size=32, checkpoint_every=1000,
                 lr=1e-3)
    train_gan_command(opts)
    grids = sorted((Path(opts.out) / "samples").glob("epoch-*.png"))  # one per epoch, fixed latents
    assert grids[0].name == "epoch-0001.png" and len(grids) == 50
    for label, bright_top in (("top", True), ("bottom", False)):
        out = tmp_path / f"samples-{label}"
        sample_gan_command(build(SampleGanOptions, {"model": opts.out, "n": 16, "digit": label, "out": str(out)}))
        files = sorted(out.glob(f"*-{label}.png"))
        assert len(files) == 16 and (out / "grid.png").is_file()
        ims = np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in files])
        top, bottom = ims[:, :4].mean(axis=(1, 2)), ims[:, 4:].mean(axis=(1, 2))
        honoured = (top > bottom) if bright_top else (bottom > top)
        assert honoured.mean() >= 0.9, (label, top, bottom)
    # --size scales the 8x8 samples as the training data were scaled
    big = tmp_path / "samples-big"
    sample_gan_command(build(SampleGanOptions,
                             {"model": opts.out, "n": 4, "digit": "top", "size": 28, "out": str(big)}))
    im = np.asarray(Image.open(sorted(big.glob("*-top.png"))[0]), dtype=np.float64)
    assert im.shape == (28, 28) and im[:14].mean() > im[14:].mean()


# ---- bad input ----------------------------------------------------------------------------------

def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(EgakuError, match="no usable images"):
        train_gan_command(_opts(tmp_path, data=str(tmp_path / "empty")))


def test_an_out_inside_the_data_folder_or_empty_is_refused(tmp_path):
    data = _write_folder(tmp_path / "digits", {"top": _halves(4)["top"]})
    with pytest.raises(EgakuError, match=f"--out {data / 'run'} lies inside --data {data}"):
        train_gan_command(_opts(tmp_path, data=str(data), out=str(data / "run")))
    with pytest.raises(EgakuError, match="--out is empty"):
        train_gan_command(_opts(tmp_path, out=""))


def test_conditional_needs_two_classes(tmp_path):
    data = _write_folder(tmp_path / "one", {"only": _halves(4)["top"]})
    with pytest.raises(EgakuError, match="at least two classes.*'only'"):
        train_gan_command(_opts(tmp_path, data=str(data), conditional=True))
    Image.fromarray(_halves(1)["top"][0].astype(np.uint8), "L").save(data / "loose.png")
    _write_folder(data, {"other": _halves(4)["bottom"]})
    with pytest.raises(EgakuError, match="every image in a class folder.*loose.png"):
        train_gan_command(_opts(tmp_path, data=str(data), conditional=True))
    # unconditional training on the same folder is fine
    train_gan_command(_opts(tmp_path, data=str(data), batch_size=2, max_steps=2))


def test_resuming_from_the_other_architecture_is_refused(tmp_path):
    train_gan_command(_opts(tmp_path, max_steps=2, checkpoint_every=2))
    with pytest.raises(EgakuError, match="checkpoint of an MLP GAN, but --arch dcgan"):
        train_gan_command(_opts(tmp_path, arch="dcgan", max_steps=4, resume="latest"))
    with pytest.raises(EgakuError, match="configuration changed.*lr"):
        train_gan_command(_opts(tmp_path, max_steps=4, resume="latest", lr=1e-3))


def test_digit_outside_the_trained_labels_is_refused(tmp_path, capsys):
    gen, _ = build_gan("mlp", image_size=8, class_names=["0", "1", "2"])
    gen.save_pretrained(tmp_path / "cond" / "generator")
    with pytest.raises(EgakuError, match="--digit 7 is not one of the labels.*0, 1, 2"):
        sample_gan_command(build(SampleGanOptions, {"model": str(tmp_path / "cond"), "digit": "7"}))
    # through the CLI: one line, exit 2
    assert cli_main(["sample-gan", "--model", str(tmp_path / "cond"), "--digit", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("egaku: error:")
    uncond, _ = build_gan("mlp", image_size=8)
    uncond.save_pretrained(tmp_path / "uncond" / "generator")
    with pytest.raises(EgakuError, match="unconditional"):
        sample_gan_command(build(SampleGanOptions, {"model": str(tmp_path / "uncond"), "digit": "1"}))


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint_every": 0}, r"--checkpoint-every must be a number of steps, at least 1, got 0"),
    ({"lr": -1.0}, r"--lr must be above 0, got -1.0"),
    ({"arch": "dcgan", "base_channels": 0}, r"--base-channels must be at least 1, got 0"),
    ({"image_size": 0}, r"^--image-size must be at least 4 pixels, got 0$"),
    ({"arch": "dcgan", "image_size": 10}, r"--image-size 10: the DCGAN needs a size divisible by 4"),
    ({"latent_dim": 0}, r"--latent-dim must be at least 1, got 0"),
    ({"epochs": 0}, r"--epochs must be at least 1"),
    ({"max_steps": -1}, r"--max-steps must be 0 \(no limit\)"),
    ({"max_minutes": -1.0}, r"--max-minutes and --max-cpu-minutes"),
    ({"beta1": 1.0}, r"--beta1 1.0 must be in \[0, 1\)"),
    ({"sample_grid": 0}, r"--sample-grid must be at least 1"),
    ({"keep_checkpoints": 0}, r"--keep-checkpoints must be at least 1"),
])
def test_bad_numeric_options_are_refused_before_the_data_is_read(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(gan_training, "load_gan_data", lambda *a, **k: pytest.fail("the data was read first"))
    with pytest.raises(EgakuError, match=message):
        train_gan_command(_opts(tmp_path, **overrides))
    # through the CLI: one line, exit 2
    assert cli_main(["train-gan", "--out", str(tmp_path / "cli"), "--lr", "-1"]) == 2


def test_resuming_a_checkpoint_of_another_trainer_says_so(tmp_path, monkeypatch):
    from egaku.config import to_dict
    from egaku.training.ldm import TrainLdmOptions

    step = tmp_path / "ldm-run" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(b"")
    (step / "config.json").write_text(json.dumps(to_dict(TrainLdmOptions())))
    monkeypatch.setattr(gan_training, "load_gan_data", lambda *a, **k: pytest.fail("the data was read first"))
    with pytest.raises(EgakuError, match=r"is not a train-gan checkpoint \(it was written by train-ldm"):
        train_gan_command(_opts(tmp_path, resume=str(tmp_path / "ldm-run")))


def test_sample_gan_never_mixes_its_files_with_an_earlier_runs_without_overwrite(tmp_path):
    for name, classes in (("pets", ["cats", "dogs"]), ("other", ["dogs", "cats"])):
        gen, _ = build_gan("mlp", image_size=8, class_names=classes)
        gen.save_pretrained(tmp_path / name / "generator")
    out = tmp_path / "samples"
    sample_gan_command(build(SampleGanOptions, {"model": str(tmp_path / "pets"), "n": 2, "out": str(out)}))
    assert sorted(p.name for p in out.iterdir()) == ["0000-cats.png", "0001-dogs.png", "config.json", "grid.png"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EgakuError, match=r"already holds the images of an earlier sample-gan run.*--overwrite"):
        sample_gan_command(build(SampleGanOptions, {"model": str(tmp_path / "other"), "n": 2, "out": str(out)}))
    assert sorted(p.name for p in out.glob("*.png")) == ["0000-cats.png", "0001-dogs.png", "grid.png"]
    sample_gan_command(build(SampleGanOptions, {"model": str(tmp_path / "other"), "n": 1, "out": str(out),
                                                "overwrite": True}))
    assert sorted(p.name for p in out.iterdir()) == ["0000-dogs.png", "config.json", "grid.png", "notes.txt"]
    assert json.loads((out / "config.json").read_text())["model"] == str(tmp_path / "other")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = gan_training.discriminator_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(gan_training, "discriminator_loss", poisoned)
    opts = _opts(tmp_path, max_steps=20, checkpoint_every=5)
    with pytest.raises(EgakuError, match=r"loss became nan at step 7.*step-000005"):
        train_gan_command(opts)
    run = Path(opts.out)
    latest = Checkpoints(run).latest()
    assert latest.name == "step-000005"
    assert not any(p.name > "step-000005" for p in (run / "checkpoints").glob("step-*"))
    weights, _ = load_checkpoint(latest, json.loads((latest / "config.json").read_text()))
    assert all(torch.isfinite(t).all() for t in weights["generator"].values())


# ---- presets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gan-mlp", "gan-dcgan"])
def test_presets_load(name):
    opts = build(TrainGanOptions, load_preset(ROOT / "configs" / f"{name}.toml"))
    assert opts.arch == name.split("-")[1] and opts.data == "digits"


def test_rgb_image_folder_trains_a_colour_dcgan(tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "colours" / name).mkdir(parents=True)
        for i in range(3):
            arr = np.clip(np.array(colour) + rng.normal(0, 10, (12, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(tmp_path / "colours" / name / f"{i}.jpg")
    opts = _opts(tmp_path, arch="dcgan", data=str(tmp_path / "colours"), channels=3, conditional=True,
                 batch_size=4, max_steps=3)
    train_gan_command(opts)
    gen = load_generator(opts.out, arch="dcgan")
    assert gen.config.class_names == ["blue", "red"] and gen.config.channels == 3
    sample_gan_command(build(SampleGanOptions, {"model": opts.out, "n": 4, "digit": "red"}))
    with Image.open(Path(opts.out) / "samples-gan" / "0000-red.png") as im:
        assert im.mode == "RGB" and im.size == (8, 8)
    with pytest.raises(EgakuError, match="greyscale"):
        train_gan_command(_opts(tmp_path, data="digits", channels=3, out=str(tmp_path / "grey")))
    # the data changed since the checkpoint: a resume would not continue the run it belongs to
    Image.fromarray(np.full((12, 10, 3), 128, np.uint8), "RGB").save(tmp_path / "colours" / "red" / "new.jpg")
    with pytest.raises(EgakuError, match="the training data changed since it was written \\(6 images then, 7 now"):
        train_gan_command(_opts(tmp_path, arch="dcgan", data=str(tmp_path / "colours"), channels=3, conditional=True,
                                batch_size=4, max_steps=6, resume="latest"))
    # a new run in that folder, without --resume, would prune its own checkpoints: refused before the data is read
    with pytest.raises(EgakuError, match="already holds a run's checkpoints"):
        train_gan_command(opts)


def test_minibatch_std_trains_and_is_part_of_the_run_config(tmp_path):
    train_gan_command(_opts(tmp_path, arch="dcgan", minibatch_std=True, max_steps=6))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["minibatch_std"] is True
    assert DCGANDiscriminator.from_pretrained(tmp_path / "run" / "discriminator").config.minibatch_std
    with pytest.raises(EgakuError, match="configuration changed|minibatch_std"):
        train_gan_command(_opts(tmp_path, arch="dcgan", minibatch_std=False, max_steps=8, resume="latest"))


def test_mode_seeking_pairs_fakes_of_one_class_and_penalises_ignoring_z():
    labels = torch.tensor([3, 1, 4, 1, 5])
    assert gan_training.paired_labels(labels).tolist() == [3, 1, 3, 1, 5]  # odd one out keeps its own label
    assert gan_training.paired_labels(None) is None
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    varied = torch.cat([torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8)])
    alike = torch.full((8, 1, 8, 8), 0.5) + 1e-3 * torch.randn(8, 1, 8, 8)
    # a generator that ignores z costs ~1000x more than one whose pairs differ by 1 per pixel
    expected = 1.0 / (1.0 / (z[:4] - z[4:]).abs().mean() + 1e-5)
    assert float(gan_training.mode_seeking_loss(varied, z)) == pytest.approx(float(expected), rel=1e-5)
    assert float(gan_training.mode_seeking_loss(alike, z)) > 100 * float(expected)


def test_mode_seeking_and_discriminator_learning_rate_train_and_are_checked(tmp_path, monkeypatch):
    calls = []
    real_loss = gan_training.mode_seeking_loss
    monkeypatch.setattr(gan_training, "mode_seeking_loss",
                        lambda fake, z: calls.append(fake.shape) or real_loss(fake, z))
    opts = _opts(tmp_path, arch="dcgan", conditional=True, max_steps=4, checkpoint_every=4, mode_seeking=1.0,
                 lr_d=4e-4)
    train_gan_command(opts)
    assert len(calls) == 4 and calls[0][0] == 32  # once per generator step, on the whole batch of fakes
    ckpt = Checkpoints(Path(opts.out)).latest()
    _, state = load_checkpoint(ckpt, json.loads((ckpt / "config.json").read_text()))
    assert state["opt_d"]["param_groups"][0]["lr"] == 4e-4
    assert state["opt_g"]["param_groups"][0]["lr"] == opts.lr
    for bad in ({"mode_seeking": -1.0}, {"lr_d": -1e-4}):
        with pytest.raises(EgakuError, match="--mode-seeking and --lr-d"):
            train_gan_command(_opts(tmp_path / "bad", **bad))


# ---- several processes --------------------------------------------------------------------------

def test_every_step_splits_into_one_slice_per_process():
    assert gan_training._distributed_batch(64, 16, 2) == (16, 2)
    assert gan_training._distributed_batch(10, 64, 2) == (5, 1)  # fewer images than a batch: one step per epoch
    assert gan_training._distributed_batch(100, 32, 1) == (32, 3)
    with pytest.raises(EgakuError, match="at least 2 images per process per step: the data has 3 images"):
        gan_training._distributed_batch(3, 64, 2)


def test_two_process_run_under_torchrun_on_cpu(tmp_path, torchrun, capsys):
    """Under a real 2-process launch (gloo on CPU) the DCGAN's two players train as DistributedDataParallel
    modules, each process on its own slice of every batch; the run checks at the end that the replicas agree,
    only the main process writes, a run resumed on 2 processes ends where an uninterrupted one does, and a
    resume must use as many processes."""
    data = _write_folder(tmp_path / "halves", _halves(16))  # 32 images: 4 steps per epoch at 4 per process
    common = ("train-gan", "--data", str(data), "--arch", "dcgan", "--conditional", "--image-size", "8",
              "--batch-size", "4", "--base-channels", "4", "--augment", "1", "--mode-seeking", "1",
              "--sample-grid", "4", "--checkpoint-every", "3", "--epochs", "2", "--no-progress")
    out = tmp_path / "ddp"
    stdout, _ = torchrun(*common, "--out", str(out))
    assert stdout.count("done: step 8 (2.0 epochs)") == 1
    assert stdout.count("32 images, 2 classes, 8x8; 2 processes, 4 images each per step") == 1
    assert torch.load(out / "checkpoints" / "step-000008" / "state.pt", weights_only=True)["world"] == 2
    assert _losses(out)[0] == list(range(1, 9))
    assert json.loads((out / "train-summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch-0001.png", "epoch-0002.png"]

    split = tmp_path / "split"
    torchrun(*common, "--out", str(split), "--max-steps", "5")
    torchrun(*common, "--out", str(split), "--resume", "latest")
    assert _losses(split)[0] == list(range(1, 9))
    np.testing.assert_allclose(_losses(split)[1], _losses(out)[1], rtol=1e-5)
    whole, resumed = (load_generator(run, arch="dcgan").state_dict() for run in (out, split))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)

    assert cli_main([*common, "--out", str(out), "--epochs", "3", "--resume", "latest"]) == 2
    assert re.search(r"written by a run on 2 process\(es\), this one has 1.*Resume with 2", capsys.readouterr().err)


def test_epochs_that_end_the_run_before_max_steps_are_said(tmp_path, capsys):
    train_gan_command(_opts(tmp_path, epochs=1, max_steps=100, checkpoint_every=100))
    said = capsys.readouterr().out
    assert "note: --epochs 1 ends the run at step 44 (44 steps per epoch), before --max-steps 100" in said
    assert "done: step 44" in said
