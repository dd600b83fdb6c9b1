"""LoRA fine-tuning of a Stable Diffusion pipeline on a user's image folder.

The loop (read top to bottom in ``train_lora``):
  1. scan the folder (captions, skip report) and load the base pipeline; freeze all of it;
  2. add peft LoRA adapters (UNet attention by default; text encoder and conv layers optional) and keep
     their parameters in fp32 even when the frozen base runs in fp16/bf16 (fp16 trainable weights are
     what makes GradScaler fail with "Attempting to unscale FP16 gradients"); with ``--train-tokens``
     the embeddings of those words train too (pivotal tuning), every other row of the table held fixed;
  3. bucket images by aspect ratio and, when the augmentations allow, encode every image with the VAE
     and every caption with the text encoder ONCE (the latent distribution's mean and std are cached, so
     each step still draws a fresh ``latent_dist.sample()``); a frozen, cached text encoder is dropped;
  4. each step: noise and timesteps, ``noise_scheduler.add_noise``, target = epsilon or v as the model's
     scheduler config says, MSE (optionally weighted by loss masks) with optional min-SNR-gamma weighting and
     noise offset;
  5. atomic checkpoints (LoRA weights, optimizer, LR scheduler, RNG, step, data position), validation
     grids at fixed prompts and seeds, CSV loss log;
  6. write ``pytorch_lora_weights.safetensors`` (diffusers/PEFT keys) and/or the kohya file.

Every random draw of a step (noise, timesteps, flips, dropout) comes from a generator seeded by (seed,
micro-batch, process), and the batch order of an epoch from (seed, epoch): a resumed run replays exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import gc
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import option, save_config, to_dict
from ..paths import check_outside, checked_run_paths, file_sha256
from ..data.buckets import BucketBatches, fit_to_bucket, make_buckets, nearest_bucket, to_tensor
from ..data.captions import tag_frequency, vary_caption
from ..data.folder import counted, scan_image_folder
from ..data.images import image_grid
from ..data.masks import check_mask_dir, find_mask_files, latent_masks, masked_mean
from ..errors import EgakuError, first_line
from ..lora.formats import (EMBEDDINGS_DIR, LORA_WEIGHTS_NAME, bundle_tensors, canonical_module,
                            finish_diffusers_file, kohya_metadata, peft_pairs, peft_to_kohya, save_embedding,
                            single_token_ids, steps_metadata)
from ..models.loading import check_model_files
from ..models.text import check_clip_skip, encode_captions, encode_prompts, prompt_chunks
from ..progress import progress_bar
from .runtime import (HUBER_SCHEDULES, LOG_WITH, LOSS_TYPES, TIMESTEP_SAMPLING, Checkpoints, MetricsLog,
                      StopOnSignal, agree_on_step, another_process_lost, atomic_save_file, capture_rng, check_finite,
                      check_log_with, check_loss_type, check_replicas_agree, check_same_world,
                      check_timestep_sampling, checkpoint_step, debiased_weights, draw_timesteps, either,
                      elementwise_loss, half_precision_attention, huber_thresholds, load_checkpoint, make_accelerator,
                      min_snr_weights, permissions_by_umask, restore_rng, step_folders, stop_after_signal, train_again,
                      trainer_config)

LR_SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_CONV = ["conv1", "conv2", "conv_shortcut"]


@dataclass
class TrainLoraOptions:
    data: str = option("", help="image folder: class sub-folders, caption files (.txt/.caption) or metadata.jsonl/csv")
    out: str = option("lora-out", help="output folder for the LoRA, checkpoints, samples and logs")
    model: str = option("builtin", help="base pipeline: built-in name, diffusers folder, single .safetensors file "
                        "or hub id")
    model_config: str = option("", help="with a single-file --model: a local diffusers folder of the same "
                               "architecture whose configs describe it (needed offline)")
    allow_pickle: bool = option(False, help="allow a .ckpt/.pt/.bin --model (read with weights_only=True)")
    # data
    caption_template: str = option("{class}", help="caption for images in class folders, e.g. 'a photo of {class}'")
    trigger: str = option("", help="trigger word added to every caption (and the caption of uncaptioned images)")
    min_images: int = option(4, help="refuse to train on fewer usable images than this")
    resolution: int | None = option(None, help="bucket area is at most resolution^2 (default: the model's native "
                                    "size: 512 for SD 1.x, 64 for the built-in model)")
    max_aspect: float = option(2.0, help="most elongated bucket, as long side / short side")
    clip_skip: int = option(1, help="text-encoder layer captions are read from, counted from the end (kohya's "
                            "--clip_skip): 2 for NovelAI-derived anime models; generate with the same --clip-skip")
    random_flip: bool = option(False, help="flip images horizontally at random (both orientations are cached)")
    # prior preservation (DreamBooth; kohya's regularization images)
    prior_data: str = option("", help="folder of regularization images: what the base model already draws, with "
                             "captions; mixed into the batches so that the LoRA keeps the model's old prompts")
    prior_images: int = option(0, help="wanted regularization images: when --prior-data holds fewer, the base "
                               "model generates the rest from --prior-prompts (and they are kept for later runs)")
    prior_prompts: list[str] = option([], help="prompts for generating regularization images (cycled)")
    prior_loss_weight: float = option(1.0, help="loss weight of regularization images relative to training images")
    prior_guidance: float | None = option(None, help="guidance scale for generating regularization images (default: "
                                          "the model's own, as generate uses: 3 for the built-in model, else 7.5)")
    prior_target: str = option("data", help="what regularization images are trained towards: data (their own "
                               "noise, DreamBooth's prior preservation) or base (the frozen base model's prediction "
                               "for the same noisy latent and caption: the LoRA is pulled back exactly where it "
                               "changes the old prompts, without the noise of a data target)",
                               choices=["data", "base"])
    repeats: int = option(1, help="times each training image appears per epoch, regularization images once "
                          "(kohya's num_repeats): with 200 regularization images and 20 training images, 10 "
                          "keeps the two one to one instead of 1 to 10. A class folder named kohya's way "
                          "(10_sks dog) gives its own count, which this multiplies for training images")
    caption_dropout: float = option(0.0, help="share of images trained on the empty caption (kohya's "
                                    "caption_dropout_rate): keeps the unconditional prediction that "
                                    "classifier-free guidance subtracts in step with the adapter")
    weighted_captions: bool = option(False, help="read A1111's emphasis in captions, \"a (sks:1.2) dog\", as generate "
                                     "reads it in prompts (kohya's weighted_captions). Off: brackets are words")
    max_token_length: int = option(75, help="caption tokens the text encoder reads (kohya's max_token_length): 150 "
                                   "or 225 read a longer caption in chunks of 75 laid side by side, as generate "
                                   "reads a long prompt; the data report counts the captions cut",
                                   choices=[75, 150, 225])
    # tag captions ("sks dog, sitting, grass"): varied each step, so the concept is not tied to one tag order
    shuffle_caption: bool = option(False, help="shuffle each caption's comma-separated tags every step, after the "
                                   "first --keep-tokens (kohya's shuffle_caption); the text encoder then runs "
                                   "every step instead of being cached")
    keep_tokens: int = option(0, help="with --shuffle-caption or --caption-tag-dropout: how many leading tags "
                              "stay in place and are never dropped (the trigger word, the class)")
    caption_tag_dropout: float = option(0.0, help="drop each tag after the first --keep-tokens with this "
                                        "probability every step (kohya's caption_tag_dropout_rate)")
    # loss masks (kohya's masked loss)
    mask_dir: str = option("", help="folder of loss masks laid out like --data (same sub-folder and file name, any "
                           "image extension; kohya's conditioning_data_dir): white trains, black is left out, grey "
                           "weighs in between; each image's loss is the mean over its mask")
    alpha_mask: bool = option(False, help="use each training image's transparency as its loss mask (kohya's "
                              "alpha_mask); images without transparency train everywhere")
    unmasked_weight: float = option(0.0, help="loss weight where a mask is black (OneTrainer's unmasked_weight): "
                                    "above 0 the background still trains a little")
    # LoRA
    rank: int = option(8, help="LoRA rank (size of the low-rank update)")
    alpha: float = option(0.0, help="LoRA alpha; the update is scaled by alpha/rank (0 means alpha = rank)")
    dropout: float = option(0.0, help="dropout on the LoRA branch (0.1 helps on very small folders)")
    dora: bool = option(False, help="DoRA (Liu et al. 2024): each adapted layer also learns its output channels' "
                        "magnitude apart from their direction; written in the diffusers layout only (the default "
                        "--format becomes diffusers), which diffusers, egaku and merge-lora load")
    target_modules: list[str] = option(UNET_ATTENTION, help="UNet modules to adapt, by the end of their names "
                                       "(peft's target_modules; default: attention q/k/v/out); a comma-separated "
                                       "list is read as several")
    lora_conv: bool = option(False, help="also adapt the UNet ResNet convolutions (conv1/conv2/conv_shortcut)")
    conv_rank: int = option(0, help="rank of the --lora-conv layers (kohya's conv_dim; 0 = --rank)")
    conv_alpha: float = option(0.0, help="alpha of the --lora-conv layers (kohya's conv_alpha; 0 keeps the scale "
                               "alpha/rank of the attention layers)")
    train_text_encoder: bool = option(False, help="also add LoRA to the text encoder attention (disables text caching)")
    train_tokens: list[str] = option([], help="words whose token embeddings train beside the LoRA (pivotal tuning): "
                                              "a concept the base has no text for gets its own embedding, saved in "
                                              "OUT/embeddings/WORD.safetensors; each word must be one token")
    token_lr: float = option(0.0, help="learning rate of the --train-tokens embeddings (0 = --learning-rate)")
    inversion_steps: int = option(0, help="the first N steps train only the --train-tokens embeddings (textual "
                                  "inversion), the LoRA from step N on: pivotal tuning in Roich et al. 2022's order, "
                                  "the word found first and the weights tuned around it")
    init_lora: str = option("", help="start from this LoRA (a .safetensors file of either layout, or a train-lora "
                            "folder) instead of from zero, to train it further (kohya's network_weights); it must "
                            "have this run's --rank and adapt only layers this run trains; its trained words' "
                            "embeddings start their --train-tokens rows")
    token_init: list[str] = option([], help="one word per --train-tokens word whose embedding it starts from (textual "
                                            "inversion's initializer token, e.g. a related shape; a word of several "
                                            "tokens gives the mean of theirs); default: its own")
    # optimisation
    learning_rate: float = option(1e-4, help="AdamW learning rate (1e-4 is the diffusers LoRA default)")
    text_encoder_lr: float = option(0.0, help="learning rate for text-encoder LoRA (0 = same as --learning-rate)")
    loraplus_lr_ratio: float = option(0.0, help="LoRA+: the up (B) matrices learn this many times faster than the "
                                                "down (A) ones (kohya's loraplus_lr_ratio; 16 in the paper); 0 = off")
    lr_scheduler: str = option("constant", help="learning-rate schedule", choices=LR_SCHEDULES)
    lr_warmup_steps: int = option(0, help="linear warmup steps")
    weight_decay: float = option(1e-2, help="AdamW weight decay")
    optimizer: str = option("adamw", help="adamw; prodigy (Mishchenko & Defazio 2023: estimates its own step size, "
                            "--learning-rate 1.0 is its usual multiplier; needs the prodigyopt package); or "
                            "adafactor (transformers' Adafactor at a fixed --learning-rate, kohya's settings)",
                            choices=["adamw", "prodigy", "adafactor"])
    adam_8bit: bool = option(True, help="adamw: use bitsandbytes 8-bit AdamW on CUDA when it is installed")
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0 disables)")
    batch_size: int = option(1, help="images per batch per process")
    gradient_accumulation: int = option(1, help="micro-batches per optimizer step")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward: less memory, ~30% slower")
    max_steps: int = option(0, help="optimizer steps to train (0: use --epochs)")
    epochs: int = option(10, help="passes over the data when --max-steps is 0; as kohya counts them, a pass shows "
                         "each image its repeats (--repeats, a folder's N_ prefix) times")
    mixed_precision: str = option("no", help="run the frozen base in fp16/bf16 (LoRA weights stay fp32)",
                                  choices=["no", "fp16", "bf16"])
    # objective
    min_snr_gamma: float = option(0.0, help="min-SNR-gamma loss weighting (5.0 is the paper's value; 0 = off)")
    debiased_estimation: bool = option(False, help="weight each sample's loss by 1/sqrt(SNR) (1/(SNR+1) for "
                                       "v-prediction): debiased estimation, kohya's debiased_estimation_loss; with "
                                       "--min-snr-gamma both weights apply, as in kohya's trainer")
    noise_offset: float = option(0.0, help="noise offset (0.05-0.1 helps very dark/bright images; 0 = off)")
    input_perturbation: float = option(0.0, help="input perturbation gamma (Ning et al. 2023; diffusers' "
                                       "--input_perturbation, kohya's --ip_noise_gamma): the noisy input gets extra "
                                       "noise the target does not have, against sampling's exposure bias; 0.1 is "
                                       "the paper's value (0 = off)")
    loss_type: str = option("l2", help="l2 (MSE); huber (scheduled pseudo-Huber, kohya's --loss_type huber: L2 for "
                            "small errors, linear for large ones, so outliers such as a mislabelled image pull less); "
                            "smooth_l1 (the same divided by its threshold); or l1", choices=list(LOSS_TYPES))
    huber_c: float = option(0.1, help="huber/smooth_l1 threshold at the noisiest timestep (kohya's --huber_c)")
    huber_schedule: str = option("snr", help="how the huber threshold moves from 1 (clean timesteps) to --huber-c "
                                 "(noisy ones): snr (with the noise level), exponential (with the timestep) or "
                                 "constant (--huber-c throughout)", choices=list(HUBER_SCHEDULES))
    timestep_sampling: str = option("uniform", help="how training timesteps are drawn: uniform, or logit_normal "
                                    "(t/T = sigmoid(N(0, 1)), as in SD3: most at middle noise levels, where "
                                    "shapes and details form; the layout is the base model's already)",
                                    choices=list(TIMESTEP_SAMPLING))
    uniform_share: float = option(0.0, help="logit_normal: share of each batch's timesteps drawn uniformly instead")
    logit_mean: float = option(0.0, help="logit_normal: mean (below 0 favours less noisy timesteps, where fine detail "
                                         "forms; above 0 noisier ones)")
    logit_std: float = option(1.0, help="logit_normal: standard deviation")
    # speed
    cache_latents: bool = option(True, help="encode each image with the VAE once instead of every step")
    cache_dir: str = option("", help="also keep the latent/text cache on disk here, reused by later runs")
    # checkpoints, logs, validation
    checkpoint_every: int = option(500, help="write a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, help="how many checkpoints to keep")
    save_every: int = option(0, help="also write the LoRA as it is every N steps (kohya's --save_every_n_steps), "
                             "to OUT/steps/NAME-step000500/ (the step in six digits) in --format's layouts; they "
                             "are kept, so that the steps can be compared (0: only the final LoRA)")
    resume: str = option("", help="resume from 'latest' or a checkpoint folder")
    stop_at: int = option(0, help="end this session after step N with a checkpoint (resume later); 0 = run to the end")
    validation_prompts: list[str] = option([], help="prompts rendered at fixed seeds every --validation-every steps")
    validation_every: int = option(0, help="render the validation grid every N steps (0: only at the end)")
    validation_seeds: list[int] = option([0, 1], help="seeds of the validation images (one column each)")
    validation_steps: int = option(20, help="sampling steps for validation images")
    validation_guidance: float | None = option(None, help="classifier-free guidance scale for validation images "
                                               "(default: the model's own, as generate uses)")
    format: str | None = option(None, help="LoRA file layout to write: diffusers, kohya or both (default: both; "
                                "diffusers alone with --dora)", choices=["diffusers", "kohya", "both"])
    bundle_words: bool = option(False, help="with --train-tokens: also bundle the trained words in the kohya file "
                                "(bundle_emb.WORD.string_to_param.*), where A1111 reads them with the LoRA; diffusers' "
                                "load_lora_weights refuses such a file (the diffusers-layout file is unaffected)")
    save_precision: str = option("fp32", help="dtype of the written LoRA files (kohya's --save_precision): fp16 or "
                                 "bf16 halve them, as most shared LoRAs are; training and checkpoints stay fp32",
                                 choices=["fp32", "fp16", "bf16"])
    seed: int = option(0, help="seed for LoRA init, data order, noise and timesteps")
    device: str = option("auto", help="auto, cpu or cuda (under accelerate launch, accelerate decides)")
    progress: bool = option(True, help="show a progress bar")
    log_with: str = option("csv", help="csv: the loss log as CSV only; tensorboard: also TensorBoard event files "
                           "in OUT/logs (needs the tensorboard package), validation grids included",
                           choices=list(LOG_WITH))
    given_options: list[str] = option([], cli=False, help="the options a flag or preset set (filled by the CLI): a "
                                      "resume takes a new learning rate only from these")

    @property
    def varies_captions(self) -> bool:
        return self.shuffle_caption or self.caption_tag_dropout > 0

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha of the adapter on ``module`` (a module path): --conv-rank/--conv-alpha for the
        ResNet convolutions, --rank/--alpha for every other layer."""
        alpha = float(self.alpha or self.rank)
        if module.rsplit(".", 1)[-1] not in UNET_CONV:
            return self.rank, alpha
        rank = self.conv_rank or self.rank
        return rank, float(self.conv_alpha or alpha * rank / self.rank)

    def __post_init__(self):
        if self.format is None:  # DoRA's kohya layout is one other tools drop (see the --dora check below)
            self.format = "diffusers" if self.dora else "both"
        check_log_with(self.log_with)
        checks = [
            (self.rank >= 1, f"--rank must be at least 1, got {self.rank}"),
            (self.alpha >= 0, f"--alpha must be >= 0, got {self.alpha}"),
            (self.conv_rank >= 0, f"--conv-rank must be 0 (= --rank) or more, got {self.conv_rank}"),
            (self.conv_alpha >= 0, f"--conv-alpha must be >= 0, got {self.conv_alpha}"),
            (self.lora_conv or not (self.conv_rank or self.conv_alpha),
             "--conv-rank and --conv-alpha size the convolution layers' LoRA: add --lora-conv"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}"),
            # the optimizers hold the rates in float32, past whose range they fail with a traceback
            *((math.isfinite(value) and value * max(self.loraplus_lr_ratio, 1) < 3e38,
               f"{flag} {value:g} is beyond float32's range, in which the optimizer holds it") for flag, value in (
                ("--learning-rate", self.learning_rate), ("--token-lr", self.token_lr),
                ("--text-encoder-lr", self.text_encoder_lr))),
            (self.loraplus_lr_ratio >= 0, f"--loraplus-lr-ratio must be >= 0, got {self.loraplus_lr_ratio}"),
            (self.batch_size >= 1 and self.gradient_accumulation >= 1,
             "--batch-size and --gradient-accumulation must be >= 1"),
            (self.max_steps > 0 or self.epochs > 0, "give --max-steps or --epochs (> 0)"),
            (self.max_steps >= 0 and self.epochs >= 0, f"--max-steps and --epochs count steps and passes: give 0 or "
             f"more, got {self.max_steps} and {self.epochs}"),
            (self.resolution is None or self.resolution >= 8, f"--resolution {self.resolution} is too small"),
            (self.max_aspect >= 1, f"--max-aspect must be >= 1, got {self.max_aspect}"),
            (self.min_images >= 1, "--min-images must be at least 1"),
            (0 <= self.caption_dropout < 1, f"--caption-dropout must be in [0, 1), got {self.caption_dropout}"),
            (0 <= self.caption_tag_dropout < 1,
             f"--caption-tag-dropout must be in [0, 1), got {self.caption_tag_dropout}"),
            (self.keep_tokens >= 0, f"--keep-tokens must be 0 or more, got {self.keep_tokens}"),
            (not self.keep_tokens or self.varies_captions, "--keep-tokens holds tags in place while the others "
             "are shuffled or dropped: it needs --shuffle-caption or --caption-tag-dropout"),
            (self.prior_loss_weight >= 0, f"--prior-loss-weight must be >= 0, got {self.prior_loss_weight}"),
            (self.save_every >= 0, f"--save-every must be 0 (off) or a number of steps, got {self.save_every}"),
            (self.input_perturbation >= 0, f"--input-perturbation must be >= 0, got {self.input_perturbation}"),
            (self.repeats >= 1, f"--repeats must be 1 or more, got {self.repeats}"),
            (self.min_snr_gamma >= 0, f"--min-snr-gamma must be 0 (off) or positive (5 is the paper's value), got "
             f"{self.min_snr_gamma}: a negative weight would turn the loss into gradient ascent"),
            (self.noise_offset >= 0, f"--noise-offset must be 0 (off) or positive, got {self.noise_offset}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be 0 (only at the end) or a number of steps, got "
             f"{self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be 1 or more, got {self.keep_checkpoints}"),
            (self.validation_every >= 0, f"--validation-every must be 0 (only at the end) or a number of steps, got "
             f"{self.validation_every}"),
            (self.validation_steps >= 1, f"--validation-steps is the sampling steps of the validation images: give 1 "
             f"or more (20 is the default), got {self.validation_steps}"),
            (self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be 0 or more, got {self.lr_warmup_steps}"),
            (self.stop_at >= 0, f"--stop-at must be 0 (run to the end) or a step, got {self.stop_at}"),
            (self.prior_images >= 0, f"--prior-images must be 0 or more, got {self.prior_images}"),
            (self.inversion_steps >= 0, f"--inversion-steps must be 0 or more, got {self.inversion_steps}"),
            (not self.inversion_steps or self.train_tokens, "--inversion-steps trains the --train-tokens words alone "
             "first: name the words with --train-tokens"),
            *((value >= 0, f"{flag} must be 0 or more, got {value:g}") for flag, value in (
                ("--weight-decay", self.weight_decay), ("--max-grad-norm", self.max_grad_norm),
                ("--token-lr", self.token_lr), ("--text-encoder-lr", self.text_encoder_lr))),
            (not self.dora or self.format == "diffusers", "--dora writes the diffusers layout only: give --format "
             "diffusers or leave --format out (diffusers cannot read DoRA in the kohya layout, so egaku cannot "
             "check such a file)"),
            (self.optimizer != "prodigy" or self.learning_rate >= 0.1,
             f"--optimizer prodigy estimates the step size itself and --learning-rate multiplies it: give about "
             f"1.0, not {self.learning_rate:g}"),
            (self.clip_skip >= 1, f"--clip-skip counts layers from the end and starts at 1, got {self.clip_skip}"),
            (not (self.mask_dir and self.alpha_mask), "--mask-dir and --alpha-mask both give loss masks; choose one"),
            (0 <= self.unmasked_weight <= 1, f"--unmasked-weight must be in [0, 1], got {self.unmasked_weight}"),
            (self.unmasked_weight == 0 or self.mask_dir or self.alpha_mask,
             "--unmasked-weight weighs the black part of loss masks: it needs --mask-dir or --alpha-mask"),
            (not (self.prior_images or self.prior_prompts) or self.prior_data,
             "--prior-images/--prior-prompts need --prior-data: the folder the regularization images go to"),
            (self.prior_target == "data" or self.prior_data,
             "--prior-target base needs --prior-data: the regularization images whose prediction is kept"),
        ]
        for ok, message in checks:
            if not ok:
                raise EgakuError(message)
        check_timestep_sampling(self.timestep_sampling, self.uniform_share, self.logit_std)
        check_loss_type(self.loss_type, self.huber_c, self.huber_schedule)
        if self.token_init and len(self.token_init) != len(self.train_tokens):
            raise EgakuError(f"--token-init gives {len(self.token_init)} word(s) for {len(self.train_tokens)} "
                             "--train-tokens word(s): give one initializer word per trained word, in the same order")
        # kohya's and many GUIs' habit: one comma-separated value
        self.target_modules = [name.strip() for item in self.target_modules for name in item.split(",") if name.strip()]
        if not self.target_modules:
            raise EgakuError("--target-modules is empty; the default adapts UNet attention "
                             "(to_q, to_k, to_v, to_out.0)")


def _options_for_layers(layers: list[str], opts: TrainLoraOptions) -> str:
    """What to give so that this run trains ``layers`` (``unet.<module>``, ``text_encoder.<module>``), for the
    --init-lora error: a kohya LoRA adapts proj_in/proj_out and the feed-forward layers too, and its text-encoder
    part the MLP, which no option here trains."""
    unet = [name.split(".", 1)[1] for name in layers if name.startswith("unet.")]
    text = [name.split(".", 1)[1] for name in layers if name.startswith("text_encoder.")]
    fixes, targets = [], list(opts.target_modules)
    if any(m.rsplit(".", 1)[-1] in UNET_CONV for m in unet):
        fixes.append("--lora-conv")
    for module in unet:
        if module.rsplit(".", 1)[-1] in UNET_CONV:
            continue
        # the name after its block ("attn1.to_q", "ff.net.0.proj", "proj_in"), without attn1/attn2 for both
        short = re.sub(r"^attn\d\.", "", re.sub(r"^.*\b(?:transformer_blocks|attentions|resnets)\.\d+\.", "", module))
        if short not in targets:
            targets.append(short)
    if targets != list(opts.target_modules):
        fixes.append("--target-modules " + ",".join(targets))
    if any(m.rsplit(".", 1)[-1] in TEXT_ENCODER_ATTENTION for m in text) and not opts.train_text_encoder:
        fixes.append("--train-text-encoder")
    other = sorted({m.rsplit(".", 1)[-1] for m in text if m.rsplit(".", 1)[-1] not in TEXT_ENCODER_ATTENTION})
    if other:  # kohya trains the text encoder's MLP (fc1, fc2) beside its attention
        return ((f"give {' '.join(fixes)}; and " if fixes else "") +
                f"its text-encoder layers {', '.join(other)} are ones train-lora cannot train (--train-text-encoder "
                "adapts the attention, q/k/v/out_proj): it cannot continue this file; start from zero, or use it "
                "with generate --lora or merge-lora")
    if not fixes:
        return "give the --target-modules, --lora-conv and --train-text-encoder it was trained with"
    return f"give {' '.join(fixes)} (the layers it was trained on)"


def check_init_lora(path: Path, pairs: dict[str, dict[str, torch.Tensor]], adapted: set[str],
                    opts: TrainLoraOptions) -> dict[str, torch.Tensor]:
    """Whether ``opts.init_lora`` (``path``: its file; ``pairs``: its layers as ``lora_layers`` reads them, whose
    tensors may be the header's meta tensors) fits this run, whose adapters wrap the ``adapted`` layers
    (``trained_layers``): only layers this run trains, DoRA or not as this run, at this run's ranks, its trained
    words among --train-tokens. Names and shapes only, so that it runs on the file's header and the model's configs
    before the images are read (``check_layers_early``), and on the loaded model after. Returns its trained words'
    embeddings (``trained_embeddings``)."""
    from ..lora.apply import trained_embeddings

    outside = sorted(set(pairs) - adapted)
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise EgakuError(f"--init-lora {path} adapts {len(outside)} layer(s) this run does not train ({shown}); "
                         f"{_options_for_layers(outside, opts)}", param="init_lora")
    if any("magnitude" in pair for pair in pairs.values()) != opts.dora:
        raise EgakuError(f"--init-lora {path} is a {'DoRA' if not opts.dora else 'plain LoRA'} file and this run "
                         f"{'trains DoRA' if opts.dora else 'does not'}: give {'--no-dora' if opts.dora else '--dora'}",
                         param="init_lora")
    for full, pair in pairs.items():
        rank = opts.rank_and_alpha(full)[0]
        if pair["down"].shape[0] != rank:
            flag = "--conv-rank" if full.rsplit(".", 1)[-1] in UNET_CONV else "--rank"
            raise EgakuError(f"--init-lora {path} has rank {pair['down'].shape[0]} at {full}, this run trains rank "
                             f"{rank} there ({flag}); give {flag} {pair['down'].shape[0]} to train it further at its "
                             "own rank", param="init_lora")
    words = trained_embeddings(path)
    left_out = sorted(set(words) - set(opts.train_tokens))
    if left_out:  # its layers were trained with those vectors in place of the base's
        raise EgakuError(f"--init-lora {path} was trained with the word(s) {', '.join(left_out)} as token embeddings: "
                         f"give --train-tokens {' '.join(left_out)} so that they carry on with it", param="init_lora")
    return words


def trained_layers(unet, text_encoder) -> set[str]:
    """``unet.<module>`` and ``text_encoder.<module>`` of every layer the adapters of ``add_adapters`` wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {f"{component}.{name}" for component, model in (("unet", unet), ("text_encoder", text_encoder))
            if model is not None for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def start_from_lora(pipe, opts: TrainLoraOptions, token_ids: list[int]) -> str:
    """Put ``opts.init_lora``'s weights into the freshly added adapters (and its trained words' embeddings into
    their rows); returns a line for the log. The file's alpha is folded into the up weights, so its delta is
    the same at this run's alpha."""
    from peft.utils import set_peft_model_state_dict

    from ..lora.apply import lora_layers, resolve_lora
    from ..lora.formats import adaptable_modules

    path = resolve_lora(opts.init_lora, None, names_option="")
    pairs, alphas = lora_layers(path, adaptable_modules(pipe))
    adapted = trained_layers(pipe.unet, pipe.text_encoder)
    words = check_init_lora(path, pairs, adapted, opts)
    for component in ("unet", "text_encoder"):
        state = {}
        for full, pair in pairs.items():
            if full.startswith(component + "."):
                module = full.split(".", 1)[1]
                # the file's delta at this run's alpha (the ranks are the same)
                state[f"{module}.lora_A.weight"] = pair["down"].float()
                state[f"{module}.lora_B.weight"] = pair["up"].float() * (alphas[full] / opts.rank_and_alpha(full)[1])
                if "magnitude" in pair:
                    state[f"{module}.lora_magnitude_vector"] = pair["magnitude"].float()
        if state:
            result = set_peft_model_state_dict(getattr(pipe, component), state)
            if getattr(result, "unexpected_keys", None):
                raise EgakuError(f"--init-lora {path}: layers not placed: {result.unexpected_keys[:3]}",
                                 param="init_lora")
    table = pipe.text_encoder.get_input_embeddings().weight
    started_words = [w for w in opts.train_tokens if w in words]
    with torch.no_grad():
        for word, token in zip(opts.train_tokens, token_ids):
            if word in words:
                table[token] = words[word].reshape(-1).to(table)
    fresh = len(adapted) - len(pairs)
    return (f"started from {path}: {len(pairs)} LoRA layer(s)"
            + (f", {fresh} more start from zero" if fresh else "")
            + (f"; embeddings of {', '.join(started_words)}" if started_words else ""))


def model_layers(model: str, model_config: str = ""):
    """(UNet, text encoder) of ``--model`` built from their configs, without weights: call it under
    ``torch.device("meta")``, where it takes a moment whatever the model's size. None where the configs are not
    at hand without loading the model (a hub id, a single file without --model-config) or do not describe an SD
    1.x/2.x UNet and CLIP text encoder: the checks that need them then run on the loaded model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.loading import BUILTIN_DIR

    spec = str(model or "builtin")
    path = Path(spec).expanduser()
    if spec in ("tiny", "builtin") and path.exists():  # the loader refuses the clash: it is said there
        return None
    if spec == "tiny":
        from ..models.tiny import tiny_components

        parts = tiny_components()
        return parts["unet"], parts["text_encoder"]
    folder = (BUILTIN_DIR if spec == "builtin" else path if path.is_dir() else
              Path(model_config).expanduser() if path.is_file() and model_config else None)
    if folder is None:
        return None
    try:
        unet_config = UNet2DConditionModel.load_config(folder / "unet")
        text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        if (unet_config.get("_class_name") != "UNet2DConditionModel"
                or text_config.get("model_type") != "clip_text_model"):
            return None
        return (UNet2DConditionModel.from_config(unet_config),
                CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
    except Exception:  # noqa: BLE001 - configs that do not build: loading the model says what is wrong with them
        return None


def check_layers_early(opts: TrainLoraOptions) -> None:
    """--target-modules and --init-lora checked against the base model's layers built from its configs
    (``model_layers``) and the --init-lora file's header, no weights read: a name that matches no layer, or a LoRA
    of another rank, of layers this run does not train, DoRA where this run is not, is said before the images are
    read and the model loads. The same checks (``add_adapters``, ``start_from_lora``) run on the loaded model too,
    which is where they are made when the configs are not at hand."""
    from types import SimpleNamespace

    from ..lora.apply import checked_lora_layers, resolve_lora
    from ..lora.formats import adaptable_modules, read_lora_header, refuse_training_checkpoint

    if list(opts.target_modules) == UNET_ATTENTION and not opts.init_lora:
        return  # nothing a user gave to check: the default targets are in every SD UNet's attention
    # the global random state is the run's: the adapters added here draw from it (and the tiny model seeds it)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        layers = model_layers(opts.model, opts.model_config)
        if layers is None:
            return
        unet, text_encoder = layers
        add_adapters(unet, text_encoder, opts)  # check_target_modules
    if not opts.init_lora:
        return
    path = resolve_lora(opts.init_lora, None, names_option="")
    refuse_training_checkpoint(path)
    if path.suffix != ".safetensors":  # read_lora_file's error, when it is read
        return
    try:
        state, metadata = read_lora_header(path)
    except Exception:  # noqa: BLE001 - an unreadable file: reading it says so
        return
    modules = adaptable_modules(SimpleNamespace(unet=unet, text_encoder=text_encoder))
    pairs, _ = checked_lora_layers(state, metadata, modules, str(path), values=False)
    check_init_lora(path, pairs, trained_layers(unet, text_encoder), opts)


def folder_subsets(folders: list[tuple[str, list]]) -> dict[str, list]:
    """The items of each image folder by the folder's name, as kohya keys its subsets: a class folder (``10_sks
    dog``) by its own name, a folder inside one by its path from the top (``10_sks dog/close-ups``: its repeats
    are its class folder's), images at the top of ``folder`` by that folder's name (two folders of one name are
    one subset); folders without images are left out."""
    subsets: dict[str, list] = {}
    for folder, items in folders:
        for item in items:  # (a linked folder is named by where it is in the tree, not where it points)
            inside = Path(os.path.relpath(item.path.parent, folder)).as_posix()
            subsets.setdefault(Path(folder).resolve().name if inside == "." else inside, []).append(item)
    return subsets


def folder_tags(folders: list[tuple[str, list]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: the tag counts of each image folder's captions (``folder_subsets``)."""
    tags: dict[str, dict[str, int]] = {}
    for name, items in folder_subsets(folders).items():
        counts = tags.setdefault(name, {})
        for tag, n in tag_frequency([item.caption for item in items]).items():
            counts[tag] = counts.get(tag, 0) + n
    return tags


def dataset_dirs(folders: list[tuple[str, list]], repeats: int = 1) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: each image folder's repeats and image count (``folder_subsets``)."""
    return {name: {"n_repeats": items[0].repeats * repeats, "img_count": len(items)}
            for name, items in folder_subsets(folders).items()}


def bucket_info(buckets: list[tuple[int, int]], bucket_of: list[tuple[int, int]], slots: list[int],
                items: list) -> dict:
    """kohya's ``ss_bucket_info``: each aspect bucket an epoch draws from, keyed by its place in the run's list of
    ``buckets``, with its (width, height) in pixels and how many images an epoch takes from it (``slots``: the
    items an epoch holds, repeats counted, as kohya counts them), and the mean difference between each image's
    aspect ratio and its bucket's (each image once, as kohya's ``mean_img_ar_error``)."""
    counts = collections.Counter(bucket_of[i] for i in slots)
    errors = [abs(bw / bh - item.size[0] / item.size[1]) for item, (bw, bh) in zip(items, bucket_of)]
    return {"buckets": {str(buckets.index(b)): {"resolution": list(b), "count": counts[b]}
                        for b in sorted(counts, key=buckets.index)},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def data_manifest(scan, prior_scan=None) -> list[list]:
    """[folder kind, relative path, size in bytes, caption] of every image a run trains on, in order."""
    return [[kind, item.path.relative_to(folder.root).as_posix(), item.path.stat().st_size, item.caption]
            for kind, folder in (("data", scan), ("prior", prior_scan)) if folder is not None
            for item in folder.items]


def check_same_data(saved: list[list], current: list[list], checkpoint: Path, roots: dict[str, str]) -> None:
    """Refuse to resume on images or captions other than the checkpoint's: the data position it restores, and
    the weights a resumed run should end with, belong to those. ``roots``: the folder of each kind (data, prior,
    mask)."""
    if [list(row) for row in saved] == current:
        return
    before, now = {tuple(r[:2]): r for r in saved}, {tuple(r[:2]): r for r in current}
    parts = []
    for label, names in (("added", [k for k in now if k not in before]),
                         ("removed", [k for k in before if k not in now]),
                         ("changed (file or caption)", [k for k in now if k in before and list(before[k]) != now[k]])):
        if names:
            shown = ", ".join(str(Path(roots.get(kind) or kind) / name) for kind, name in names[:3])
            parts.append(f"{label}: {shown}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    raise EgakuError(f"cannot resume from {checkpoint}: the training images changed since it was written "
                     f"({'; '.join(parts) or 'their order changed'}). Put the folder back as it was, or start a new "
                     "run in another --out folder")


def make_optimizer(opts: TrainLoraOptions, params: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over ``params`` (groups with their own learning rates: LoRA+, text encoder, tokens)."""
    if opts.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise EgakuError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt "
                             "(or pip install 'egaku[prodigy]')") from None
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every run
            return Prodigy(params, lr=opts.learning_rate, weight_decay=opts.weight_decay)
    if opts.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate: Adafactor's own relative step and parameter scaling are for full models
        return Adafactor(params, lr=opts.learning_rate, weight_decay=opts.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    optimizer_cls = torch.optim.AdamW
    if opts.adam_8bit and device.type == "cuda":
        try:
            import bitsandbytes as bnb
            optimizer_cls = bnb.optim.AdamW8bit
        except ImportError:
            pass
    return optimizer_cls(params, lr=opts.learning_rate, weight_decay=opts.weight_decay)


def repeat_slots(repeats: list[int]) -> list[int]:
    """Item indices, each ``repeats[i]`` times, in rounds (every item once, then those with more repeats again),
    so that equal repeats give the order of the plain list repeated."""
    return [i for r in range(max(repeats, default=0)) for i, n in enumerate(repeats) if r < n]


# the options of the optimizer's step size that a resume may change when they are given again (a resume that leaves
# them out keeps the checkpoint's): the usual fix after a NaN stop, or for a run that learns too slowly
STEP_SIZES = ("learning_rate", "text_encoder_lr", "token_lr", "max_grad_norm")
# Resuming is refused when any other option differs: these only change how this session runs.
# options that only change how a run is watched or what its final files are written as
RESUME_MAY_CHANGE = {"resume", "stop_at", "progress", "log_with", "device", "cache_dir", "out", "format",
                     "bundle_words", "allow_pickle", "save_precision", "save_every", "keep_checkpoints",
                     "checkpoint_every", "validation_prompts", "validation_every", "validation_seeds",
                     "validation_steps", "validation_guidance",
                     # only makes missing regularization images; changed images are refused as changed data
                     "prior_guidance",
                     # recomputes activations in the backward pass (the same gradients, less memory): the usual fix
                     # for running out of memory on resume; and a threshold on the data, which is checked itself
                     "gradient_checkpointing", "min_images",
                     # the restored optimizer and schedule take new rates (rescale_learning_rates)
                     *STEP_SIZES, "given_options"}
# the run's length, which only a learning-rate schedule that does not depend on it lets a resume change (kohya's
# "resume to train longer")
RUN_LENGTH = {"max_steps", "epochs"}
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def _load_base(model: str, model_config: str = "", allow_pickle: bool = False):
    """The base pipeline through the project's loader; anything that is not SD 1.x-shaped is refused."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models.loading import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype="float32", model_config=model_config or None,
                         allow_pickle=allow_pickle)
    parts = {name: getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    missing = [k for k, v in parts.items() if v is None]
    if missing or not isinstance(parts["unet"], UNet2DConditionModel) or not isinstance(parts["vae"], AutoencoderKL):
        lacking = f"; it has no {', '.join(missing)}" if missing else ""
        raise EgakuError(f"--model {model!r} is a {type(pipe).__name__}, not a Stable Diffusion pipeline "
                         f"(UNet2DConditionModel + AutoencoderKL + text encoder{lacking}); "
                         "LoRA training needs an SD 1.x-style pipeline")
    return pipe


@contextlib.contextmanager
def adapters_off(*models: torch.nn.Module):
    """Run ``models`` as their frozen base: every peft LoRA layer in them bypassed, then switched back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def group_labels(model: str, groups: list[dict], flag: str) -> list[str]:
    """Names of ``lora_param_groups``' groups of ``model`` with the flag that sets their rate, for messages."""
    return [f"{model} ({flag})"] if len(groups) == 1 else [f"{model} LoRA down ({flag})",
                                                           f"{model} LoRA up ({flag} x --loraplus-lr-ratio)"]


def rescale_learning_rates(lr_scheduler, rates: list[float]) -> None:
    """Give a restored optimizer and LambdaLR schedule the base ``rates`` of this session's options, one per
    parameter group, at the schedule's restored step: a resume may change the learning rates."""
    for group, rate, lr_lambda in zip(lr_scheduler.optimizer.param_groups, rates, lr_scheduler.lr_lambdas):
        group["initial_lr"] = rate
        group["lr"] = rate * lr_lambda(lr_scheduler.last_epoch)
    lr_scheduler.base_lrs = list(rates)
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]


def lora_param_groups(model: torch.nn.Module, lr: float, loraplus_lr_ratio: float = 0.0,
                      leave_out: torch.Tensor | None = None) -> list[dict]:
    """The optimizer groups of a model's trained LoRA parameters: one at ``lr``, or with LoRA+ (Hayou et al. 2024,
    "LoRA+: Efficient Low Rank Adaptation of Large Models") the up matrices B in a second group at
    ``lr * loraplus_lr_ratio``: B starts at zero and, at one shared rate, learns features too slowly."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p is not leave_out]
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    down, up = [], []
    for n, p in named:
        (up if ".lora_B." in n or ".lora_embedding_B." in n else down).append(p)
    if not up:
        raise EgakuError("--loraplus-lr-ratio: the model has no LoRA up (lora_B) matrices to give a faster rate")
    return [{"params": down, "lr": lr}, {"params": up, "lr": lr * loraplus_lr_ratio}]


def _step_seed(seed: int, micro: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{micro}/{rank}".encode()).digest()[:7], "little")


class _Cache:
    """Latent distributions per (item, flip) and text embeddings per caption, optionally mirrored on disk."""

    def __init__(self, folder: str, model_key: str):
        self.folder = Path(folder) if folder else None
        self.model_key = model_key
        self.store: dict[str, torch.Tensor] = {}
        self.unwritable = False  # set when a write to the folder failed: said once, not tried again

    def get(self, key: str, compute) -> torch.Tensor:
        if key in self.store:
            return self.store[key]
        path = None
        if self.folder is not None:
            digest = hashlib.sha256(f"{self.model_key}|{key}".encode()).hexdigest()[:32]
            path = self.folder / f"{digest}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file
                try:
                    self.store[key] = load_file(path)["t"]
                    return self.store[key]
                except Exception as exc:  # noqa: BLE001 - a cache entry is only a copy: computed again, rewritten
                    reason = first_line(exc, 120)
                    print(f"egaku: warning: the cache file {path} cannot be read ({type(exc).__name__}: {reason}); "
                          "encoding it again", file=sys.stderr)
        value = compute().detach().float().cpu().contiguous()
        if path is not None and not self.unwritable:
            try:
                atomic_save_file({"t": value}, path)  # several processes may fill the same cache
            except Exception as exc:  # noqa: BLE001 - a full disk (safetensors' own error) or a read-only folder
                # the disk copy only saves later runs the encoding: this run goes on with the cache in memory
                self.unwritable = True
                reason = first_line(exc, 160)
                print(f"egaku: warning: --cache-dir {self.folder} cannot be written ({type(exc).__name__}: {reason}); "
                      "this run keeps its cache in memory only (free some space there or give another --cache-dir "
                      "for later runs to reuse it)", file=sys.stderr)
        self.store[key] = value
        return value



@torch.no_grad()
def fill_prior_folder(pipe, opts: TrainLoraOptions, device: torch.device, say=print) -> int:
    """Generate the regularization images ``--prior-data`` lacks with the base model (DreamBooth's class
    images), each with a caption file; returns how many were made. Images already there are kept."""
    from diffusers import StableDiffusionPipeline

    from ..models.loading import recommended_guidance

    folder = Path(opts.prior_data)
    folder.mkdir(parents=True, exist_ok=True)
    # counted as training reads them (class sub-folders such as kohya's reg/1_dog/, links followed, damaged files not
    # counted), and read before minutes of generating: a folder the reader refuses is refused now, not after
    have = len(scan_image_folder(folder, caption_template=opts.caption_template, min_images=0,
                                 kohya_names=True).items)
    missing = opts.prior_images - have
    if missing <= 0:
        return 0
    if not opts.prior_prompts:
        raise EgakuError(f"--prior-data {folder} holds {have} usable image(s) and --prior-images asks for "
                         f"{opts.prior_images}: give --prior-prompts to generate the rest, or add images")
    # numbered on from the usable count (a killed run's next image is where it stopped), past names already taken
    taken = {path.name for path in folder.iterdir()}
    numbers_left = list(itertools.islice((n for n in itertools.count(have) if f"prior-{n:05d}.png" not in taken),
                                         missing))
    runner = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items()
                                        if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    runner.to(device)
    runner.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    guidance = recommended_guidance(pipe) if opts.prior_guidance is None else opts.prior_guidance
    say(f"generating {counted(missing, 'regularization image')} into {folder}")
    for start in range(0, missing, 8):
        numbers = numbers_left[start:start + 8]
        prompts = [opts.prior_prompts[n % len(opts.prior_prompts)] for n in numbers]
        with torch.no_grad():
            embeds = encode_prompts(runner.tokenizer, runner.text_encoder, prompts, opts.clip_skip)
            empty = encode_prompts(runner.tokenizer, runner.text_encoder, [""] * len(prompts), opts.clip_skip)
        images = runner(prompt_embeds=embeds, negative_prompt_embeds=empty, num_inference_steps=20,
                        guidance_scale=guidance, height=size, width=size,
                        generator=[torch.Generator().manual_seed(opts.seed + n) for n in numbers]).images
        for n, prompt, image in zip(numbers, prompts, images):
            (folder / f"prior-{n:05d}.txt").write_text(prompt + "\n")
            tmp = folder / f".prior-{n:05d}.png.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / f"prior-{n:05d}.png")  # a cut-short run never leaves half an image
    return missing  # the components stay on the device: training moves them there anyway


def nan_advice(opts: TrainLoraOptions, checkpoints: Checkpoints):
    """What a NaN/inf stop says to do: ``advice(last checkpoint, step, whether the loss itself failed)``, offering only
    the fixes this run lacks: a lower rate or clipping, which a resume may change (STEP_SIZES), or leaving fp16, which
    needs a new run. A loss that fails one step after the last checkpoint was computed from that checkpoint's weights
    (on the batch a resume replays): they were saved while the loss was still finite, but have already diverged, so
    the advice goes back to the checkpoint before it."""
    clip = [] if opts.max_grad_norm else ["--max-grad-norm 1.0"]
    fp16 = opts.mixed_precision == "fp16"

    def advice(last: Path | None, step: int, loss_failed: bool) -> str:
        fixes = either([f"a lower --learning-rate (now {opts.learning_rate:g})", *clip])
        leave_fp16 = f"; or use --mixed-precision bf16 or no instead of fp16 and {train_again(checkpoints)}" \
            if fp16 else ""
        if last is None:
            new_run = ["a lower --learning-rate", *clip, *(["--mixed-precision bf16 or no instead of fp16"] * fp16)]
            return f"Try: {either(new_run)}, and {train_again(checkpoints)}"
        if not (loss_failed and checkpoint_step(last) == step - 1):
            return f"Try: --resume latest with {fixes}{leave_fp16}"
        # the rate that ruined them is the one they were trained at, which may not be this session's
        fixes = either(["a lower --learning-rate than the one that trained it", *clip])
        earlier = [p for p in step_folders(last.parent)
                   if checkpoint_step(p) < checkpoint_step(last) and (p / "state.pt").is_file()]
        back = (f"resume from the checkpoint before it (--resume {earlier[-1]}, with {last.name} moved aside) with "
                f"{fixes}{leave_fp16}" if earlier else
                f"{train_again(checkpoints)} with {fixes}" + (" or --mixed-precision bf16 or no" if fp16 else ""))
        return (f"The loss was computed from the weights of {last.name}: saved while the loss was still finite, they "
                f"have already diverged, and a resume from it fails again. Try: {back}")

    return advice


def resume_point(opts: TrainLoraOptions, checkpoints: Checkpoints):
    """``--resume``'s checkpoint, read and compared with this run's options before any slow work (a changed option is
    refused with the difference named). Returns the options (a resumed run keeps its own resolution), the
    checkpoint folder and its (weights, state); on a fresh start, the options and None twice."""
    if not opts.resume:
        checkpoints.check_fresh_start()
        return opts, None, None
    resume_from = checkpoints.resolve(opts.resume)
    defaults = to_dict(TrainLoraOptions())  # for options a checkpoint predates
    saved = {**defaults, **trainer_config(resume_from, "train-lora")}  # another trainer's checkpoint is named
    if opts.resolution is None:  # the run's own, which was the model's native size if it was not given
        opts = dataclasses.replace(opts, resolution=saved.get("resolution"))
    # a step size this command does not give is the run's own, not the default (options built in Python give all)
    given = set(opts.given_options) or {f.name for f in dataclasses.fields(opts)}
    opts = dataclasses.replace(opts, **{k: saved[k] for k in STEP_SIZES if k not in given and k in saved})
    config = to_dict(opts)
    may_change = set(RESUME_MAY_CHANGE)
    if opts.lr_scheduler in LENGTH_FREE_SCHEDULES:
        may_change |= RUN_LENGTH
    elif any(saved.get(k) != config[k] for k in RUN_LENGTH) and saved.get("lr_scheduler") == opts.lr_scheduler:
        raise EgakuError(f"cannot resume from {resume_from} with another run length (--max-steps/--epochs): the "
                         f"--lr-scheduler {opts.lr_scheduler} schedule depends on it; only "
                         f"{' and '.join(LENGTH_FREE_SCHEDULES)} runs can be resumed longer. Resume with the same "
                         "length, or start a new run")
    return opts, resume_from, load_checkpoint(resume_from, config, ignore=may_change, defaults=defaults)


def regularization_images(pipe, opts: TrainLoraOptions, accelerator, report):
    """``--prior-data``'s images, the missing ones generated first by the main process."""
    if accelerator.is_main_process:
        fill_prior_folder(pipe, opts, accelerator.device, accelerator.print)
    accelerator.wait_for_everyone()
    prior = scan_image_folder(opts.prior_data, caption_template=opts.caption_template, min_images=1,
                              kohya_names=True)
    report("regularization images: " + prior.report())
    return prior


def add_adapters(unet, text_encoder, opts: TrainLoraOptions) -> None:
    """peft LoRA layers on the UNet's attention (and convolutions), and on the text encoder's attention with
    ``--train-text-encoder``; their up matrices start at zero, so the model starts as the base."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(opts.seed)
    rank, alpha = opts.rank_and_alpha("")
    check_target_modules(unet, opts.target_modules)
    targets = list(opts.target_modules) + (UNET_CONV if opts.lora_conv else [])
    conv_rank, conv_alpha = opts.rank_and_alpha(UNET_CONV[0])
    # peft matches these names at the end of a module path; diffusers writes them into the file's metadata
    rank_pattern = {name: conv_rank for name in UNET_CONV} if opts.lora_conv and conv_rank != rank else {}
    alpha_pattern = {name: conv_alpha for name in UNET_CONV} if opts.lora_conv and conv_alpha != alpha else {}
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=opts.dropout, use_dora=opts.dora,
                                init_lora_weights="gaussian", target_modules=targets, rank_pattern=rank_pattern,
                                alpha_pattern=alpha_pattern))
    if opts.train_text_encoder:
        # transformers 5's add_adapter demands peft >= 0.22; peft's own injection makes the same layers
        inject_adapter_in_model(LoraConfig(r=opts.rank, lora_alpha=alpha, lora_dropout=opts.dropout,
                                           use_dora=opts.dora, init_lora_weights="gaussian",
                                           target_modules=TEXT_ENCODER_ATTENTION),
                                text_encoder)


def check_target_modules(unet, targets: list[str]) -> None:
    """Each --target-modules name ends the name of a linear or convolution layer of the UNet, as peft matches
    it; a name that matches nothing is an error (peft would drop it silently, or fail with a traceback when
    none matches), naming the layer names there are."""
    layers = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    unmatched = [t for t in targets if not any(name == t or name.endswith("." + t) for name in layers)]
    if unmatched:
        ends = sorted({".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
                       for name in layers})
        raise EgakuError(f"--target-modules {', '.join(unmatched)}: no linear or convolution layer of the UNet has "
                         f"a name ending so; the layers' names end in: {', '.join(ends)} (one flag per name, or names "
                         "separated by commas: --target-modules to_q,to_v)")


def report_long_captions(tokenizer, items: list, opts: TrainLoraOptions, report) -> None:
    """Name the captions that run past --max-token-length: the text encoder does not read their ends."""
    chunks = opts.max_token_length // 75
    longer = " or ".join(str(n) for n in (150, 225) if n > opts.max_token_length)
    more = f" (--max-token-length {longer} reads more, as kohya's does)" if longer else ""
    cut = [item for item in items if len(prompt_chunks(tokenizer, item.caption, opts.weighted_captions)) > chunks]
    if cut:
        first = cut[0]
        report(f"{len(cut)} caption(s) run past {opts.max_token_length} tokens and are cut there, e.g. {first.path}: "
               f"{len(tokenizer(first.caption, add_special_tokens=False).input_ids)} tokens{more}")
    # validation prompts are read as captions are: a cut one renders otherwise than `egaku generate` draws it
    for prompt in opts.validation_prompts:
        if len(prompt_chunks(tokenizer, prompt, opts.weighted_captions)) > chunks:
            report(f"the validation prompt {prompt[:60]!r}{'...' * (len(prompt) > 60)} runs past "
                   f"{opts.max_token_length} tokens ({len(tokenizer(prompt, add_special_tokens=False).input_ids)}): "
                   f"its validation images are drawn from its first {opts.max_token_length}{more}")


def check_words_in_captions(tokenizer, words: list[str], ids: list[int], captions: list[str]) -> None:
    """Each --train-tokens word must be in some training caption: a word in none gets no gradient, and its
    embedding file would hold the vector it started from."""
    held = set()
    for caption in captions:
        held.update(tokenizer(caption, add_special_tokens=False).input_ids)
    absent = [word for word, token in zip(words, ids) if token not in held]
    if absent:
        them = "it" if len(absent) == 1 else "them"
        raise EgakuError(f"--train-tokens {' '.join(absent)}: no training caption holds {them}, so nothing would "
                         f"train {them}; write {them} into the captions (or give --trigger {absent[0]}), or train a "
                         "word the captions hold")


def report_upscaled(items: list, bucket_of: list[tuple[int, int]], report) -> None:
    """Name the images scaled up more than twice to fill their bucket: they train blurred (a 1x1 or thumbnail-sized
    file in a folder of photos trains as a flat smear), which the loss does not show."""
    scales = [(max(bw / item.size[0], bh / item.size[1]), item, (bw, bh)) for item, (bw, bh) in zip(items, bucket_of)]
    blurred = sorted((entry for entry in scales if entry[0] > 2), key=lambda entry: -entry[0])
    if blurred:
        scale, item, (bw, bh) = blurred[0]
        report(f"{len(blurred)} image(s) are scaled up more than 2x to their bucket and train blurred, most "
               f"{item.path} ({item.size[0]}x{item.size[1]} -> {bw}x{bh}, {scale:.0f}x); give larger images, "
               "or a lower --resolution")


def init_word_ids(tokenizer, word: str) -> list[int]:
    """The token ids of a ``--token-init`` word (one or several); an empty word is an error."""
    pieces = tokenizer(word, add_special_tokens=False).input_ids if word.strip() else []
    if not pieces:
        raise EgakuError(f"--token-init: {word!r} holds no token; give a word related to the trained one")
    return pieces


class TrainedTokens:
    """The ``--train-tokens`` rows of the text encoder's embedding table (pivotal tuning). The whole table takes
    gradients; after each step every other row is put back (diffusers' textual-inversion recipe), so that weight
    decay or momentum cannot move the other words."""

    def __init__(self, table: torch.nn.Parameter, words: list[str], ids: list[int], init_ids: list[list[int]]):
        self.table, self.words, self.ids = table, list(words), ids
        table.requires_grad_(True)
        # A word the base model has never trained sits at a random point of the embedding space; started from
        # a related word it begins on the manifold the UNet knows (resume then loads the trained rows). A related
        # word the tokenizer splits gives the mean of its pieces, which one vector can hold of it.
        with torch.no_grad():
            for token, pieces in zip(ids, init_ids):
                table[token] = table[pieces].mean(0)
        self.frozen_rows = self.original = None

    def hold_the_others(self) -> None:
        """Remember every other row as it is now (after the fp32 cast: a copy of SD 1.x's table is 150 MB)."""
        self.frozen_rows = torch.ones(len(self.table), dtype=torch.bool, device=self.table.device)
        self.frozen_rows[self.ids] = False
        self.original = self.table.detach().clone()

    @torch.no_grad()
    def put_back_the_others(self) -> None:
        self.table[self.frozen_rows] = self.original[self.frozen_rows]

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {word: self.table[token].detach().float().clone() for word, token in zip(self.words, self.ids)}

    @torch.no_grad()
    def load(self, embeddings: dict[str, torch.Tensor]) -> None:
        for word, token in zip(self.words, self.ids):
            self.table[token] = embeddings[word].to(self.table)


def encoders_key(vae, text_encoder) -> str:
    """What the disk cache's entries are keyed by besides their input: the VAE's and text encoder's configs and a
    checksum of their weights, so that another or retrained model never reuses stale latents. The same in every
    process: a config's private entries are left out (diffusers' ``_use_default_values`` lists a set, in an order
    that changes with each process's string hashing; ``_name_or_path`` is where the model was loaded from)."""
    def public(config) -> dict:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    with torch.no_grad():
        fingerprint = [float(sum(p.double().sum() for p in m.parameters())) for m in (vae, text_encoder)]
    return json.dumps([public(vae.config), public(text_encoder.config.to_dict()), fingerprint], default=str,
                      sort_keys=True)


class TrainingInputs:
    """What each step feeds the UNet: the latent distribution of every item (per orientation) and the text states
    of every caption, encoded once and cached when the augmentations allow it, else encoded each step; and the
    per-pixel loss weights of images with loss masks."""

    def __init__(self, opts: TrainLoraOptions, scan, items: list, buckets: list[tuple[int, int]], vae, text_encoder,
                 tokenizer, device: torch.device, cache_text: bool):
        self.opts, self.scan, self.items, self.buckets = opts, scan, items, buckets
        self.vae, self.text_encoder, self.tokenizer, self.device = vae, text_encoder, tokenizer, device
        self.cache_text = cache_text
        self.flips = (False, True) if opts.random_flip else (False,)
        # the disk cache is keyed by the encoders' weights too, so a retrained model never reuses stale latents
        self.cache = _Cache(opts.cache_dir, encoders_key(vae, text_encoder) if opts.cache_dir else "")
        # a latent's key names the file's bytes, its bucket and its orientation. On disk the bytes are named by their
        # digest: an image edited in place keeps its size and, copied with its time (cp -p, rsync -t), its mtime
        self.latent_key = {}
        for i, item in enumerate(items):
            if opts.cache_dir:
                source = file_sha256(item.path)
            else:  # one run's memory: the files do not change under it
                source = str(item.path.resolve())
            for flip in self.flips:
                self.latent_key[i, flip] = f"latent|{source}|{buckets[i]}|{flip}"
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}  # on the latent grid; images without one train everywhere

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        return to_tensor(fit_to_bucket(self.scan.load(self.items[index]), self.buckets[index]), flip=flip)

    def encode_latent_dist(self, batch: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(batch.to(self.device, torch.float32)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.opts.weighted_captions or self.opts.max_token_length > 75:
            return encode_captions(self.tokenizer, self.text_encoder, texts, self.opts.max_token_length // 75,
                                   self.opts.weighted_captions, self.opts.clip_skip, self.device)
        return encode_prompts(self.tokenizer, self.text_encoder, texts, self.opts.clip_skip, self.device)

    def text_key(self, text: str) -> str:  # another layer's or reading's embeddings are other entries of a disk cache
        layer = "" if self.opts.clip_skip == 1 else f"@{self.opts.clip_skip}"
        reading = ("~weighted" if self.opts.weighted_captions else "") + (
            f"~{self.opts.max_token_length}" if self.opts.max_token_length > 75 else "")
        return f"text{layer}{reading}|{text}"

    @torch.no_grad()
    def fill(self, texts: set[str], autocast, progress: bool) -> None:
        """Encode what is cached: every latent (``--cache-latents``) and, with a frozen text encoder and fixed
        captions, every text; then let go of the encoders that will not run again."""
        if self.opts.cache_latents:
            bar = progress_bar(len(self.items), desc="caching latents", unit="image", disable=not progress)
            for i in range(len(self.items)):
                for flip in self.flips:
                    self.cache.get(self.latent_key[i, flip],
                                   lambda: self.encode_latent_dist(self.pixels(i, flip)[None])[0])
                bar.update(1)
            bar.close()
        if self.cache_text:
            for text in sorted(texts):
                with autocast():
                    self.cache.get(self.text_key(text), lambda: self.encode_text([text])[0])
            self.text_encoder = None  # frozen and cached: never run again
        if self.opts.cache_latents:  # validation only decodes: the encoder's memory (136 MB on SD 1.x) goes back
            self.vae.encoder = self.vae.quant_conv = None
        gc.collect()

    def latents(self, indices: list[int], flips: list[bool]) -> torch.Tensor:
        """Scaled latents drawn from each item's distribution (a fresh draw every step, cached or not)."""
        if self.opts.cache_latents:
            dist = torch.stack([self.cache.store[self.latent_key[i, f]]
                                for i, f in zip(indices, flips)]).to(self.device)
        else:
            with torch.no_grad():
                dist = self.encode_latent_dist(torch.stack([self.pixels(i, f) for i, f in zip(indices, flips)]))
        mean, std = dist.chunk(2, dim=1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean + std * torch.randn_like(mean) - shift) * self.vae.config.scaling_factor

    def states(self, texts: list[str]) -> torch.Tensor:
        """The text encoder's states for ``texts``: cached, or from the encoder as it is now (its LoRA and trained
        words so far)."""
        if self.cache_text:
            return torch.stack([self.cache.store[self.text_key(t)] for t in texts]).to(self.device)
        return self.encode_text(texts)

    def loss_weights(self, indices: list[int], flips: list[bool], shape: torch.Size) -> torch.Tensor:
        """(B, 1, h, w): each latent pixel's loss weight; regularization images have no mask."""
        everywhere = torch.ones(1, *shape[-2:])
        return torch.stack([self.masks.get((i, f), everywhere) for i, f in zip(indices, flips)]
                           ).clamp(min=self.opts.unmasked_weight).to(self.device)


def noised_batch(latents: torch.Tensor, opts: TrainLoraOptions, noise_scheduler, device: torch.device):
    """The step's noisy latents, timesteps and target (the noise, or v as the scheduler predicts). The draws keep a
    fixed order, and options that are off draw nothing, so runs made before an option existed stay reproducible."""
    noise = torch.randn_like(latents)
    if opts.noise_offset:
        noise += opts.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if opts.timestep_sampling == "uniform":
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=device)
    else:
        timesteps = draw_timesteps(latents.shape[0], num_timesteps, opts.timestep_sampling, opts.logit_mean,
                                   opts.logit_std, opts.uniform_share).to(device)
    if opts.input_perturbation:  # the input's noise is perturbed, the target's is not (Ning et al. 2023)
        noisy = noise_scheduler.add_noise(latents, noise + opts.input_perturbation * torch.randn_like(noise),
                                          timesteps)
    else:
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        return noisy, timesteps, noise
    return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)


def batch_captions(texts: list[str], opts: TrainLoraOptions) -> list[str]:
    """The batch's captions after caption dropout, shuffling and tag dropout (drawn after the noise: runs without
    these options keep their random sequence)."""
    if opts.caption_dropout:
        dropped = (torch.rand(len(texts)) < opts.caption_dropout).tolist()
        texts = ["" if d else t for d, t in zip(dropped, texts)]
    if opts.varies_captions:
        texts = [vary_caption(t, opts.shuffle_caption, opts.keep_tokens, opts.caption_tag_dropout) for t in texts]
    return texts


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, sample_weights: torch.Tensor,
                  pixel_weights: torch.Tensor | None, opts: TrainLoraOptions, noise_scheduler) -> torch.Tensor:
    """The batch's loss: ``--loss-type`` per element, averaged per sample over its loss mask (if any), times each
    sample's weight (regularization images, min-SNR-gamma, debiased estimation)."""
    thresholds = (None if opts.loss_type in ("l2", "l1") else
                  huber_thresholds(noise_scheduler, timesteps, opts.huber_c, opts.huber_schedule))
    error = elementwise_loss(pred, target, opts.loss_type, thresholds)
    per_sample = masked_mean(error, pixel_weights) if pixel_weights is not None else error.mean(dim=(1, 2, 3))
    if opts.min_snr_gamma:
        sample_weights = sample_weights * min_snr_weights(noise_scheduler, timesteps, opts.min_snr_gamma,
                                                          noise_scheduler.config.prediction_type)
    if opts.debiased_estimation:
        sample_weights = sample_weights * debiased_weights(noise_scheduler, timesteps,
                                                           noise_scheduler.config.prediction_type)
    return (per_sample * sample_weights).mean()


@torch.no_grad()
def base_prediction(unet, text_encoder, inputs: TrainingInputs, noisy: torch.Tensor, timesteps: torch.Tensor,
                    states: torch.Tensor, texts: list[str], dtype: torch.dtype) -> torch.Tensor:
    """The frozen base model's output for these inputs: every adapter off. Trained token rows leave captions without
    those words unchanged, so only a text-encoder LoRA (``text_encoder`` given) makes the text encoder run again."""
    with adapters_off(*[m for m in (unet, text_encoder) if m is not None]):
        if text_encoder is not None:
            states = inputs.encode_text(texts)
        return unet(noisy.to(dtype), timesteps, states.detach().to(dtype)).sample


@torch.no_grad()
def validation_grid(run, inputs: TrainingInputs, opts: TrainLoraOptions, guidance: float, resolution: int,
                    autocast, dtype: torch.dtype):
    """``--validation-prompts`` x ``--validation-seeds`` drawn by ``run`` (the pipeline with the adapters as they are
    now), one row per prompt; each prompt is encoded once."""
    images = []
    for prompt in opts.validation_prompts:
        with autocast():
            embeds = [inputs.states([text]).to(inputs.device, dtype) for text in (prompt, "")]
        for seed in opts.validation_seeds:
            with autocast():
                images.append(run(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                                  num_inference_steps=opts.validation_steps, guidance_scale=guidance,
                                  height=resolution, width=resolution,
                                  generator=torch.Generator().manual_seed(seed)).images[0])
    return image_grid(images, cols=len(opts.validation_seeds))


def train_lora(opts: TrainLoraOptions) -> Path:
    """Fine-tune ``opts.model`` with LoRA on ``opts.data``; returns the output folder."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..models.loading import recommended_guidance

    if not opts.data:
        raise EgakuError("--data is required: the folder of training images")
    opts = checked_run_paths(opts, {"--data": "data", "--prior-data": "prior_data", "--mask-dir": "mask_dir"})
    if opts.prior_data:  # each folder is read whole, subfolders included
        check_outside(opts.prior_data, {"--data": opts.data}, "--prior-data",
                      why="its images would also train as the concept, with --data's captions and trigger")
        check_outside(opts.data, {"--prior-data": opts.prior_data}, "--data",
                      why="the training images would also be read as regularization images")
    if opts.device != "auto":
        from ..models.loading import resolve_device

        resolve_device(opts.device)  # --device cuda without a GPU is an error, not a silent CPU run
    out = Path(opts.out)
    accelerator = make_accelerator(opts.device, opts.mixed_precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = accelerator.print
    if opts.validation_every and not opts.validation_prompts:
        say(f"note: --validation-every {opts.validation_every} draws nothing without --validation-prompts")
    checkpoints = Checkpoints(out, keep=opts.keep_checkpoints)
    opts, resume_from, resumed = resume_point(opts, checkpoints)  # a changed configuration is refused now
    # a wrong --model or --model-config, and --mask-dir, before the images are read
    check_model_files(opts.model, opts.model_config, opts.allow_pickle)
    if opts.mask_dir:
        check_mask_dir(opts.mask_dir)
    if opts.init_lora:  # a wrong path is refused before the model loads
        from ..lora.apply import resolve_lora

        resolve_lora(opts.init_lora, None, names_option="")
    check_layers_early(opts)  # --target-modules and --init-lora against the model's configs and the file's header

    def report(line: str) -> None:  # shown, and kept in the data report
        if main:
            with open(out / "data_report.txt", "a") as fh:
                fh.write(line + "\n")
        say(line)

    # 1. data and base model; everything in the base is frozen
    scan = scan_image_folder(opts.data, caption_template=opts.caption_template, trigger=opts.trigger or None,
                             min_images=opts.min_images, kohya_names=True, repeats=opts.repeats)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_report.txt").write_text("")
    report(scan.report(repeats=opts.repeats))
    mask_files = find_mask_files(scan, opts.mask_dir) if opts.mask_dir else None  # missing masks: an error now
    pipe = _load_base(opts.model, opts.model_config, opts.allow_pickle)
    check_clip_skip(opts.clip_skip, pipe.text_encoder)
    if opts.resolution is None:  # the size the model was trained at (training 64-px models at 512 is 64x the work)
        opts = dataclasses.replace(opts, resolution=int(pipe.unet.config.sample_size * pipe.vae_scale_factor))
        say(f"training at {opts.resolution} px, the model's native size (--resolution to change it)")
    config = to_dict(opts)
    # validation images as `egaku generate --lora` will draw them: at the model's own guidance unless given
    validation_guidance = recommended_guidance(pipe) if opts.validation_guidance is None else opts.validation_guidance
    prior = regularization_images(pipe, opts, accelerator, report) if opts.prior_data else None
    prior_items = prior.items if prior else []
    items = scan.items + prior_items
    manifest = data_manifest(scan, prior)  # what a resume must find again
    if mask_files:  # a changed mask changes what the rest of the run trains on, as a changed image does
        manifest += [["mask", path.relative_to(opts.mask_dir).as_posix(), path.stat().st_size, ""]
                     for path in mask_files]
    if resume_from is not None and "data" in resumed[1]:  # (checkpoints of earlier versions lack it)
        check_same_data(resumed[1]["data"], manifest, resume_from,
                        {"data": opts.data, "prior": opts.prior_data, "mask": opts.mask_dir})
    # per-image loss weight: regularization images count --prior-loss-weight times a training image
    item_weight = torch.tensor([1.0] * len(scan.items) + [opts.prior_loss_weight] * len(prior_items))
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    report_long_captions(tokenizer, items, opts, report)
    token_ids = single_token_ids(tokenizer, opts.train_tokens)
    check_words_in_captions(tokenizer, opts.train_tokens, token_ids, [item.caption for item in scan.items])
    text_trains = opts.train_text_encoder or bool(token_ids)
    text_runs = text_trains or opts.varies_captions  # the text encoder runs every step (else its outputs are cached)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise EgakuError(f"the base model's scheduler predicts {noise_scheduler.config.prediction_type!r}; LoRA "
                         "training supports epsilon and v_prediction models")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)  # encoded once; fp32 avoids the SD VAE's fp16 overflow
    # A text encoder with trained parts stays fp32 on the CPU: there autocast runs layer norms in fp32 and
    # refuses half-precision norm weights ("mixed dtype (CPU)"); on GPUs its frozen base is half precision.
    text_encoder.to(device, dtype=torch.float32 if text_runs and device.type == "cpu" else weight_dtype)

    # 2. LoRA adapters (and trained words); their parameters are the only ones that train, in fp32
    add_adapters(unet, text_encoder, opts)
    token_table = text_encoder.get_input_embeddings().weight
    tokens = None
    if token_ids:
        init_ids = [init_word_ids(tokenizer, word) for word in opts.token_init]
        for word, trained_word, pieces in zip(opts.token_init, opts.train_tokens, init_ids):
            if len(pieces) > 1:
                say(f"--token-init {word!r} is {len(pieces)} tokens for this tokenizer "
                    f"({' '.join(tokenizer.convert_ids_to_tokens(pieces))}): {trained_word!r} starts from their mean")
        tokens = TrainedTokens(token_table, opts.train_tokens, token_ids, init_ids)
    trained = [unet] + ([text_encoder] if text_trains else [])
    cast_training_params(trained, dtype=torch.float32)
    if opts.init_lora:  # loaded into the fp32 copies, so that no half-precision rounding touches them
        say(start_from_lora(pipe, opts, token_ids))
    if tokens:
        tokens.hold_the_others()
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if opts.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # 3. buckets and caches
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    step_px = max(8, vae_scale * 2 ** (len(unet.config.block_out_channels) - 1))
    resolution = max(step_px, opts.resolution // step_px * step_px)
    if resolution != opts.resolution:
        say(f"--resolution {opts.resolution} trains at {resolution} (this model needs multiples of {step_px})")
    buckets = make_buckets(resolution, step=step_px, max_ratio=opts.max_aspect)
    bucket_of = [nearest_bucket(item.size, buckets) for item in items]
    report_upscaled(items, bucket_of, report)
    captions = [item.caption for item in items]
    inputs = TrainingInputs(opts, scan, items, bucket_of, vae, text_encoder, tokenizer, device,
                            cache_text=not text_runs)
    # validation needs the empty caption for guidance, caption dropout trains on it
    needs_empty = bool(opts.validation_prompts) or opts.caption_dropout > 0
    inputs.fill(set(captions) | set(opts.validation_prompts) | ({""} if needs_empty else set()),
                accelerator.autocast, progress=main and opts.progress)
    if inputs.cache_text:  # frozen and cached: memory given back
        text_encoder = pipe.text_encoder = None
    if opts.mask_dir or opts.alpha_mask:
        inputs.masks = latent_masks(scan, mask_files, bucket_of, inputs.flips, vae_scale, opts.unmasked_weight)
        masked = len({i for i, _ in inputs.masks})
        report(f"loss masks: {masked} from {opts.mask_dir}" if opts.mask_dir else
               f"loss masks: the transparency of {masked} image(s)"
               + (f"; {len(scan.items) - masked} have none and train everywhere" if masked < len(scan.items) else ""))

    # 4. optimizer, schedule, data order
    params = lora_param_groups(unet, opts.learning_rate, opts.loraplus_lr_ratio)
    group_names = group_labels("UNet", params, "--learning-rate")  # for a resume that changes their rates
    if opts.train_text_encoder:
        text_groups = lora_param_groups(text_encoder, opts.text_encoder_lr or opts.learning_rate,
                                        opts.loraplus_lr_ratio, leave_out=token_table)
        params += text_groups
        group_names += group_labels("text encoder", text_groups,
                                    "--text-encoder-lr" if opts.text_encoder_lr else "--learning-rate")
    if tokens:
        params.append({"params": [token_table], "lr": opts.token_lr or opts.learning_rate, "weight_decay": 0.0})
        group_names.append(f"token embeddings ({'--token-lr' if opts.token_lr else '--learning-rate'})")
    optimizer = make_optimizer(opts, params, device)
    # an epoch holds every training image `repeats` times (times its kohya folder's count) and every
    # regularization image once (or its folder's count); batches hold positions in `slots`, which name items
    slots = repeat_slots([item.repeats * opts.repeats for item in scan.items]) + [
        len(scan.items) + i for i in repeat_slots([item.repeats for item in prior_items])]
    order = BucketBatches([bucket_of[i] for i in slots], opts.batch_size, seed=opts.seed)
    per_epoch = len(order.batches(0)) // world
    if per_epoch == 0:
        raise EgakuError(f"{len(items)} images in {len(set(bucket_of))} aspect buckets give fewer batches of "
                         f"{opts.batch_size} than there are processes ({world}); lower --batch-size or add images")
    total_steps = opts.max_steps or math.ceil(opts.epochs * per_epoch / opts.gradient_accumulation)
    if opts.max_steps and "epochs" in opts.given_options:  # (a preset's max_steps beside a flag's --epochs, say)
        say(f"note: --max-steps {opts.max_steps} sets the run's length; --epochs {opts.epochs} is not used")
    if opts.stop_at > total_steps:
        say(f"note: --stop-at {opts.stop_at} is past the run's {counted(total_steps, 'step')}: it runs to the end")
    lr_scheduler = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps,
                                 num_training_steps=total_steps)
    run_metadata = {  # kohya's ss_* entries that only the run knows, for A1111's and civitai's training views
        "ss_num_epochs": math.ceil(total_steps * opts.gradient_accumulation / per_epoch),
        "ss_total_batch_size": opts.batch_size * opts.gradient_accumulation * world,
        "ss_num_batches_per_epoch": per_epoch,
        "ss_num_reg_images": sum(item.repeats for item in prior_items),  # kohya counts the repeats, as of train images
        "ss_dataset_dirs": dataset_dirs([(opts.data, scan.items)], opts.repeats),
        **({"ss_reg_dataset_dirs": dataset_dirs([(opts.prior_data, prior_items)])} if prior_items else {}),
        "ss_training_started_at": time.time(), "ss_session_id": int.from_bytes(os.urandom(4), "little"),
        # as kohya writes it: the class that trained (AdamW8bit when bitsandbytes served --adam-8bit) and its args
        "ss_optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}(weight_decay={opts.weight_decay:g})",
        "ss_bucket_info": bucket_info(buckets, bucket_of, slots, items),  # the sizes A1111 lists for the LoRA
    }
    optimizer_name = type(optimizer).__name__  # accelerate.prepare wraps it in its AcceleratedOptimizer
    if text_trains:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        prepared = [unet, text_encoder]
        inputs.text_encoder = text_encoder  # the wrapped one: its gradients are all-reduced across processes
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        prepared = [unet]
    lora_params = [p for group in optimizer.param_groups for p in group["params"]]

    def unwrapped(model):
        return None if model is None else accelerator.unwrap_model(model)

    # 5. resume
    step, micro = 0, 0
    if resume_from is not None:
        weights, state = resumed
        set_peft_model_state_dict(unwrapped(unet), weights["unet_lora"])
        if opts.train_text_encoder:
            set_peft_model_state_dict(unwrapped(text_encoder), weights["text_encoder_lora"])
        if tokens:
            tokens.load(weights["token_embeddings"])
        rates = list(lr_scheduler.base_lrs)  # this session's, which loading the saved state replaces
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        changed = [f"{name} {old:g} -> {new:g}" for name, old, new in zip(group_names, lr_scheduler.base_lrs, rates)
                   if old != new]
        clipped = trainer_config(resume_from, "train-lora").get("max_grad_norm", opts.max_grad_norm)
        if clipped != opts.max_grad_norm:
            changed.append(f"--max-grad-norm {clipped:g} -> {opts.max_grad_norm:g}")
        if changed:
            say(f"changed on resume: {'; '.join(changed)}")
        rescale_learning_rates(lr_scheduler, rates)
        check_same_world(state, world, resume_from, "the data position depends on it")
        restore_rng(state["rng"])
        step, micro = int(state["step"]), int(state["micro"])
        say(f"resumed from {resume_from} at step {step}")
    first_step = step

    def save_checkpoint() -> None:
        if main:
            weights = {"unet_lora": get_peft_model_state_dict(unwrapped(unet))}
            if opts.train_text_encoder:
                weights["text_encoder_lora"] = get_peft_model_state_dict(unwrapped(text_encoder))
            if tokens:
                weights["token_embeddings"] = tokens.embeddings()
            checkpoints.save(step, weights, {"optimizer": optimizer.state_dict(),
                                             "lr_scheduler": lr_scheduler.state_dict(), "rng": capture_rng(),
                                             "step": step, "micro": micro, "world": world, "data": manifest}, config)
        accelerator.wait_for_everyone()

    def write_lora(folder: Path) -> None:
        from safetensors import SafetensorError

        try:
            save_lora(folder, unwrapped(unet), unwrapped(text_encoder) if opts.train_text_encoder else None,
                      opts, token_embeddings=tokens.embeddings() if tokens else None,
                      num_images=sum(item.repeats for item in scan.items) * opts.repeats,  # kohya counts repeats
                      tags=folder_tags([(opts.data, scan.items), (opts.prior_data, prior_items)]),
                      total_steps=total_steps, step=step, run=run_metadata,
                      prediction_type=noise_scheduler.config.prediction_type)
        except (OSError, SafetensorError) as exc:  # a full disk (safetensors' own error), a folder made read-only
            last = checkpoints.latest()
            # the run's last checkpoint is written before its LoRA: resuming from it only writes the files again
            redo = ("nothing is trained again" if last is not None and checkpoint_step(last) == total_steps else
                    "it continues from there")
            reason = first_line(exc, 200)
            raise EgakuError(f"writing the LoRA into {folder} failed at step {step} ({type(exc).__name__}: {reason}); "
                             f"the last checkpoint is {last}: free some space (or fix the folder) and run again with "
                             f"--resume latest ({redo})") from None

    def validate() -> None:
        if not (main and opts.validation_prompts):
            return
        for model in trained:
            unwrapped(model).eval()
        run = StableDiffusionPipeline(vae=vae, text_encoder=unwrapped(text_encoder), tokenizer=tokenizer,
                                      unet=unwrapped(unet), scheduler=pipe.scheduler, safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False)
        run.set_progress_bar_config(disable=True)
        grid = validation_grid(run, inputs, opts, validation_guidance, resolution, accelerator.autocast, weight_dtype)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(out / "samples" / f"step-{step:06d}.png")
        log.image(step, "validation", grid)
        for model in trained:
            unwrapped(model).train()

    if main:
        save_config(opts, out / "training_config.json")
    log = MetricsLog(out / "loss.csv", start_step=step, tensorboard=opts.log_with == "tensorboard",
                     resumed_from=resume_from) if main else None
    images_in = collections.Counter(bucket_of)  # the buckets in use, as kohya lists them
    bucket_use = f"{len(images_in)} bucket(s): " + ", ".join(f"{w}x{h} ({counted(n, 'image')})"
                                                          for (w, h), n in sorted(images_in.items()))
    # the token table takes gradients whole, but only the --train-tokens rows change
    trained_count = sum(p.numel() for p in lora_params if p is not token_table) + len(token_ids) * token_table.shape[1]
    tokens_note = f" and {len(token_ids)} token embedding(s)" if token_ids else ""
    say(f"training {trained_count:,} parameters (LoRA{tokens_note}) for {counted(total_steps, 'step')} "
        f"on {world} process(es), {bucket_use}, batch {opts.batch_size} x {opts.gradient_accumulation} accumulation, "
        f"optimizer {optimizer_name}")
    fullest = max(len(batch) for batch in order.batches(0))
    if fullest < opts.batch_size:  # a batch never mixes buckets, so a small folder caps it
        say(f"egaku: warning: batches hold at most {fullest} images, not --batch-size {opts.batch_size}: a batch "
            f"takes images from one aspect bucket, and the fullest holds {fullest} per epoch; lower --batch-size "
            f"to {fullest} (and raise --gradient-accumulation for the same total) or add images")
    bar = progress_bar(total_steps, step, desc="train-lora", disable=not (main and opts.progress))
    for model in trained:
        unwrapped(model).train()
    mean_loss = float("nan")
    nan_hint = nan_advice(opts, checkpoints)  # what a NaN stop suggests: built once, its text only when needed

    # 6. the loop: one optimizer step = gradient_accumulation micro-batches per process
    interrupted = False
    with StopOnSignal(quiet=not main) as stop, another_process_lost(world, checkpoints):
        while step < total_steps and not (opts.stop_at and step >= opts.stop_at):
            step_loss = 0.0
            for k in range(opts.gradient_accumulation):
                epoch, index = divmod(micro, per_epoch)
                indices = [slots[j] for j in order.batches(epoch)[index * world + rank]]
                torch.manual_seed(_step_seed(opts.seed, micro, rank))
                flips = ([bool(f) for f in torch.rand(len(indices)) < 0.5] if opts.random_flip
                         else [False] * len(indices))
                latents = inputs.latents(indices, flips)
                noisy, timesteps, target = noised_batch(latents, opts, noise_scheduler, device)
                texts = batch_captions([captions[i] for i in indices], opts)
                with contextlib.ExitStack() as no_sync:
                    if k < opts.gradient_accumulation - 1 and world > 1:  # all-reduce once, on the last micro-batch
                        for model in prepared:
                            no_sync.enter_context(accelerator.no_sync(model))
                    # a trained text encoder's forward belongs inside no_sync too: its gradients are all-reduced once
                    with accelerator.autocast(), half_precision_attention(device, weight_dtype):
                        states = inputs.states(texts)
                        prior_rows = ([row for row, i in enumerate(indices) if i >= len(scan.items)]
                                      if opts.prior_target == "base" else [])
                        if prior_rows:  # regularization images trained towards the frozen base's prediction
                            target = target.clone()
                            target[prior_rows] = base_prediction(
                                unwrapped(unet), unwrapped(text_encoder) if opts.train_text_encoder else None, inputs,
                                noisy[prior_rows], timesteps[prior_rows], states[prior_rows],
                                [texts[row] for row in prior_rows], weight_dtype).float()
                        pred = unet(noisy.to(weight_dtype), timesteps, states.to(weight_dtype)).sample
                    loss = weighted_loss(pred, target, timesteps, item_weight[indices].to(device),
                                         inputs.loss_weights(indices, flips, latents.shape) if inputs.masks else None,
                                         opts, noise_scheduler)
                    # gradient checkpointing recomputes the forward in backward: with the same attention kernel, or
                    # its half-precision outputs differ from the forward's and torch refuses them
                    with half_precision_attention(device, weight_dtype):
                        accelerator.backward(loss / opts.gradient_accumulation)
                step_loss += float(loss.detach()) / opts.gradient_accumulation
                micro += 1
            if step < opts.inversion_steps:  # the words alone: AdamW leaves a weight without a gradient as it is
                for p in lora_params:
                    if p is not token_table:
                        p.grad = None
            if opts.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in lora_params if p.grad is not None], opts.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if tokens:
                tokens.put_back_the_others()
            step += 1

            (mean_loss,), interrupted = agree_on_step(accelerator, stop.requested, step_loss)
            finite_weights = all(bool(torch.isfinite(p).all()) for p in lora_params)
            check_finite(mean_loss if finite_weights else torch.tensor(float("nan")), step, checkpoints,
                         advice=lambda last: nan_hint(last, step, not math.isfinite(float(mean_loss))))
            if main:
                log.log(step, loss=float(mean_loss), lr=lr_scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
            if opts.checkpoint_every and step % opts.checkpoint_every == 0 or step == opts.stop_at or interrupted:
                save_checkpoint()
            if interrupted and step == total_steps:  # trained to the end: what is left, writing the LoRA, is quick
                say("interrupted at the last step: writing the LoRA without the final validation images")
                break
            if interrupted:
                bar.close()
                stop_after_signal(step, checkpoints.latest(), quiet=not main)
            if opts.save_every and step % opts.save_every == 0 and step < total_steps and main:
                write_lora(out / STEPS_DIR / f"{out.resolve().name}-step{step:06d}")
            if opts.validation_every and step % opts.validation_every == 0:
                validate()
    bar.close()

    if step < total_steps:
        if main:
            log.close()
        say(f"stopped at step {step} of {total_steps} (--stop-at); continue with --resume latest")
        return out
    check_replicas_agree(accelerator, lora_params, "LoRA weights")
    if not (opts.checkpoint_every and step % opts.checkpoint_every == 0 or interrupted):
        save_checkpoint()
    if not (opts.validation_every and step % opts.validation_every == 0 or interrupted):
        validate()
    if main:
        log.close()
        write_lora(out)
        if step == first_step:  # resumed from the last checkpoint: no loss of this session to show
            say(f"wrote {out} (the checkpoint was at step {step} of {total_steps}: nothing was left to train)")
        else:
            say(f"wrote {out} (step {step}, final loss {float(mean_loss):.4f})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


STEPS_DIR = "steps"  # --save-every's LoRAs, one folder each
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_lora(out: Path, unet, text_encoder, opts: TrainLoraOptions, num_images: int = 0,
              tags: dict[str, dict[str, int]] | None = None, total_steps: int = 0,
              token_embeddings: dict[str, torch.Tensor] | None = None, step: int = 0,
              run: dict[str, Any] | None = None, prediction_type: str | None = None) -> list[Path]:
    """Write the adapter (not the pipeline) in the requested layouts, each file atomically. ``tags``: each image
    folder's tag frequency, by folder name (kohya's ``ss_tag_frequency``); ``run``: more ``ss_*`` entries that the
    training run knows (epochs, batch sizes, data folders, buckets, start time); ``prediction_type``: what the base
    model's scheduler predicts (epsilon, v_prediction), which the kohya file's SAI model spec entries name.
    ``token_embeddings`` (the --train-tokens words) go into ``embeddings/WORD.safetensors`` and, with
    --bundle-words, in A1111's bundle layout (``bundle_emb.WORD.string_to_param.*``) into the kohya file, which then
    carries them into A1111."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out.mkdir(parents=True, exist_ok=True)
    dtype = SAVE_DTYPES[opts.save_precision]
    layers = {"unet_lora_layers": {k: v.detach().to(dtype) for k, v in get_peft_model_state_dict(unet).items()}}
    meta = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None:  # under the names other tools use (text_model.encoder...)
        layers["text_encoder_lora_layers"] = {canonical_module("text_encoder", k): v.detach().to(dtype)
                                              for k, v in get_peft_model_state_dict(text_encoder).items()}
        meta["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    written = []
    trained_for = steps_metadata(step, total_steps or opts.max_steps)  # ss_steps, ss_max_train_steps: both layouts
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, **layers, **meta, safe_serialization=True)
        if opts.format in ("diffusers", "both"):
            finish_diffusers_file(Path(tmp) / LORA_WEIGHTS_NAME, **trained_for)
            permissions_by_umask(Path(tmp) / LORA_WEIGHTS_NAME)  # safetensors writes 0600
            os.replace(Path(tmp) / LORA_WEIGHTS_NAME, out / LORA_WEIGHTS_NAME)
            written.append(out / LORA_WEIGHTS_NAME)
        if opts.format in ("kohya", "both"):
            prefixed = {f"unet.{k}": v for k, v in layers["unet_lora_layers"].items()}
            prefixed.update({f"text_encoder.{k}": v for k, v in layers.get("text_encoder_lora_layers", {}).items()})
            pairs, _ = peft_pairs(prefixed)
            alpha = opts.rank_and_alpha("")[1]
            conv_rank, conv_alpha = opts.rank_and_alpha(UNET_CONV[0])
            alphas = {name: opts.rank_and_alpha(name)[1] for name in pairs}
            tensors = {k: v.to(dtype) for k, v in peft_to_kohya(pairs, alphas).items()}
            # the trained words, in fp32 as their embedding files hold them (a "." would break A1111's key); only
            # when asked, since diffusers refuses a kohya file with any key that is not a lora_unet_/lora_te_ one
            bundled = (token_embeddings or {}) if opts.bundle_words else {}
            words = {w: v for w, v in bundled.items() if "." not in w}
            for word in sorted(set(bundled) - set(words)):
                print(f"egaku: note: {word!r} is not bundled in the kohya file (A1111 reads a bundled word from a key "
                      f"that a '.' would break); A1111 takes it from {EMBEDDINGS_DIR}/{word}.safetensors")
            tensors.update(bundle_tensors(words))
            name = kohya_file(out).stem
            per_epoch = (run or {}).get("ss_num_batches_per_epoch")
            trigger = list(dict.fromkeys(([opts.trigger] if opts.trigger else []) + list(opts.train_tokens)))
            metadata = kohya_metadata(
                unet.config, prediction_type,
                ss_output_name=name, ss_network_dim=opts.rank, ss_network_alpha=alpha,
                ss_network_args={**({"conv_dim": conv_rank, "conv_alpha": conv_alpha} if opts.lora_conv else {}),
                                 **({"loraplus_lr_ratio": opts.loraplus_lr_ratio} if opts.loraplus_lr_ratio else {})},
                ss_num_train_images=num_images, ss_resolution=f"({opts.resolution}, {opts.resolution})",
                ss_learning_rate=opts.learning_rate, ss_unet_lr=opts.learning_rate, **trained_for,
                ss_lr_scheduler=opts.lr_scheduler, ss_seed=opts.seed, ss_mixed_precision=opts.mixed_precision,
                ss_min_snr_gamma=opts.min_snr_gamma, ss_noise_offset=opts.noise_offset, ss_loss_type=opts.loss_type,
                ss_debiased_estimation=opts.debiased_estimation,
                ss_ip_noise_gamma=opts.input_perturbation or None,
                **({"ss_huber_c": opts.huber_c, "ss_huber_schedule": opts.huber_schedule}
                   if opts.loss_type in ("huber", "smooth_l1") else {}),
                # 0 reads as "text encoder not trained" to kohya's tools: the rate it trains at (the LoRA's unless set)
                ss_text_encoder_lr=(opts.text_encoder_lr or opts.learning_rate) if opts.train_text_encoder else 0,
                ss_network_train_unet_only=str(not opts.train_text_encoder),
                # kohya's: a local model by its file or folder name, not the trainer's path (which names its user)
                ss_tag_frequency=tags or {}, ss_sd_model_name=Path(opts.model).name if os.path.exists(opts.model)
                else opts.model,
                ss_caption_dropout_rate=opts.caption_dropout, ss_shuffle_caption=opts.shuffle_caption,
                ss_keep_tokens=opts.keep_tokens, ss_clip_skip=opts.clip_skip,
                ss_max_token_length=opts.max_token_length if opts.max_token_length > 75 else None,
                ss_caption_tag_dropout_rate=opts.caption_tag_dropout, ss_batch_size_per_device=opts.batch_size,
                ss_gradient_accumulation_steps=opts.gradient_accumulation, ss_training_finished_at=time.time(),
                ss_enable_bucket=True, ss_flip_aug=opts.random_flip,
                # the epoch the file's steps end in, as kohya records each save (ss_num_epochs: the run's)
                **({"ss_epoch": math.ceil(trained_for["ss_steps"] * opts.gradient_accumulation / per_epoch)}
                   if per_epoch else {}),
                **{"ss_optimizer": opts.optimizer, **(run or {})},
                # kohya's SAI model spec entries (library/sai_model_spec.py build_metadata); encoder_layer is the
                # text-encoder layer captions were read from (kohya's clip_skip), the trigger phrase the --trigger
                # word and the trained words
                **{"modelspec.title": name, "modelspec.resolution": f"{opts.resolution}x{opts.resolution}",
                   "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                   "modelspec.encoder_layer": opts.clip_skip,
                   **({"modelspec.trigger_phrase": ", ".join(trigger)} if trigger else {})})
            # A1111's and civitai's hash of the file, which kohya writes in: the sha256 of its tensor bytes
            metadata["sshs_model_hash"] = tensors_hash(tensors)
            atomic_save_file(tensors, out / f"{name}.safetensors", metadata=metadata)
            written.append(out / f"{name}.safetensors")
    # the other layout's file, left by an earlier run in this folder (or before a resume with another --format),
    # would be what `--lora OUT` and `info` read: it goes
    for stale in {out / LORA_WEIGHTS_NAME, kohya_file(out)} - set(written):
        if stale.is_file():
            stale.unlink()
            print(f"removed {stale}: an earlier run's LoRA in the layout this run does not write (--format "
                  f"{opts.format})")
    for word, vector in (token_embeddings or {}).items():
        written.append(save_embedding(out / EMBEDDINGS_DIR / f"{word}.safetensors", vector[None]))
    save_config(opts, out / "training_config.json")
    return written


def kohya_file(out: Path) -> Path:
    """The kohya-layout file of a LoRA folder, named after the folder: A1111 and ComfyUI list a LoRA by its file
    name."""
    name = out.resolve().name
    return out / f"{name if name != LORA_WEIGHTS_NAME.split('.')[0] else 'lora'}.safetensors"


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of the tensor bytes of a safetensors file holding ``tensors``, whatever its metadata: the "addnet"
    hash A1111 shows (its first 12 digits are the Lora hashes of an image's parameters)."""
    from safetensors.torch import save

    data = save(tensors)
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def train_lora_command(opts: TrainLoraOptions) -> None:
    path = train_lora(opts)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    files = [p.name for p in (path / LORA_WEIGHTS_NAME, kohya_file(path)) if p.is_file()]  # this run's, not others
    if files:
        print(f"LoRA files in {path}: {', '.join(files)}")
