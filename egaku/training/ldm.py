"""Train a latent diffusion model from scratch: VAE, then CLIP text encoder + UNet in its latent space.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models". One run has two
stages sharing one step counter, one checkpoint folder and one ``--resume``:

1. **VAE** (steps ``1..vae_steps``): a diffusers ``AutoencoderKL`` trained with a reconstruction (MSE)
   loss and a small KL term. It is fully convolutional, so it trains on random crops (cheaper) and is
   measured by PSNR on whole held-out images. Afterwards every training image is encoded once; the
   latents' standard deviation gives ``scaling_factor`` (saved in the VAE config) so the diffusion
   model sees unit-variance latents.
2. **Diffusion** (the next ``steps`` steps): a small ``CLIPTextModel`` (tokenizer built from the
   captions by ``build_clip_tokenizer``) and a ``UNet2DConditionModel`` with cross-attention, trained
   jointly to predict the noise (or v) that a diffusers ``DDPMScheduler`` added. Captions are dropped
   with probability ``caption_dropout`` so classifier-free guidance works; min-SNR weighting (Hang et al.
   2023) is optional; EMA weights (diffusers ``EMAModel``) are what gets exported.

The result, ``OUT/model``, is a standard ``StableDiffusionPipeline`` folder (no safety checker) whose
scheduler is DPM-Solver++ built from the training noise schedule. Each step's batch, noise and
timesteps come from a generator seeded by (seed, step), so ``--resume`` reproduces the uninterrupted
run exactly.

Under ``accelerate launch`` or ``torchrun`` each process draws its own batch (seeded by seed, step and its
rank; ``--batch-size`` is per process) and DistributedDataParallel averages the gradients, so every process
holds the same weights; only the main process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import option, save_config, to_dict
from ..paths import checked_run_paths
from ..data import shapes
from ..data.images import arrays_to_tensor, image_grid, to_pil_images
from ..errors import EgakuError
from ..models.loading import (MODEL_DEFAULTS_FILE, read_model_defaults, resolve_device, write_model_defaults,
                              write_pipeline)
from ..progress import progress_bar
from ..training.runtime import (LOG_WITH, TIMESTEP_SAMPLING, Checkpoints, MetricsLog, StopOnSignal, agree_on_step,
                                capture_rng, check_finite, check_log_with, check_replicas_agree,
                                check_same_fingerprint, check_same_world, check_timestep_sampling,
                                data_fingerprint, draw_timesteps, half_precision_attention, load_checkpoint,
                                make_accelerator, min_snr_weights, restore_rng, saved_config, step_seed,
                                stop_after_signal, trainer_config)

DEFAULT_SAMPLE_PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue square at the top left on a black background",
    "a large yellow triangle at the bottom right on a navy background",
    "a small green cross at the top right on a gray background",
    "a large purple diamond at the bottom left on a white background",
    "a large orange circle at the top left on a gray background",
    # held-out colour+shape pairs: never seen in training
    "a large red square in the center on a navy background",
    "a small green diamond at the bottom right on a black background",
]


# diffusers' down blocks that UNet2DConditionModel builds with its mirrored up block (Down -> Up in the name); the
# Skip and K blocks need a UNet configured otherwise, and the encoder blocks have no up block of that name.
UNET_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                    "ResnetDownsampleBlock2D")


@dataclasses.dataclass
class TrainLdmOptions:
    data: str = option("shapes", help="`shapes` (the built-in procedural world) or a folder of captioned images")
    out: str = option("runs/ldm", help="output folder: checkpoints, samples, losses.csv, model/")
    resolution: int = option(64, help="training image size in pixels (folder images are resized and centre-cropped)")
    shapes_images: int = option(20000, help="--data shapes: number of rendered training images")
    caption_template: str = option("{class}", help="folder data: caption for images without a caption file")
    flip: bool = option(False, help="random horizontal flips (off by default: captions may say left/right)")
    seed: int = option(0, help="seed for data, initialisation and noise")
    # stage 1: VAE
    vae_channels: list[int] = option([32, 64, 64], help="AutoencoderKL block widths; n blocks downsample by 2^(n-1)")
    vae_layers_per_block: int = option(1, help="resnet layers per VAE block")
    latent_channels: int = option(4, help="channels of the latent space")
    vae_from: str = option("", help="an AutoencoderKL folder to train the diffusion stage on instead of "
                           "training a VAE here (stage 1 is skipped; --vae-steps must be 0)")
    vae_steps: int = option(1500, help="VAE optimizer steps (0 only with --vae-from, whose VAE replaces stage 1)")
    vae_batch_size: int = option(16, help="VAE images per step (per process under accelerate launch or torchrun)")
    vae_crop: int = option(32, help="VAE trains on random crops of this size (0 = whole images)")
    vae_lr: float = option(1e-3, help="VAE peak learning rate (warmup then cosine)")
    kl_weight: float = option(1e-6, help="weight of the KL term (small: we want a sharp autoencoder)")
    # stage 2: text encoder + UNet
    unet_channels: list[int] = option([32, 64, 128], help="UNet block widths")
    unet_layers_per_block: int = option(1, help="resnet layers per UNet block")
    unet_down_blocks: list[str] = option(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                         help="UNet down block types (up blocks mirror them)")
    cross_attention_dim: int = option(64, help="text embedding width = UNet cross-attention width")
    attention_head_dim: int = option(8, help="UNet attention heads per block (diffusers' UNet2DConditionModel "
                                    "uses its attention_head_dim as the head count)")
    unet_pooled_text: bool = option(False, help="also add an attention-pooled caption embedding to the UNet's timestep "
                                    "embedding (diffusers addition_embed_type='text', as in DeepFloyd IF): every "
                                    "resnet at every resolution then sees the caption, not only the cross-attention "
                                    "layers")
    max_caption_tokens: int = option(77, help="tokenizer and text-encoder length (CLIP's 77 by default); a shorter "
                                     "one makes each step cheaper when the captions are short")
    tokenizer_merges: str = option("rank", help="how the tokenizer's BPE merges are built from the captions: "
                                   "rank (every caption word one token) or left_to_right (the builder of earlier "
                                   "egaku versions, kept to reproduce models trained with it)",
                                   choices=["rank", "left_to_right"])
    text_layers: int = option(2, help="CLIP text encoder transformer layers")
    text_heads: int = option(4, help="CLIP text encoder attention heads")
    steps: int = option(6000, help="diffusion (UNet + text encoder) optimizer steps")
    batch_size: int = option(32, help="diffusion images per step (per process under accelerate launch or torchrun)")
    lr: float = option(6e-4, help="diffusion peak learning rate (warmup then cosine)")
    warmup_steps: int = option(200, help="linear learning-rate warmup steps (both stages)")
    lr_schedule: str = option("cosine", help="diffusion stage after warmup: cosine decay, or constant (with EMA, "
                              "a run stopped early is then as good as its step count)", choices=["cosine", "constant"])
    cooldown_steps: int = option(0, help="constant schedule: decay the learning rate linearly to zero over the last N "
                                 "diffusion steps (warmup-stable-decay). A constant run may be resumed with a cooldown "
                                 "added or moved, as long as it starts at or after the checkpoint's step")
    caption_dropout: float = option(0.1, help="probability of training on the empty caption (enables CFG)")
    caption_weights: list[str] = option([], help="WORD=FACTOR (repeatable): draw training images whose caption has "
                                        "WORD FACTOR times as often (kohya's per-folder repeats, by caption word); "
                                        "factors of several matching words multiply")
    ema_decay: float = option(0.999, help="EMA decay cap (with warmup, so early EMA follows the model)")
    prediction_type: str = option("epsilon", help="what the UNet predicts", choices=["epsilon", "v_prediction"])
    zero_terminal_snr: bool = option(False, help="rescale the noise schedule so its last step is pure noise "
                                     "(Lin et al. 2024; needs v_prediction): without it the training latents "
                                     "leak their layout and mean colour into the last step, which sampling "
                                     "from pure noise cannot reproduce")
    snr_gamma: float = option(0.0, help="min-SNR loss weighting gamma (0 = off; 5 is the paper's value)")
    timestep_sampling: str = option("uniform", help="how training timesteps are drawn: uniform, or logit_normal "
                                    "(t/T = sigmoid(N(mean, std)), as in SD3: more steps at middle noise levels)",
                                    choices=list(TIMESTEP_SAMPLING))
    logit_mean: float = option(0.0, help="logit_normal: mean (above 0 favours noisier timesteps)")
    logit_std: float = option(1.0, help="logit_normal: standard deviation")
    uniform_share: float = option(0.0, help="logit_normal: share of each batch's timesteps drawn uniformly instead, "
                                  "so that the noisiest steps, where the layout is decided, keep being trained")
    num_train_timesteps: int = option(1000, help="diffusion timesteps")
    mixed_precision: str = option("no", help="diffusion stage: run the text encoder and UNet forward passes under "
                                  "autocast in bf16 (CPU or CUDA) or fp16 (CUDA, with loss scaling); weights, "
                                  "optimizer, EMA and the exported model stay fp32. The VAE stage always trains "
                                  "in fp32", choices=["no", "bf16", "fp16"])
    # bookkeeping
    checkpoint_every: int = option(500, help="save a checkpoint every N steps")
    keep_checkpoints: int = option(2, help="how many recent checkpoints to keep")
    sample_every: int = option(1000, help="write a sample grid every N diffusion steps (0 = only at the end)")
    sample_prompts: list[str] = option([], help="prompts of the sample grids (default: shapes prompts)")
    sample_steps: int = option(20, help="sampling steps for the grids")
    sample_guidance: float = option(4.0, help="CFG scale for the grids, written into OUT/model as the model's "
                                              "default guidance (egaku_defaults.json; edit it after measuring)")
    resume: str | None = option(None, help="`latest` or a checkpoint folder to continue from")
    export_only: bool = option(False, help="only write OUT/model from the latest checkpoint (e.g. of a cut-short run)")
    threads: int = option(2, help="torch CPU threads")
    device: str = option("auto", help="auto (CUDA when available), cpu or cuda; random numbers are drawn on the "
                         "CPU, so a run is the same draw of data, noise and timesteps on either",
                         choices=["auto", "cpu", "cuda"])
    progress: bool = option(True, help="show a progress bar")
    log_with: str = option("csv", help="csv: the step log as CSV only; tensorboard: also TensorBoard event files "
                           "in OUT/logs (needs the tensorboard package)", choices=list(LOG_WITH))

    def __post_init__(self) -> None:
        check_log_with(self.log_with)
        # Sizes first: the checks after them divide by some of these.
        sizes = {"shapes_images": self.shapes_images, "vae_layers_per_block": self.vae_layers_per_block,
                 "latent_channels": self.latent_channels, "vae_batch_size": self.vae_batch_size,
                 "unet_layers_per_block": self.unet_layers_per_block, "cross_attention_dim": self.cross_attention_dim,
                 "attention_head_dim": self.attention_head_dim, "text_layers": self.text_layers,
                 "text_heads": self.text_heads, "steps": self.steps, "batch_size": self.batch_size,
                 "num_train_timesteps": self.num_train_timesteps, "checkpoint_every": self.checkpoint_every,
                 "keep_checkpoints": self.keep_checkpoints, "sample_steps": self.sample_steps}
        for name, value in sizes.items():
            if value < 1:
                raise EgakuError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name, widths in (("vae_channels", self.vae_channels), ("unet_channels", self.unet_channels)):
            if not widths or min(widths) < 1:
                raise EgakuError(f"--{name.replace('_', '-')} {widths}: give block widths of at least 1")
        heads = self.attention_head_dim
        pooled_heads = max(1, self.cross_attention_dim // heads)  # as build_unet gives them to diffusers
        unknown = [b for b in self.unet_down_blocks if b not in UNET_DOWN_BLOCKS]
        checks = [
            (self.resolution % 8 == 0 and self.resolution >= 16,
             f"--resolution {self.resolution}: use a multiple of 8, at least 16"),
            (len(self.vae_channels) >= 3,
             f"--vae-channels {self.vae_channels}: give at least 3 blocks (downsampling factor 4)"),
            (self.vae_crop == 0 or (0 < self.vae_crop <= self.resolution and self.vae_crop % 8 == 0),
             f"--vae-crop {self.vae_crop}: use 0 or a multiple of 8 up to --resolution"),
            (not unknown, f"--unet-down-blocks {', '.join(unknown)}: not a block type this UNet can mirror; use "
             f"{', '.join(UNET_DOWN_BLOCKS)} (the up blocks mirror them)"),
            (len(self.unet_down_blocks) == len(self.unet_channels),
             f"--unet-down-blocks has {len(self.unet_down_blocks)} entries but --unet-channels has "
             f"{len(self.unet_channels)}; give one block type per width"),
            (all(width % heads == 0 for width in self.unet_channels),
             f"--unet-channels {self.unet_channels}: each width must be divisible by --attention-head-dim {heads} "
             "(the number of attention heads each block splits its channels into)"),
            (not self.unet_pooled_text or self.cross_attention_dim % pooled_heads == 0,
             f"--unet-pooled-text pools the caption with --cross-attention-dim / --attention-head-dim = "
             f"{pooled_heads} heads, which must divide --cross-attention-dim {self.cross_attention_dim}; choose "
             "an --attention-head-dim that divides it"),
            (self.cross_attention_dim % self.text_heads == 0,
             f"--text-heads {self.text_heads} must divide the text width (--cross-attention-dim "
             f"{self.cross_attention_dim}); use one of "
             + ", ".join(str(d) for d in range(1, self.cross_attention_dim + 1) if self.cross_attention_dim % d == 0)),
            (self.max_caption_tokens >= 8, f"--max-caption-tokens {self.max_caption_tokens}: use at least 8"),
            (0.0 <= self.caption_dropout < 1.0,
             f"--caption-dropout {self.caption_dropout}: use a probability in [0, 1)"),
            (self.lr > 0, f"--lr must be above 0, got {self.lr}"),
            (self.vae_lr > 0, f"--vae-lr must be above 0, got {self.vae_lr}"),
            (self.kl_weight >= 0, f"--kl-weight must be 0 or more, got {self.kl_weight}"),
            (0.0 <= self.ema_decay <= 1.0, f"--ema-decay {self.ema_decay}: use a value in [0, 1]; 0.999 is usual"),
            (self.snr_gamma >= 0, f"--snr-gamma must be 0 (off) or more, got {self.snr_gamma}"),
            (self.sample_guidance >= 0, f"--sample-guidance must be 0 or more, got {self.sample_guidance}"),
            (self.vae_steps >= 0, f"--vae-steps must be 0 or more, got {self.vae_steps}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {self.warmup_steps}"),
            (self.sample_every >= 0, f"--sample-every must be 0 (only at the end) or a number of steps, "
             f"got {self.sample_every}"),
            (not self.zero_terminal_snr or self.prediction_type == "v_prediction",
             "--zero-terminal-snr needs --prediction-type v_prediction (at the last step there is no signal left, "
             "so predicting the noise says nothing about the image)"),
            (not self.cooldown_steps or (self.lr_schedule == "constant" and 0 < self.cooldown_steps <= self.steps),
             f"--cooldown-steps {self.cooldown_steps}: use it with --lr-schedule constant (cosine already decays), "
             f"and at most --steps ({self.steps})"),
            (not (self.vae_from and self.vae_steps), f"--vae-from {self.vae_from} replaces stage 1: set --vae-steps 0"),
            # A fresh run without stage 1 would train the diffusion model in the latent space of a random VAE.
            (self.vae_steps > 0 or self.vae_from,
             "--vae-steps 0 skips training the VAE, which only a run given one may do: give --vae-steps N (e.g. "
             "1500), or --vae-from DIR (a trained AutoencoderKL); a resume keeps the run's own --vae-steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise EgakuError(message)
        check_timestep_sampling(self.timestep_sampling, self.uniform_share, self.logit_std)
        parse_caption_weights(self.caption_weights)
        if self.mixed_precision == "fp16" and resolve_device(self.device).type != "cuda":
            raise EgakuError("--mixed-precision fp16 is for CUDA devices (on a CPU fp16 is slow and needs loss "
                             "scaling): use bf16 on the CPU")

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.steps


# Options that may change between a run and its resume without changing what is computed.
RESUME_IGNORE = {"resume", "export_only", "threads", "progress", "log_with", "out", "checkpoint_every",
                 "keep_checkpoints", "sample_every", "sample_guidance", "sample_steps", "device"}


# ----------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    heldout: np.ndarray  # uint8 [M, H, W, 3]: images never trained on (for VAE PSNR)
    vocabulary: list[str]  # texts the tokenizer is built from
    note: str = ""
    heldout_trained: bool = False  # a folder too small to hold any out: the PSNR images are training images


def psnr_label(data: ImageSet) -> str:
    return "PSNR on training images (none held out)" if data.heldout_trained else "held-out PSNR"


def parse_caption_weights(entries: list[str]) -> dict[str, float]:
    """``["small=2", ...]`` -> ``{"small": 2.0}``; anything else is an error saying what to write."""
    weights = {}
    for entry in entries:
        word, _, factor = entry.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not word.strip() or " " in word.strip() or not math.isfinite(value) or value <= 0:
            raise EgakuError(f"--caption-weights {entry!r}: write WORD=FACTOR with one caption word and a factor "
                             "above 0, e.g. small=2")
        weights[word.strip().lower()] = value
    return weights


def image_weights(captions: list[str], weights: dict[str, float]) -> torch.Tensor | None:
    """Each image's draw weight under ``--caption-weights`` (None: every image equally likely)."""
    if not weights:
        return None
    words = [set(c.lower().split()) for c in captions]
    for word in weights:
        if not any(word in w for w in words):
            raise EgakuError(f"--caption-weights {word}=...: no training caption has the word {word!r}")
    return torch.tensor([math.prod(f for word, f in weights.items() if word in w) for w in words],
                        dtype=torch.float64)


def draw_batch(n: int, batch_size: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of one training batch: uniform, or by ``weights`` (with replacement either way)."""
    if weights is None:
        return torch.randint(0, n, (batch_size,), generator=gen)
    return torch.multinomial(weights, batch_size, replacement=True, generator=gen)


def load_training_images(opts: TrainLdmOptions) -> ImageSet:
    if opts.data == "shapes":
        images, specs = shapes.make_dataset(opts.shapes_images, opts.seed, "train", opts.resolution)
        heldout, _ = shapes.make_dataset(256, opts.seed + 7919, "all", opts.resolution)
        # The tokenizer knows every word of the world (the star included): a LoRA can then teach the
        # untrained "star" token instead of spelling it out of byte tokens.
        return ImageSet(images, [s.caption for s in specs], heldout, shapes.vocabulary_captions(),
                        f"shapes: {len(specs)} rendered images, {len(shapes.training_specs())} combinations")
    from ..data.folder import scan_image_folder

    scan = scan_image_folder(opts.data, caption_template=opts.caption_template)
    print(scan.report(), file=sys.stderr)
    arrays = []
    for item in scan.items:
        with scan.load(item) as img:
            arrays.append(np.asarray(_resize_crop(img, opts.resolution)))
    images = np.stack(arrays)
    captions = [i.caption for i in scan.items]
    # Hold out up to 5% (at most 64) for PSNR; tiny folders are measured on training images, and say so.
    n_hold = min(64, len(images) // 20)
    order = np.random.default_rng(opts.seed).permutation(len(images))
    if n_hold:
        hold, keep = order[:n_hold], order[n_hold:]
        return ImageSet(images[keep], [captions[i] for i in keep], images[hold], captions,
                        f"{opts.data}: {len(keep)} training images, {n_hold} held out")
    return ImageSet(images, captions, images[: min(len(images), 64)], captions,
                    f"{opts.data}: {len(images)} images (too few to hold any out: PSNR is on training images)",
                    heldout_trained=True)


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Everything random in a step comes from here, so a resumed run draws the same numbers; each process of a
    distributed run (``rank``) draws its own."""
    return torch.Generator().manual_seed(step_seed(seed, step, rank))


def sample_timesteps(opts: TrainLdmOptions, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps in ``[0, num_train_timesteps)``, drawn as ``opts.timestep_sampling`` says."""
    return draw_timesteps(n, opts.num_train_timesteps, opts.timestep_sampling, opts.logit_mean, opts.logit_std,
                          opts.uniform_share, gen)


# ---------------------------------------------------------------------------------------------- models

def build_vae(opts: TrainLdmOptions):
    from diffusers import AutoencoderKL

    n = len(opts.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=opts.latent_channels,
        block_out_channels=tuple(opts.vae_channels), layers_per_block=opts.vae_layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=_groups(opts.vae_channels), sample_size=opts.resolution,
    )
    # Start with a small posterior std (exp(-4)): at the default init every latent is drowned in unit
    # noise and the first few hundred steps only learn to shrink it; the tiny KL weight keeps it small.
    with torch.no_grad():
        vae.quant_conv.bias[opts.latent_channels:] -= 8.0
    return vae


def build_text_encoder(opts: TrainLdmOptions, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=opts.cross_attention_dim,
        intermediate_size=4 * opts.cross_attention_dim, num_hidden_layers=opts.text_layers,
        num_attention_heads=opts.text_heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_unet(opts: TrainLdmOptions, vae=None):
    """The UNet for ``vae``'s latent space (the VAE ``opts`` describes when not given)."""
    from diffusers import UNet2DConditionModel

    up = tuple(b.replace("Down", "Up") for b in reversed(opts.unet_down_blocks))
    blocks = len(vae.config.block_out_channels) if vae is not None else len(opts.vae_channels)
    channels = vae.config.latent_channels if vae is not None else opts.latent_channels
    latent = opts.resolution // 2 ** (blocks - 1)
    pooled = {"addition_embed_type": "text",
              "addition_embed_type_num_heads": max(1, opts.cross_attention_dim // opts.attention_head_dim)
              } if opts.unet_pooled_text else {}
    return UNet2DConditionModel(
        sample_size=latent, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(opts.unet_channels), layers_per_block=opts.unet_layers_per_block,
        down_block_types=tuple(opts.unet_down_blocks), up_block_types=up,
        cross_attention_dim=opts.cross_attention_dim, attention_head_dim=opts.attention_head_dim,
        norm_num_groups=_groups(opts.unet_channels), **pooled,
    )


def build_noise_scheduler(opts: TrainLdmOptions):
    from diffusers import DDPMScheduler

    # SD 1.x's schedule (scaled-linear betas), so the exported model behaves like SD with every sampler;
    # with zero terminal SNR, as SD 2.x-v models fine-tuned that way: rescaled betas, trailing timesteps
    # (sampling must start at the last training timestep, the pure-noise one).
    return DDPMScheduler(num_train_timesteps=opts.num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=opts.prediction_type, clip_sample=False,
                         steps_offset=1,  # used by "leading" spacing only; diffusers warns on any other value
                         rescale_betas_zero_snr=opts.zero_terminal_snr,
                         timestep_spacing="trailing" if opts.zero_terminal_snr else "leading")


def run_tokenizer(out: Path, vocabulary: list[str], opts: TrainLdmOptions, resuming: bool, save: bool = True):
    """The run's tokenizer: built from the captions once and kept in ``OUT/tokenizer`` (``save``: by the main
    process), so a resumed run keeps its token ids even when the tokenizer builder has changed since it started."""
    from transformers import CLIPTokenizer

    from ..models.tokenizer import build_clip_tokenizer

    folder = out / "tokenizer"
    if resuming and (folder / "tokenizer_config.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    tokenizer = build_clip_tokenizer(vocabulary, model_max_length=opts.max_caption_tokens,
                                     merge_order=opts.tokenizer_merges)
    if save:
        tokenizer.save_pretrained(folder)
    return tokenizer


def _groups(channels: list[int]) -> int:
    return math.gcd(32, *channels)


def _lr_lambda(warmup: int, total: int, schedule: str = "cosine", cooldown: int = 0):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return min(1.0, (total - step) / cooldown) if cooldown else 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _check_schedule_change(saved: dict, opts: TrainLdmOptions, step: int, path: Path) -> None:
    """Refuse a resume whose new --steps/--cooldown-steps would change a learning rate already used."""
    saved_cooldown = saved["cooldown_steps"]
    if (saved["steps"], saved_cooldown) == (opts.steps, opts.cooldown_steps):
        return
    saved_start = saved["vae_steps"] + saved["steps"] - saved_cooldown
    if saved_cooldown and step > saved_start:
        raise EgakuError(f"cannot resume from {path} (step {step}) with other --steps or --cooldown-steps: its "
                         f"cooldown began at step {saved_start}. Resume with --steps {saved['steps']} "
                         f"--cooldown-steps {saved_cooldown}")
    start = opts.total_steps - opts.cooldown_steps
    if opts.cooldown_steps and step > start:
        raise EgakuError(f"cannot resume from {path} (step {step}) with --cooldown-steps {opts.cooldown_steps}: "
                         f"the cooldown would start at step {start}, before the checkpoint. Use at most "
                         f"{opts.total_steps - step} cooldown steps, or more --steps")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def vae_round_trips(vae, images: np.ndarray, batch: int = 64):
    """(input, reconstruction) tensor pairs in [-1, 1], ``batch`` uint8 images at a time (posterior mode)."""
    vae.eval()
    for i in range(0, len(images), batch):
        x = arrays_to_tensor(images[i:i + batch]).to(vae.device)
        yield x, vae.decode(vae.encode(x).latent_dist.mode()).sample


def measure_vae(vae, images: np.ndarray, batch: int = 64) -> float:
    return sum(psnr(y, x) * len(x) for x, y in vae_round_trips(vae, images, batch)) / len(images)


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled per step during diffusion training)."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(arrays_to_tensor(images[i:i + batch]).to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def make_pipeline(vae, text_encoder, tokenizer, unet, opts: TrainLdmOptions):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # DPM-Solver++ (2M) from the training noise schedule: good samples in 20 steps, egaku's default.
    scheduler = DPMSolverMultistepScheduler.from_config(build_noise_scheduler(opts).config,
                                                        algorithm_type="dpmsolver++", solver_order=2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], steps: int, guidance: float, seed: int, size: int) -> Image.Image:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                  height=size, width=size).images
    return image_grid(images, cols=min(len(images), 4))


# -------------------------------------------------------------------------------------------- training

def mixed_precision(precision: str, device: torch.device):
    """The diffusion stage's forward-pass context (a function returning a fresh one each step) and gradient
    scaler for ``--mixed-precision``.

    Autocast runs convolutions and matmuls in half precision while the weights, their gradients and the
    optimizer stay fp32. fp16's narrow range needs loss scaling; bf16 has fp32's range and needs none, so
    its scaler is disabled and passes everything through unchanged."""
    if precision == "no":
        return contextlib.nullcontext, torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    @contextlib.contextmanager
    def forward_context():
        with torch.autocast(device.type, dtype=dtype), half_precision_attention(device, dtype):
            yield

    return forward_context, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _progress(opts: TrainLdmOptions, start: int, total: int, main: bool = True):
    return progress_bar(total, start, desc="train-ldm", disable=not (opts.progress and main))


class VaeRoundTrip(torch.nn.Module):
    """The VAE stage's forward (encode, sample a latent, decode) as one module call, which is what
    DistributedDataParallel needs to all-reduce the VAE's gradients."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample(generator=gen)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        return recon, kl


def train_ldm(opts: TrainLdmOptions) -> Path:
    """Run (or resume) both stages and export the pipeline; returns ``OUT/model``."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.threads))
    try:
        return _train(opts)
    finally:
        torch.set_num_threads(threads_before)


def check_vae_folder(folder: str) -> None:
    """--vae-from names a diffusers AutoencoderKL folder; a pipeline folder, or another model's, is named as such."""
    path = Path(folder)
    if (path / "model_index.json").is_file() and (path / "vae" / "config.json").is_file():
        raise EgakuError(f"--vae-from {folder} is a whole pipeline; give its VAE: --vae-from {path / 'vae'}")
    try:
        kind = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        kind = None
    if kind != "AutoencoderKL":
        what = f"a {kind} folder" if kind else "not a diffusers model folder (no readable config.json)"
        raise EgakuError(f"--vae-from {folder} is {what}; give a trained AutoencoderKL folder, such as an earlier "
                         "run's OUT/model/vae")


def _train(opts: TrainLdmOptions) -> Path:
    from diffusers.training_utils import EMAModel

    opts = checked_run_paths(opts, {"--data": "data"})
    out = Path(opts.out)
    if opts.vae_from:
        check_vae_folder(opts.vae_from)
    ckpts = Checkpoints(out, keep=opts.keep_checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    config = to_dict(opts)
    resolve_device(opts.device)  # --device cuda without a GPU is an error before anything else
    accelerator = make_accelerator(opts.device)  # mixed precision stays this trainer's own (see mixed_precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    def say(line: str) -> None:
        if main:
            print(line, file=sys.stderr)

    def ddp(model):  # one process trains the model itself; several, a DistributedDataParallel wrapper of it
        return accelerator.prepare(model) if world > 1 else model

    if not (opts.resume or opts.export_only):
        ckpts.check_fresh_start()
    if opts.export_only and not opts.resume and ckpts.latest() is None:
        raise EgakuError(f"--export-only: {out} holds no checkpoint to export; train a run there first (without "
                         "--export-only)")
    resume = "latest" if opts.export_only and not opts.resume else opts.resume
    resume_path = ckpts.resolve(resume) if resume else None
    # before the data is read: a checkpoint of another trainer is refused at once
    resumed_config = trainer_config(resume_path, "train-ldm") if resume_path is not None else {}
    # a guidance measured after an earlier export and written into its egaku_defaults.json is kept by this run's
    # export: the file differs from what that export wrote (the guidance of its run, where older runs did not record
    # it). A broken file is an error now, not after training.
    written = read_model_defaults(out / "model") if resume_path is not None else {}
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if (resume and summary_path.is_file()) else {}
    exported = summary.get("exported_guidance", resumed_config.get("sample_guidance"))
    hand_edited = written if written and written["guidance_scale"] != exported else {}
    started = time.time()

    # 1. Data and models (seeded), then the checkpoint to resume from, if any
    data = load_training_images(opts)
    say(data.note)
    fingerprint = data_fingerprint(data.images, data.captions)  # a resume must find this data again
    draw_weights = image_weights(data.captions, parse_caption_weights(opts.caption_weights))
    if draw_weights is not None:
        say(f"--caption-weights: {', '.join(opts.caption_weights)}; images drawn by their weights "
            f"({int((draw_weights != 1).sum())} of {len(draw_weights)} weighted)")
    tokenizer = run_tokenizer(out, data.vocabulary, opts, resuming=bool(opts.resume or opts.export_only), save=main)
    torch.manual_seed(opts.seed)
    vae = build_vae(opts)  # built even when replaced: text encoder and UNet then start from the same seeded weights
    if opts.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(opts.vae_from)
    text_encoder = build_text_encoder(opts, tokenizer)
    unet = build_unet(opts, vae)
    noise_scheduler = build_noise_scheduler(opts)
    device = resolve_device(opts.device) if world == 1 else accelerator.device
    step, state, weights = 0, None, {}
    if resume_path is not None:
        # With a constant learning rate --steps only says where to stop, so a run may be extended.
        # So may its cooldown, from the checkpoint's step on: the steps before it are the same either way.
        extendable = opts.export_only or opts.lr_schedule == "constant"
        ignore = RESUME_IGNORE | ({"steps", "cooldown_steps"} if extendable else set())
        path = resume_path
        defaults = to_dict(TrainLdmOptions())  # for options a checkpoint predates
        weights, state = load_checkpoint(path, config, ignore=ignore, defaults=defaults)
        if not opts.export_only:
            check_same_fingerprint(state, fingerprint, len(data.images), path)
        step = int(state["step"])
        if not opts.export_only:
            check_same_world(state, world, path, "each process draws its own batches")
        if extendable and not opts.export_only:
            _check_schedule_change(saved_config(path, defaults), opts, step, path)
        if opts.export_only and step <= opts.vae_steps:
            raise EgakuError(f"--export-only: {path} is from the VAE stage (step {step} of {opts.vae_steps}); "
                             "there is no diffusion model to export yet. Resume training instead")
        vae.load_state_dict(weights["vae"])
        say(f"resumed from {path} (step {step})")
    for model in (vae, text_encoder, unet):
        model.to(device)
    if main and not opts.export_only:
        save_config(opts, out / "config.json")
    elif main and not (out / "config.json").is_file():
        # An export trains nothing: the run's config is the checkpoint's, not this command's (--steps may differ).
        (out / "config.json").write_text((resume_path / "config.json").read_text())
    log = MetricsLog(out / "losses.csv", start_step=None if opts.export_only else step,
                     tensorboard=opts.log_with == "tensorboard" and not opts.export_only,
                     resumed_from=resume_path) if main else None
    base_seconds = float(summary.get("train_seconds", 0.0))  # wall time of the runs before this resume
    bar = _progress(opts, 0 if opts.export_only else step, opts.total_steps, main)

    # 2. Stage 1: the VAE
    if step < opts.vae_steps and not opts.export_only:
        vae.train()
        optim = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(opts.warmup_steps, opts.vae_steps))
        if state is not None:
            optim.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            restore_rng(state["rng"])
        x_all = arrays_to_tensor(data.images)
        crop = opts.vae_crop or opts.resolution
        round_trip = ddp(VaeRoundTrip(vae))
        with StopOnSignal(quiet=not main) as stop:
            while step < opts.vae_steps:
                gen = step_generator(opts.seed, step, rank)
                idx = torch.randint(0, len(x_all), (opts.vae_batch_size,), generator=gen)
                top, left = torch.randint(0, opts.resolution - crop + 1, (2,), generator=gen).tolist()
                x = x_all[idx, :, top:top + crop, left:left + crop].to(device)
                recon, kl = round_trip(x, gen)
                rec_loss = F.mse_loss(recon, x)
                loss = rec_loss + opts.kl_weight * kl
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
                optim.step()
                sched.step()
                step += 1
                (mean_loss, mean_recon, mean_kl), interrupted = agree_on_step(
                    accelerator, stop.requested, loss.item(), rec_loss.item(), kl.item())
                check_finite(mean_loss, step, ckpts)
                bar.update(1)
                if main and (step % 25 == 0 or step == opts.vae_steps):
                    bar.set_postfix(stage="vae", loss=f"{mean_recon:.5f}")
                    log.log(step, stage=1, loss=mean_loss, recon=mean_recon, kl=mean_kl, lr=sched.get_last_lr()[0])
                if step % opts.checkpoint_every == 0 or step == opts.vae_steps or interrupted:
                    if main:
                        ckpts.save(step, {"vae": vae.state_dict()},
                                   {"step": step, "optimizer": optim.state_dict(), "lr_scheduler": sched.state_dict(),
                                    "rng": capture_rng(), "data_fingerprint": fingerprint,
                                    "data_images": len(data.images), "world": world}, config)
                    accelerator.wait_for_everyone()
                if interrupted:
                    bar.close()
                    stop_after_signal(step, ckpts.latest(), quiet=not main)
        del optim, sched, x_all, round_trip
        state = None  # the diffusion stage starts fresh from here

    vae.eval().requires_grad_(False)
    if main and "vae_psnr" not in summary and (opts.vae_steps > 0 or opts.vae_from):
        summary["vae_psnr"] = round(measure_vae(vae, data.heldout), 3)
        summary["vae_psnr_images"] = len(data.heldout)
        summary["vae_seconds"] = round(base_seconds + time.time() - started, 1)
        heldout, recon = next(vae_round_trips(vae, data.heldout[:8]))
        (out / "samples").mkdir(exist_ok=True)
        image_grid(to_pil_images(heldout) + to_pil_images(recon), cols=8).save(
            out / "samples" / "vae-reconstructions.png")
        say(f"VAE: {psnr_label(data)} {summary['vae_psnr']:.2f} dB")

    # 3. Latents of every training image, scaled to unit variance
    bar.set_postfix(stage="encoding")
    if opts.export_only and state is not None and "scaling_factor" in state:
        means = stds = torch.zeros(0)  # exporting only: nothing to train on
        scaling = float(state["scaling_factor"])
    else:
        means, stds = encode_all(vae, data.images)
        scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    ids = tokenizer(data.captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids

    # 4. Stage 2: text encoder + UNet
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=opts.ema_decay, use_ema_warmup=True, power=2 / 3)
    names = ([f"unet.{n}" for n, _ in unet.named_parameters()]
             + [f"text_encoder.{n}" for n, _ in text_encoder.named_parameters()])
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(opts.warmup_steps, opts.steps, opts.lr_schedule,
                                                                    opts.cooldown_steps))
    if state is not None and step > opts.vae_steps:
        unet.load_state_dict(weights["unet"])
        text_encoder.load_state_dict(weights["text_encoder"])
        ema.shadow_params = [weights["ema"][n].to(device) for n in names]
        ema.optimization_step = int(state["ema_step"])
        if not opts.export_only:
            optim.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            restore_rng(state["rng"])
    prompts = opts.sample_prompts or (DEFAULT_SAMPLE_PROMPTS if opts.data == "shapes"
                                      else sorted(set(data.captions))[:8])

    def checkpoint() -> None:
        if main:
            summary.update(step=step, train_seconds=round(base_seconds + time.time() - started, 1))
            summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            ckpts.save(step, {"vae": vae.state_dict(), "unet": unet.state_dict(),
                              "text_encoder": text_encoder.state_dict(), "ema": dict(zip(names, ema.shadow_params))},
                       {"step": step, "optimizer": optim.state_dict(), "lr_scheduler": sched.state_dict(),
                        "rng": capture_rng(), "ema_step": ema.optimization_step, "scaling_factor": scaling,
                        "data_fingerprint": fingerprint, "data_images": len(data.images), "world": world,
                        **({"grad_scaler": scaler.state_dict()} if scaler.is_enabled() else {})}, config)
        accelerator.wait_for_everyone()

    def ema_pipeline():
        """A pipeline holding copies of the EMA weights (the training weights stay untouched)."""
        import copy

        u, t = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        ema.copy_to(list(u.parameters()) + list(t.parameters()))
        return make_pipeline(vae, t.eval(), tokenizer, u.eval(), opts)

    forward_context, scaler = mixed_precision(opts.mixed_precision, device)
    if state is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    unet.train()
    text_encoder.train()
    # the models' forward passes go through these (DDP wrappers when there are several processes); their weights,
    # EMA, checkpoints and samples through the models themselves
    unet_forward, text_forward = (ddp(unet), ddp(text_encoder)) if not opts.export_only else (unet, text_encoder)
    (out / "samples").mkdir(exist_ok=True)  # not only made with the VAE reconstructions: a resume may skip those
    with StopOnSignal(quiet=not main) as stop:
        while step < opts.total_steps and not opts.export_only:
            gen = step_generator(opts.seed, step, rank)
            idx = draw_batch(len(means), opts.batch_size, draw_weights, gen)
            latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
            if opts.flip:
                flip = torch.rand(opts.batch_size, generator=gen) < 0.5
                latents = torch.where(flip[:, None, None, None], latents.flip(-1), latents)
            drop = torch.rand(opts.batch_size, generator=gen) < opts.caption_dropout
            input_ids = torch.where(drop[:, None], empty_ids, ids[idx])
            noise = torch.randn(latents.shape, generator=gen)
            timesteps = sample_timesteps(opts, opts.batch_size, gen)
            latents, noise, timesteps, input_ids = (t.to(device) for t in (latents, noise, timesteps, input_ids))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = (noise if opts.prediction_type == "epsilon"
                      else noise_scheduler.get_velocity(latents, noise, timesteps))
            with forward_context():
                hidden = text_forward(input_ids)[0]
                pred = unet_forward(noisy, timesteps, hidden).sample.float()
            if opts.snr_gamma > 0:
                weight = min_snr_weights(noise_scheduler, timesteps, opts.snr_gamma, opts.prediction_type)
                loss = (F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)) * weight).mean()
            else:
                loss = F.mse_loss(pred, target)
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optim)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optim)
            scaler.update()
            sched.step()
            ema.step(params)
            step += 1
            (mean_loss,), interrupted = agree_on_step(accelerator, stop.requested, loss.item())
            check_finite(mean_loss, step, ckpts)
            bar.update(1)
            # the last step too: the log ends where the run does
            if main and (step % 25 == 0 or step == opts.total_steps):
                bar.set_postfix(stage="unet", loss=f"{mean_loss:.4f}")
                log.log(step, stage=2, loss=mean_loss, lr=sched.get_last_lr()[0])
            if step % opts.checkpoint_every == 0 or step == opts.total_steps or interrupted:
                checkpoint()
            if interrupted and step == opts.total_steps:  # trained to the end: what is left is the export
                say("interrupted at the last step: exporting the model")
                break
            if interrupted:
                bar.close()
                stop_after_signal(step, ckpts.latest(), quiet=not main)
            done = step - opts.vae_steps
            if main and opts.sample_every and done % opts.sample_every == 0 and step < opts.total_steps:
                grid = sample_grid(ema_pipeline(), prompts, opts.sample_steps, opts.sample_guidance, opts.seed,
                                   opts.resolution)
                grid.save(out / "samples" / f"step-{step:06d}.png")
                log.image(step, "samples", grid)
    bar.close()
    if not opts.export_only:
        check_replicas_agree(accelerator, list(vae.parameters()) + params, "the VAE, UNet and text encoder weights")
    if not main:
        accelerator.wait_for_everyone()  # until the main process has exported the model
        return out / "model"
    log.close()

    # 5. Export the EMA weights as a standard pipeline
    pipe = ema_pipeline()
    model_dir = out / "model"
    write_pipeline(pipe, model_dir)
    if not hand_edited:  # (an edited file is left as it is, whatever else the hand wrote in it)
        write_model_defaults(model_dir, {"guidance_scale": opts.sample_guidance})
        summary["exported_guidance"] = opts.sample_guidance  # what a later export compares the file with
    elif hand_edited["guidance_scale"] != opts.sample_guidance:
        say(f"kept {model_dir / MODEL_DEFAULTS_FILE} as edited (guidance {hand_edited['guidance_scale']:g}), not "
            f"--sample-guidance {opts.sample_guidance:g}; delete it and export again (--export-only) to write that")
    (out / "samples").mkdir(exist_ok=True)
    sample_grid(pipe, prompts, opts.sample_steps, opts.sample_guidance, opts.seed,
                opts.resolution).save(out / "samples" / f"final-step-{step:06d}.png")
    if not opts.export_only:
        summary["train_seconds"] = round(base_seconds + time.time() - started, 1)
    summary.update(step=step, scaling_factor=scaling, data=data.note, model=str(model_dir))
    summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    say(f"wrote {model_dir} (step {step}); VAE {psnr_label(data)} {summary.get('vae_psnr', float('nan')):.2f} dB")
    accelerator.wait_for_everyone()
    return model_dir


def train_ldm_command(opts: TrainLdmOptions) -> None:
    train_ldm(opts)
