"""`egaku train-gan`: adversarial training of the MLP GAN or the DCGAN (Goodfellow et al. 2014).

The loop, per batch of real images x (and their labels y when conditional):
  1. discriminator step: maximise log D(x) + log(1 - D(G(z)))  (BCE with targets 1 - smoothing and 0);
  2. generator step, the non-saturating loss of the GAN paper: maximise log D(G(z)) (BCE with target 1),
     which gives strong gradients early, when D rejects every fake and log(1 - D(G(z))) saturates.
Adam(2e-4, β1 = 0.5) as in the DCGAN paper: the default β1 = 0.9 makes the two players oscillate.
With ``--augment N`` the discriminator sees every image, real and fake, shifted by up to N pixels
(DiffAugment, Zhao et al. 2020); the shift is differentiable, so the generator learns unshifted images.
With ``--mode-seeking W`` the fakes come in pairs of one class and the generator step adds W times
MSGAN's term (Mao et al. 2019), which grows when two latent vectors give alike images; ``--lr-d`` gives
the discriminator its own learning rate (TTUR, Heusel et al. 2017).

Every ``--sample-every-epochs`` epochs, and after the last one, a grid is drawn from the same fixed
latent vectors (and, when conditional, one row per class), so the grids show the generator's progress
rather than new noise. Checkpoints hold both networks, both optimizers, the RNG state and the data
position, so ``--resume latest`` continues the same run step for step; the generator is also exported
to OUT/generator for `sample-gan`/`eval gan`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import option, save_config, to_dict
from ..paths import checked_run_paths
from ..data.digits import load_gan_data
from ..data.images import image_grid, to_pil_images
from ..errors import EgakuError
from ..gan.models import ARCH_TITLES, ARCHITECTURES, build_gan
from ..models.loading import resolve_device
from ..progress import progress_bar
from .runtime import (LOG_WITH, Checkpoints, MetricsLog, StopOnSignal, agree_on_step, another_process_lost,
                      capture_rng, check_finite, check_log_with, check_replicas_agree, check_same_fingerprint,
                      check_same_world, data_fingerprint, load_checkpoint, make_accelerator, permissions_by_umask,
                      restore_rng, step_seed, stop_after_signal, trainer_config)


@dataclass
class TrainGanOptions:
    arch: str = option("mlp", help="mlp: the classic dense GAN; dcgan: convolutional with batch norm",
                       choices=list(ARCHITECTURES))
    conditional: bool = option(False, help="condition both networks on the class label, so sample-gan can ask "
                                           "for a given digit")
    data: str = option("digits", help="'digits' (scikit-learn's 1,797 real handwritten digits, training split) "
                                      "or an image folder (class folders as labels)")
    out: str = option("runs/gan", help="output folder: generator/, checkpoints/, samples/, metrics.csv")
    image_size: int = option(28, help="side of the square images the models make")
    channels: int = option(1, help="1 = greyscale, 3 = RGB (image folders only)", choices=[1, 3])
    latent_dim: int = option(100, help="size of the generator's noise vector z")
    base_channels: int = option(32, help="DCGAN width: the discriminator's first layer; the generator starts at 4x")
    batch_size: int = option(64, help="real images per step (and as many fakes)")
    epochs: int = option(50, help="passes over the data (stops earlier at --max-steps or --max-minutes)")
    max_steps: int = option(0, help="stop after this many steps in total (0 = no limit)")
    max_minutes: float = option(0.0, help="stop after this much wall time in this process (0 = no limit)")
    max_cpu_minutes: float = option(0.0, help="stop after this much CPU time of this process, all threads "
                                              "together (0 = no limit): a fair budget on a shared machine")
    lr: float = option(2e-4, help="Adam learning rate of both networks (DCGAN paper)")
    beta1: float = option(0.5, help="Adam β1; 0.5 rather than 0.9 damps the players' oscillation (DCGAN paper)")
    label_smoothing: float = option(0.0, help="one-sided label smoothing: real target 1 - this (Salimans et "
                                              "al. 2016 use 0.1); keeps D from becoming overconfident")
    augment: int = option(0, help="DiffAugment (Zhao et al. 2020): shift every image the discriminator sees, real "
                                  "and fake, by up to this many pixels (0 = off); with a few thousand images it "
                                  "keeps D from memorising the training set")
    minibatch_std: bool = option(False, help="DCGAN: the discriminator also sees how much its features vary "
                                              "across the batch (ProGAN's minibatch standard deviation), "
                                              "which penalises fakes that are all alike")
    mode_seeking: float = option(0.0, help="weight of the mode-seeking term (MSGAN, Mao et al. 2019): the "
                                            "generator is penalised when two latent vectors of the same class "
                                            "give similar images; 1.0 is the paper's value, 0 = off")
    lr_d: float = option(0.0, help="discriminator learning rate when it should differ from --lr (two time-scale "
                                   "update rule, Heusel et al. 2017); 0 = the same as --lr")
    ema_decay: float = option(0.999, help="exponential moving average of the generator's weights, which is "
                                          "what is exported and sampled (Yazıcı et al. 2019); 0 = off")
    seed: int = option(0, help="seed for initialisation, batches and noise")
    checkpoint_every: int = option(500, help="steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = option(2, help="newest checkpoints to keep")
    sample_grid: int = option(64, help="images in each sample grid (fixed latent vectors)")
    sample_every_epochs: int = option(1, help="epochs between sample grids (the last epoch always gets one)")
    resume: str = option("", help="'latest' or a checkpoint folder: continue that run with the same options")
    device: str = option("auto", help="auto (CUDA when available), cpu or cuda", choices=["auto", "cpu", "cuda"])
    progress: bool = option(True, help="show a progress bar")
    log_with: str = option("csv", help="csv: the step log as CSV only; tensorboard: also TensorBoard event files "
                           "in OUT/logs (needs the tensorboard package)", choices=list(LOG_WITH))

    def __post_init__(self) -> None:
        check_log_with(self.log_with)
        checks = [
            (self.image_size >= 4, f"--image-size must be at least 4 pixels, got {self.image_size}"),
            (self.arch != "dcgan" or self.image_size % 4 == 0 and self.image_size >= 8,
             f"--image-size {self.image_size}: the DCGAN needs a size divisible by 4 and at least 8; use 28 (digits), "
             "32 or 64"),
            (self.latent_dim >= 1, f"--latent-dim must be at least 1, got {self.latent_dim}"),
            (self.base_channels >= 1, f"--base-channels must be at least 1, got {self.base_channels}"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size}: batch norm and the loss need at least 2 images "
             "per step"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.max_steps >= 0, f"--max-steps must be 0 (no limit) or a number of steps, got {self.max_steps}"),
            (self.max_minutes >= 0 and self.max_cpu_minutes >= 0,
             f"--max-minutes and --max-cpu-minutes must be 0 (no limit) or more, got {self.max_minutes} and "
             f"{self.max_cpu_minutes}"),
            (self.lr > 0, f"--lr must be above 0, got {self.lr}"),
            (0.0 <= self.beta1 < 1.0, f"--beta1 {self.beta1} must be in [0, 1); 0.5 is the DCGAN paper's"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay {self.ema_decay} must be in [0, 1); 0.999 is usual, 0 turns "
             "it off"),
            (0.0 <= self.label_smoothing < 0.5, f"--label-smoothing {self.label_smoothing} must be in [0, 0.5); 0.1 "
             "is usual"),
            (0 <= self.augment < self.image_size // 2, f"--augment {self.augment}: a shift in pixels from 0 (off) to "
             "under half the image size; 2 is usual for 28x28"),
            (self.mode_seeking >= 0 and self.lr_d >= 0, "--mode-seeking and --lr-d must be >= 0 (0 turns them off)"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be a number of steps, at least 1, got "
             f"{self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}"),
            (self.sample_grid >= 1, f"--sample-grid must be at least 1 image, got {self.sample_grid}"),
            (self.sample_every_epochs >= 1, f"--sample-every-epochs {self.sample_every_epochs} must be 1 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise EgakuError(message)


def fixed_latents(n: int, latent_dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid's latent vectors, from their own seed; conditional: classes cycle along each row."""
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed + 1_000_003))
    labels = torch.arange(n) % num_classes if num_classes else None
    return z, labels


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    """BCE on logits: real towards 1 - smoothing, fake towards 0."""
    real = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 1.0 - smoothing))
    fake = F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return real + fake


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating: -log D(G(z))."""
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def paired_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels whose second half repeats the first, so fakes i and i + n//2 are of the same class."""
    if labels is None:
        return None
    half = len(labels) // 2
    return torch.cat([labels[:half], labels[:half], labels[2 * half:]])


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSGAN's term: 1 / (mean |G(z1) - G(z2)| / mean |z1 - z2|) over the pairs (i, i + n//2).

    Small when different latent vectors give different images, large when the generator ignores z
    (the intra-class mode collapse that a class-conditional GAN is prone to).
    """
    half = len(z) // 2
    ratio = (fake[:half] - fake[half:2 * half]).abs().mean() / (z[:half] - z[half:2 * half]).abs().mean()
    return 1.0 / (ratio + 1e-5)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← decay·ema + (1 - decay)·model, with the decay ramped up over the first steps.

    The ramp (TensorFlow's ExponentialMovingAverage ``num_updates``) forgets the random initialisation:
    a fixed 0.999 would still hold 0.999^2000 ≈ 14% of it after 2,000 steps. Batch-norm statistics are
    copied, not averaged.
    """
    decay = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def translate(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by a random integer (dx, dy) in [-max_shift, max_shift], background (-1) shifted in.

    DiffAugment's translation (Zhao et al. 2020): differentiable, so it is applied to the fakes in both
    players' steps and the generator learns the unshifted images.
    """
    n, _, h, w = x.shape
    dy = torch.randint(-max_shift, max_shift + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_shift, max_shift + 1, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :, None] - dy).clamp(-1, h) + 1
    cols = (torch.arange(w, device=x.device)[None, None, :] - dx).clamp(-1, w) + 1
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _export(gen: torch.nn.Module, disc: torch.nn.Module, out: Path) -> None:
    for model, folder in ((gen, out / "generator"), (disc, out / "discriminator")):
        model.save_pretrained(folder)
        for weights in folder.glob("*.safetensors"):
            permissions_by_umask(weights)  # safetensors writes 0600


def _batch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # one permutation per (seed, epoch): a resumed run sees the same batches as an uninterrupted one
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _distributed_batch(n: int, batch_size: int, world: int) -> tuple[int, int]:
    """(images per process per step, steps per epoch): each step takes ``world`` disjoint slices of the epoch's
    order, one per process, and the last partial step is dropped (batch norm needs pairs)."""
    per_process = min(batch_size, n // world)
    if per_process < 2:
        raise EgakuError(f"a GAN on {world} processes needs at least 2 images per process per step: the data has {n} "
                         f"images, {n // world} per process; use more images or fewer processes")
    return per_process, n // (per_process * world)


def train_gan_command(opts: TrainGanOptions) -> None:
    # 1. The checkpoint to resume from, then the data (TrainGanOptions checked the options)
    opts = checked_run_paths(opts, {"--data": "data"})
    out = Path(opts.out)
    checkpoints = Checkpoints(out, keep=opts.keep_checkpoints)
    resume_path = checkpoints.resolve(opts.resume) if opts.resume else None
    if resume_path is not None:  # before the data is read: a checkpoint of another trainer or arch is refused at once
        saved_arch = trainer_config(resume_path, "train-gan")["arch"]
        if saved_arch != opts.arch:
            title = ARCH_TITLES.get(saved_arch, saved_arch)
            raise EgakuError(f"{resume_path} is a checkpoint of {title}, but --arch {opts.arch} was asked; resume "
                             f"with --arch {saved_arch}, or start a new run in another --out folder")
    if resume_path is None:
        checkpoints.check_fresh_start()
    resolve_device(opts.device)  # --device cuda without a GPU is an error before anything else
    # one process, or each of those torchrun / accelerate launch started: DDP averages their gradients
    accelerator = make_accelerator(opts.device)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = print if main else (lambda *args, **kwargs: None)
    if opts.arch == "mlp" and opts.base_channels != 32:
        say("note: --base-channels only affects the DCGAN")
    data = load_gan_data(opts.data, opts.image_size, opts.channels, opts.conditional)
    if len(data) < 2:
        raise EgakuError(f"--data {opts.data}: found {len(data)} image; a GAN needs at least 2 (batch norm and the "
                         "discriminator compare several per step)")
    per_process, batches_per_epoch = _distributed_batch(len(data), opts.batch_size, world)
    class_names = data.label_names if opts.conditional else None
    fingerprint = data_fingerprint(data.images, data.labels)  # a resume must find this data again
    say(f"{data.source}: {len(data)} images, {len(data.label_names)} classes, {opts.image_size}x{opts.image_size}"
        + (f"; {world} processes, {per_process} images each per step" if world > 1 else ""))

    # 2. Models, optimizers, the run's resolved config
    torch.manual_seed(opts.seed)  # the same initial weights in every process
    device = resolve_device(opts.device) if world == 1 else accelerator.device
    gen, disc = build_gan(opts.arch, opts.image_size, opts.channels, opts.latent_dim, class_names, opts.base_channels,
                          opts.minibatch_std)
    gen.to(device)
    disc.to(device)
    gen_ema = copy.deepcopy(gen).eval() if opts.ema_decay else None
    opt_g = torch.optim.Adam(gen.parameters(), lr=opts.lr, betas=(opts.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=opts.lr_d or opts.lr, betas=(opts.beta1, 0.999))
    # what a resumed run must share with the checkpoint (stopping criteria and bookkeeping may change)
    run_config = {**to_dict(opts), "class_names": class_names}
    may_change = {"epochs", "max_steps", "max_minutes", "max_cpu_minutes", "resume", "progress", "log_with",
                  "checkpoint_every", "keep_checkpoints", "out", "device", "sample_every_epochs"}
    step, epoch, position = 0, 0, 0

    # 3. Resume
    if resume_path is not None:
        path = resume_path
        weights, state = load_checkpoint(path, run_config, ignore=may_change)
        check_same_fingerprint(state, fingerprint, len(data), path)
        check_same_world(state, world, path, "each process trains on its own slice of every batch")
        gen.load_state_dict(weights["generator"])
        disc.load_state_dict(weights["discriminator"])
        if gen_ema is not None:
            gen_ema.load_state_dict(weights["generator_ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        restore_rng(state["rng"])
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        say(f"resumed from {path} at step {step} (epoch {epoch + 1}, batch {position})")
    # several processes: the forward calls go through DistributedDataParallel wrappers of the same modules
    gen_ddp, disc_ddp = (accelerator.prepare(gen), accelerator.prepare(disc)) if world > 1 else (gen, disc)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(opts, out / "config.json")
        (out / "samples").mkdir(exist_ok=True)
    log = MetricsLog(out / "metrics.csv", start_step=step, tensorboard=opts.log_with == "tensorboard",
                     resumed_from=resume_path) if main else None
    k = gen.num_classes
    grid_n = -(-opts.sample_grid // k) * k if k else opts.sample_grid  # whole rows of classes
    grid_z, grid_labels = fixed_latents(grid_n, opts.latent_dim, k, opts.seed)

    def save(step: int) -> Path | None:
        if main:
            state = {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": capture_rng(),
                     "step": step, "epoch": epoch, "position": position, "data_fingerprint": fingerprint,
                     "data_images": len(data), "world": world}
            weights = {"generator": gen.state_dict(), "discriminator": disc.state_dict()}
            if gen_ema is not None:
                weights["generator_ema"] = gen_ema.state_dict()
            checkpoints.save(step, weights, state, run_config)
            _export(gen_ema if gen_ema is not None else gen, disc, out)
        accelerator.wait_for_everyone()
        return checkpoints.latest()

    def check_loss(loss: torch.Tensor) -> None:
        # several processes check their mean, so that all of them stop at the same step
        check_finite(accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach(), step, checkpoints)

    # 4. Training loop
    total = opts.epochs * batches_per_epoch
    if opts.max_steps > total:  # kohya's max_train_steps overrides its epochs; here the first limit reached stops
        say(f"note: --epochs {opts.epochs} ends the run at step {total} ({batches_per_epoch} steps per epoch), before "
            f"--max-steps {opts.max_steps}; raise --epochs to train longer")
    if opts.max_steps:
        total = min(total, opts.max_steps)
    started, cpu_started = time.monotonic(), time.process_time()
    bar = progress_bar(total, min(step, total), desc="train-gan", disable=not (opts.progress and main))
    stopped_by_time = False
    last_saved = step if opts.resume else -1
    last_grid = step  # a resumed run's grid at this step, if any, was drawn before it stopped

    def save_grid(name: str) -> None:
        """A grid from the fixed latent vectors (the EMA generator when there is one)."""
        if not main:
            return
        shown = gen_ema if gen_ema is not None else gen.eval()
        with torch.no_grad():
            images = shown(grid_z.to(device), None if grid_labels is None else grid_labels.to(device))
        cols = gen.num_classes if gen.num_classes else None
        grid = image_grid(to_pil_images(images), cols=cols)
        grid.save(out / "samples" / name)
        log.image(step, "samples", grid)
    with StopOnSignal(quiet=not main) as stop, another_process_lost(world, checkpoints):
        while step < total and not stopped_by_time:
            order = _batch_order(len(data), opts.seed, epoch)
            while position < batches_per_epoch and step < total:
                first = (position * world + rank) * per_process
                idx = order[first:first + per_process]
                real = data.images[idx].to(device)
                labels = data.labels[idx].to(device) if gen.num_classes else None
                if world > 1:  # each process its own noise and shifts, drawn again the same on a resume
                    torch.manual_seed(step_seed(opts.seed, step, rank))
                gen.train()
                disc.train()
                z = torch.randn(len(idx), opts.latent_dim, device=device)
                # the mode-seeking term compares fakes of one class: pair them up (real images keep their labels)
                fake_labels = paired_labels(labels) if opts.mode_seeking else labels
                fake = gen_ddp(z, fake_labels)
                seen_real, seen_fake = (translate(real, opts.augment), translate(fake, opts.augment)) if opts.augment \
                    else (real, fake)

                # discriminator: fakes detached, so this step does not move the generator
                d_loss = discriminator_loss(disc_ddp(seen_real, labels), disc_ddp(seen_fake.detach(), fake_labels),
                                            opts.label_smoothing)
                check_loss(d_loss)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()

                # generator: the same fakes, judged by the updated discriminator, whose gradients from this
                # backward are local (no_sync: not averaged) and cleared before its next step
                with disc_ddp.no_sync() if world > 1 else contextlib.nullcontext():
                    d_fake = disc_ddp(seen_fake, fake_labels)
                    g_loss = generator_loss(d_fake)
                    if opts.mode_seeking:
                        g_loss = g_loss + opts.mode_seeking * mode_seeking_loss(fake, z)
                    check_loss(g_loss)
                    opt_g.zero_grad(set_to_none=True)
                    g_loss.backward()
                opt_g.step()
                if gen_ema is not None:
                    update_ema(gen_ema, gen, opts.ema_decay, step)

                step += 1
                position += 1
                time_up = bool((opts.max_minutes and time.monotonic() - started > opts.max_minutes * 60) or (
                    opts.max_cpu_minutes and time.process_time() - cpu_started > opts.max_cpu_minutes * 60))
                # the losses averaged over the processes, and whether any of them was stopped or ran out of time
                (d_mean, g_mean, d_fake_p, time_share), interrupted = agree_on_step(
                    accelerator, stop.requested, d_loss.item(), g_loss.item(),
                    float(torch.sigmoid(d_fake.detach()).mean()), float(time_up))
                if main:
                    log.log(step, epoch=epoch + 1, d_loss=d_mean, g_loss=g_mean, d_of_fake=d_fake_p)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, d_loss=f"{d_mean:.3f}", g_loss=f"{g_mean:.3f}")
                if step % opts.checkpoint_every == 0 or interrupted:
                    save(step)
                    last_saved = step
                if interrupted and step < total:
                    bar.close()
                    stop_after_signal(step, checkpoints.latest(), quiet=not main)
                elif interrupted:  # trained to the end: what is left is the export
                    say("interrupted at the last step: exporting the generator", file=sys.stderr)
                if time_share > 0:
                    stopped_by_time = True
                    break
            if position >= batches_per_epoch:
                if (epoch + 1) % opts.sample_every_epochs == 0 or step >= total:
                    save_grid(f"epoch-{epoch + 1:04d}.png")
                    last_grid = step
                epoch += 1
                position = 0
    bar.close()
    if last_grid != step:  # stopped mid-epoch (time limit or --max-steps): the final generator gets a grid too
        save_grid(f"final-step-{step:06d}.png")
    if main:
        log.close()

    # 5. Final checkpoint and export
    if world > 1:
        check_replicas_agree(accelerator, list(gen.parameters()) + list(disc.parameters()),
                             "the generator and discriminator weights")
    if step != last_saved:
        path = save(step)
    else:
        path = checkpoints.latest()
        if main:
            _export(gen_ema if gen_ema is not None else gen, disc, out)
    if not main:
        return
    reason = "time limit" if stopped_by_time else "done"
    summary = {"step": step, "epochs": round(step / batches_per_epoch, 3), "stopped_by": reason,
               "processes": world, "wall_seconds_this_process": round(time.monotonic() - started, 1),
               "cpu_seconds_this_process": round(time.process_time() - cpu_started, 1),
               "torch_threads": torch.get_num_threads()}
    (out / "train-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{reason}: step {step} ({step / batches_per_epoch:.1f} epochs); checkpoint {path}; "
          f"generator in {out / 'generator'}")
