"""The two networks of the project: a compact student CNN and a ResNet-18 teacher for 28x28.

Every model exposes the same three things, because the distillation methods (FedKD,
FedMIC, MOON) need the representation and the decision separately:

* ``features(x) -> (B, feature_dim)``: the representation h,
* ``classifier``: an ``nn.Linear(feature_dim, num_classes)`` giving the logits z = g(h),
* ``forward(x) = classifier(features(x))``, and the attribute ``feature_dim``.

Initialisation is deterministic: ``build_model(..., seed=s)`` draws its initial weights
inside ``torch.random.fork_rng`` seeded with ``s``, so building a model neither depends on
nor disturbs the global RNG, and the same seed gives bit-identical weights on every call.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from collections.abc import Callable

import torch
from torch import nn

from .protocol import ConfigurationError, DataSpec

__all__ = [
    "MODEL_NAMES",
    "NORMS",
    "ResNet18",
    "StudentCNN",
    "build_model",
    "num_parameters",
    "state_nbytes",
]


#: Normalization layers a model can be built with (the ``norm`` option of both models).
NORMS: tuple[str, ...] = ("batch", "group")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with groups of 8 channels (at most 32 groups).

    Why GroupNorm for federated training: BatchNorm's running statistics are a second,
    data-dependent model that averaging mixes across hospitals and a small site updates
    only a few dozen times, so eval mode disagrees with what was learned (measured in
    the learning issue: a hospital's model at 0.89 in train mode scored 0.5 in eval mode).
    GroupNorm normalises each sample by itself: train and eval modes compute the same
    function, and there is nothing but weights to average.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(1, min(32, channels // 8))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ConfigurationError(f"norm must be one of {', '.join(NORMS)}, got '{kind}'.")


class StudentCNN(nn.Module):
    """Three conv blocks (conv3x3-BN-ReLU, pooling), a 2x2 average pool and a dense layer.

    Why this shape: it is the shared model that travels every round, so it must be small
    (about 158k parameters for 1x28x28 with the default widths) and fast on a CPU, yet
    have 2-D weight matrices large enough for the SVD codec to compress (the 128x512 dense
    layer and block three's conv, a 128x576 matrix, hold most parameters). The adaptive pool
    makes the network work for 28, 64, 128 or 224 pixel inputs unchanged. Biases of the
    convs are dropped because BatchNorm follows them.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, int, int] = (32, 64, 128),
        feature_dim: int = 128,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm_layer(norm, c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, c1),
            nn.MaxPool2d(2),  # 28 -> 14
            *block(c1, c2),
            nn.MaxPool2d(2),  # 14 -> 7
            *block(c2, c3),
            nn.AdaptiveAvgPool2d(2),  # 7 -> 2
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(c3 * 4, feature_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation h (non-negative, after the last ReLU), shape (B, feature_dim)."""
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """The ResNet basic block (He et al. 2016): two 3x3 convs and an identity/1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: a 3x3 stride-1 stem and no max-pool.

    Why: the ImageNet stem (7x7 stride 2 + max-pool) shrinks a 28x28 image to 7x7 before
    the first block and loses most of it; MedMNIST v2's ResNet-18 baselines at 28x28 use
    the CIFAR-style stem instead, which is what this is (stages of 2 basic blocks at
    widths w, 2w, 4w, 8w with w=64, strides 1, 2, 2, 2; 11.2M parameters at w=64).
    Built here rather than from torchvision so the core needs torch only (torchvision also
    costs ~5 s to import). ``base_width`` is exposed so CPU tests can use a thin teacher;
    the teacher's width is an interpretation knob, 64 being the published architecture.
    ``stem_stride`` 2 halves the stem's output (28 -> 14 px): every stage then works on a
    quarter of the pixels, so the teacher costs about a quarter (the FedMIC round profile,
    ``benchmarks/fedmic_round.py``, measured the teacher at over half of a round); 1 is
    the published stem.
    """

    def __init__(
        self, in_channels: int, num_classes: int, base_width: int = 64, norm: str = "batch", stem_stride: int = 1
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ConfigurationError(f"resnet18's stem_stride must be 1 (the published stem) or 2, got {stem_stride!r}.")
        w = base_width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, stride=stem_stride, padding=1, bias=False), norm_layer(norm, w), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        c_in = w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride, norm), _BasicBlock(c_out, c_out, 1, norm)))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8 * w, num_classes)
        self.feature_dim = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The global-average-pooled representation, shape (B, 8 * base_width)."""
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _student(spec: DataSpec, **kwargs: object) -> nn.Module:
    return StudentCNN(spec.in_channels, spec.num_classes, **kwargs)  # type: ignore[arg-type]


def _resnet18(spec: DataSpec, **kwargs: object) -> nn.Module:
    return ResNet18(spec.in_channels, spec.num_classes, **kwargs)  # type: ignore[arg-type]


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"student_cnn": _student, "resnet18": _resnet18}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _check_spec(spec: DataSpec) -> None:
    if spec.in_channels < 1:
        raise ConfigurationError(f"DataSpec.in_channels must be >= 1, got {spec.in_channels}.")
    if spec.num_classes < 2:
        raise ConfigurationError(f"DataSpec.num_classes must be >= 2, got {spec.num_classes}.")
    if spec.image_size < 8:
        raise ConfigurationError(f"DataSpec.image_size must be >= 8 pixels, got {spec.image_size}.")


def build_model(name: str, spec: DataSpec, seed: int | None = None, channels_last: bool = False, **kwargs: object) -> nn.Module:
    """Build ``name`` ('student_cnn' or 'resnet18') for ``spec``'s channels and classes.

    With ``seed`` the initial weights are drawn from a forked RNG seeded with it (the
    global RNG is left untouched); without it they come from the global RNG. ``kwargs``
    go to the constructor (``widths``/``feature_dim`` for the student, ``base_width`` for
    ResNet-18, ``norm`` = 'batch' or 'group' for both, see ``norm_layer``). The model is returned on the CPU in training mode.

    ``channels_last`` stores the 4-D conv weights in NHWC order, which makes oneDNN (CPU)
    and cuDNN (GPU, with AMP) pick their fast NHWC kernels: measured 1.6x faster training
    of the student on one CPU thread. The values are the same; only strides differ, so
    use ``reshape``/``flatten`` (not ``view``) on such weights. Payloads produced by
    ``training.state_to_payload`` are always plain contiguous tensors.
    """
    if name not in _BUILDERS:
        raise ConfigurationError(f"Unknown model '{name}'. Valid models: {', '.join(MODEL_NAMES)}.")
    _check_spec(spec)
    builder = _BUILDERS[name]
    try:
        if seed is None:
            model = builder(spec, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model = builder(spec, **kwargs)
    except TypeError as exc:  # an unknown constructor keyword
        raise ConfigurationError(f"Bad options {sorted(kwargs)} for model '{name}': {exc}") from exc
    model.build_recipe = {"name": name, "spec": asdict(spec), "kwargs": dict(kwargs)}
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_record(model: nn.Module) -> dict[str, Any]:
    """What it takes to rebuild ``model`` elsewhere: its recipe and its weights (on the CPU)."""
    recipe = getattr(model, "build_recipe", None)
    if recipe is None:
        raise ConfigurationError("Only models made by build_model() carry the recipe needed to save them.")
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return {"architecture": recipe["name"], "spec": dict(recipe["spec"]), "kwargs": dict(recipe["kwargs"]), "state_dict": state}


def model_from_record(record: dict[str, Any]) -> nn.Module:
    """Rebuild a model saved with ``model_record`` (in eval mode, on the CPU)."""
    model = build_model(record["architecture"], DataSpec(**record["spec"]), **record.get("kwargs", {}))
    model.load_state_dict(record["state_dict"])
    return model.eval()


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def state_nbytes(model: nn.Module) -> int:
    """Bytes of the full state_dict (parameters and buffers): what FedAvg sends."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
