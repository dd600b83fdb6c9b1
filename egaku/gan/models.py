"""GAN generators and discriminators: the classic MLP GAN and a DCGAN, each optionally class-conditional.

Goodfellow et al. 2014, "Generative Adversarial Networks"; Radford et al. 2015, "Unsupervised
Representation Learning with Deep Convolutional GANs" (DCGAN); Mirza & Osindero 2014, "Conditional
Generative Adversarial Nets" (the label concatenated to the generator's input); Miyato & Koyama 2018,
"cGANs with Projection Discriminator" (both conditional discriminators).

Every model is a diffusers ``ModelMixin, ConfigMixin``: the constructor arguments are saved with the
weights, so ``save_pretrained`` writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` and
``from_pretrained`` rebuilds the same network.

Discriminators return logits. The sigmoid of the definitions is applied by the loss
(``binary_cross_entropy_with_logits``, the same function computed without overflow in log(1 - sigmoid))
and by ``probability()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..errors import EgakuError, NotFoundError

ARCHITECTURES = ("mlp", "dcgan")
ARCH_TITLES = {"mlp": "an MLP GAN", "dcgan": "a DCGAN"}


class _Conditioned:
    """Shared label handling: ``num_classes == 0`` means unconditional."""

    num_classes: int

    def _check_labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("this model is unconditional; call it without labels")
            return None
        if labels is None:
            raise ValueError(f"this model is conditional on {self.num_classes} classes; pass labels")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        return labels

    def _one_hot(self, labels: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        labels = self._check_labels(labels, batch)
        return None if labels is None else F.one_hot(labels, self.num_classes).to(dtype)


class MLPGenerator(ModelMixin, ConfigMixin, _Conditioned):
    """Dense(latent→256) → LeakyReLU → Dense(512) → LeakyReLU → Dense(H·W·C, tanh) → (C, H, W).

    The classic definition: no biases in the dense layers. Conditional: a one-hot label is concatenated
    to the latent vector (Mirza & Osindero).
    """

    arch = "mlp"

    @register_to_config
    def __init__(self, latent_dim: int = 100, hidden_dims: tuple[int, ...] = (256, 512), image_size: int = 28,
                 channels: int = 1, num_classes: int = 0, class_names: list[str] | None = None,
                 negative_slope: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        dims = [latent_dim + num_classes, *hidden_dims]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b, bias=False), nn.LeakyReLU(negative_slope)]
        layers += [nn.Linear(dims[-1], channels * image_size * image_size, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        onehot = self._one_hot(labels, len(z), z.dtype)
        h = z if onehot is None else torch.cat([z, onehot], dim=1)
        c, s = self.config.channels, self.config.image_size
        return self.net(h).view(len(z), c, s, s)


class MLPDiscriminator(ModelMixin, ConfigMixin, _Conditioned):
    """Flatten → Dense(512) → LeakyReLU → Dense(256) → LeakyReLU → Dense(1) (sigmoid in the loss).

    Conditional: projection, logit = w·h + embed(y)·h with h the 256 features (Miyato & Koyama). A one-hot
    label concatenated to the pixels (Mirza & Osindero) was tried first: on an easy two-class set its
    generator collapsed onto one class for both labels, the label being one input among hundreds.
    """

    arch = "mlp"

    @register_to_config
    def __init__(self, hidden_dims: tuple[int, ...] = (512, 256), image_size: int = 28, channels: int = 1,
                 num_classes: int = 0, negative_slope: float = 0.2):
        super().__init__()
        self.num_classes = num_classes
        dims = [channels * image_size * image_size, *hidden_dims]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(negative_slope)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 1)
        self.embed = nn.Embedding(num_classes, dims[-1]) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(labels, len(x))
        h = self.features(x)
        logit = self.head(h).squeeze(1)
        if labels is not None:
            logit = logit + (self.embed(labels) * h).sum(1)
        return logit

    def probability(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(x, labels))


def _dcgan_init(module: nn.Module) -> None:
    # DCGAN paper: "All weights were initialized from a zero-centered Normal distribution with standard
    # deviation 0.02"; batch-norm scales around 1.
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class _LatentProjection(nn.ConvTranspose2d):
    """The DCGAN's first layer, a transposed convolution of the 1x1 latent "image" to k x k (stride 1, no padding).

    On a 1x1 input it is one matrix product, out[n, o, i, j] = Σ_c z[n, c]·W[c, o, i, j]; computed that way:
    the same weights and result, ~4x faster (forward and backward) than the general kernel on CPU,
    where that kernel took ~10% of a DCGAN training step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1) or self.stride != (1, 1) or self.padding != (0, 0) or self.groups != 1 \
                or self.bias is not None:
            return super().forward(x)
        return (x.flatten(1) @ self.weight.flatten(1)).view(len(x), self.out_channels, *self.kernel_size)


def _check_dcgan_size(image_size: int) -> None:
    if image_size % 4 or image_size < 8:
        raise EgakuError(f"the DCGAN needs an image size divisible by 4 and at least 8, got {image_size}; "
                         "use --image-size 28 (digits) or 32, 64")


class DCGANGenerator(ModelMixin, ConfigMixin, _Conditioned):
    """Transposed convolutions: z (1x1) → (4b, s/4, s/4) → (2b, s/2, s/2) → (C, s, s), batch norm + ReLU, tanh.

    For 28x28 digits: 7x7 → 14x14 → 28x28. Conditional: one-hot label concatenated to z.
    """

    arch = "dcgan"

    @register_to_config
    def __init__(self, latent_dim: int = 100, base_channels: int = 32, image_size: int = 28, channels: int = 1,
                 num_classes: int = 0, class_names: list[str] | None = None):
        super().__init__()
        _check_dcgan_size(image_size)
        self.num_classes = num_classes
        b = base_channels
        self.net = nn.Sequential(
            _LatentProjection(latent_dim + num_classes, 4 * b, image_size // 4, 1, 0, bias=False),
            nn.BatchNorm2d(4 * b), nn.ReLU(True),
            nn.ConvTranspose2d(4 * b, 2 * b, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * b), nn.ReLU(True),
            nn.ConvTranspose2d(2 * b, channels, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        onehot = self._one_hot(labels, len(z), z.dtype)
        h = z if onehot is None else torch.cat([z, onehot], dim=1)
        return self.net(h[:, :, None, None])


class DCGANDiscriminator(ModelMixin, ConfigMixin, _Conditioned):
    """Strided convolutions: (C, s, s) → (b, s/2) → (2b, s/4) → logit, batch norm + LeakyReLU(0.2).

    No batch norm on the first layer (DCGAN paper). Conditional: projection discriminator,
    logit = w·h + embed(y)·h with h the pooled features (Miyato & Koyama). ``minibatch_std``: the head
    also sees the features' standard deviation across the batch, one extra channel (Karras et al. 2018,
    ProGAN), so a batch of too-similar fakes is told apart by its lack of variety.
    """

    arch = "dcgan"

    @register_to_config
    def __init__(self, base_channels: int = 32, image_size: int = 28, channels: int = 1, num_classes: int = 0,
                 minibatch_std: bool = False):
        super().__init__()
        _check_dcgan_size(image_size)
        self.num_classes = num_classes
        self.minibatch_std = minibatch_std
        b = base_channels
        self.features = nn.Sequential(
            nn.Conv2d(channels, b, 4, 2, 1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(b, 2 * b, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * b), nn.LeakyReLU(0.2, True),
        )
        # a convolution covering the whole s/4 x s/4 map: the DCGAN's last layer, one logit per image
        self.head = nn.Conv2d(2 * b + int(minibatch_std), 1, image_size // 4, 1, 0)
        self.embed = nn.Embedding(num_classes, 2 * b) if num_classes else None
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(labels, len(x))
        h = self.features(x)
        seen = h
        if self.minibatch_std:
            spread = h.std(dim=0, unbiased=False).mean()  # 0 for a single image
            seen = torch.cat([h, spread.expand(len(h), 1, *h.shape[2:])], dim=1)
        logit = self.head(seen).flatten(1).squeeze(1)
        if labels is not None:
            logit = logit + (self.embed(labels) * h.sum(dim=(2, 3))).sum(1)
        return logit

    def probability(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(x, labels))


GENERATORS = {"mlp": MLPGenerator, "dcgan": DCGANGenerator}
DISCRIMINATORS = {"mlp": MLPDiscriminator, "dcgan": DCGANDiscriminator}


def build_gan(arch: str, image_size: int = 28, channels: int = 1, latent_dim: int = 100,
              class_names: list[str] | None = None, base_channels: int = 32,
              minibatch_std: bool = False) -> tuple[nn.Module, nn.Module]:
    """A fresh (generator, discriminator) pair; ``class_names`` given means class-conditional."""
    if arch not in ARCHITECTURES:
        raise EgakuError(f"unknown GAN architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if minibatch_std and arch != "dcgan":
        raise EgakuError("--minibatch-std is a DCGAN option: the MLP discriminator keeps its classic layers")
    k = len(class_names) if class_names else 0
    if arch == "mlp":
        gen = MLPGenerator(latent_dim=latent_dim, image_size=image_size, channels=channels, num_classes=k,
                           class_names=class_names)
        disc = MLPDiscriminator(image_size=image_size, channels=channels, num_classes=k)
    else:
        gen = DCGANGenerator(latent_dim=latent_dim, base_channels=base_channels, image_size=image_size,
                             channels=channels, num_classes=k, class_names=class_names)
        disc = DCGANDiscriminator(base_channels=base_channels, image_size=image_size, channels=channels,
                                  num_classes=k, minibatch_std=minibatch_std)
    return gen, disc


def architecture_of(model_dir: Path) -> str:
    """``mlp`` or ``dcgan`` from a saved generator's config.json (without loading weights)."""
    config_path = model_dir / "config.json"
    try:
        name = json.loads(config_path.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise EgakuError(f"{config_path}: cannot read the model config ({exc})") from None
    for arch, cls in GENERATORS.items():
        if name == cls.__name__:
            return arch
    raise EgakuError(f"{model_dir} holds a {name!r}, not an egaku GAN generator "
                     f"({', '.join(c.__name__ for c in GENERATORS.values())})")


def generator_dir(path: str | Path) -> Path:
    """The generator folder of a train-gan output folder, or the generator folder itself."""
    path = Path(path)
    if (path / "generator" / "config.json").is_file():
        return path / "generator"
    if (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file():
        return path
    run = path.parent.parent  # RUN/checkpoints/step-N
    if (path / "state.pt").is_file() and (run / "generator" / "config.json").is_file():
        raise EgakuError(f"{path} is a training checkpoint; the run's generator (as of its last export) is "
                         f"{run / 'generator'}: pass --model {run}")
    if (path / "checkpoints").is_dir() or (path / "state.pt").is_file():
        raise EgakuError(f"{path} holds training checkpoints but no exported generator yet; let train-gan finish, "
                         "or resume it with --resume latest")
    raise NotFoundError(f"no GAN generator in {path}: expected {path}/generator/config.json (the --out folder "
                        "of `egaku train-gan`)")


def load_generator(path: str | Path, arch: str = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """Load a trained generator; ``arch`` other than ``auto`` must match what the folder holds."""
    folder = generator_dir(path)
    found = architecture_of(folder)
    if arch not in ("auto", found):
        raise EgakuError(f"{path} holds {ARCH_TITLES[found]}, but --arch {arch} was asked; "
                         f"pass --arch {found} (or auto), or {ARCH_TITLES[arch]}")
    gen = GENERATORS[found].from_pretrained(folder)
    return gen.to(device).eval()
