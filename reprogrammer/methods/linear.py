"""Linear heads on L2-normalised CLIP image features, and the linear probe (docs/method.md 6).

Zero-shot, linear probing and the fine-tuning family all classify with
`logits = head(normalize(image_features))`. A head started at `s * T` (the zero-shot text
features of the class prompts times `s = exp(logit_scale)`, bias 0) gives exactly the
zero-shot logits `s * cos`; the linear probe starts from `nn.Linear`'s random init instead.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig
from ..constants import MCM_TEMPERATURE
from ..state import load_checked
from .base import Classifier
from .features import ImageTower, zero_shot_text_features
from .optim import check_schedule

#: The authors' step schedule: the LR multiplier becomes 0.5, then 0.2, then 0.1 of the base LR
#: (absolute factors, not cumulative) once this fraction of the steps is done.
STEP_MILESTONES = ((0.4, 0.5), (0.7, 0.2), (0.8, 0.1))


def step_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier at `step`: optional linear warm-up `(step + 1) / warmup`, then the step schedule."""
    if step < warmup:
        return (step + 1) / warmup
    multiplier = 1.0
    for fraction, factor in STEP_MILESTONES:
        if step >= fraction * total:
            multiplier = factor
    return multiplier


def step_scheduled(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    check_schedule(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step_decay(step, warmup, total))


def or_default(value, default):
    """`value`, or `default` when it is None (a `MethodConfig` field left to the method)."""
    return default if value is None else value


class LinearHeadClassifier(Classifier):
    """`head(normalize(image_tower(images)))`; subclasses choose what trains and how.

    `zero_shot_head` starts the head at `s * T` (bias 0), else at a random init. `copy_tower`
    gives the classifier its own copy of the image tower, for methods that train it. The MCM
    temperature is `0.01 * s` for a head started at `s * T` (its logits are `s * cos` at init and
    stay on that scale) and 1 (plain MSP) for a randomly started head.
    """

    method = "linear-head"

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig, *, zero_shot_head: bool, copy_tower: bool):
        super().__init__()
        self.cfg = cfg
        self.classnames = list(classnames)
        self.logit_scale = clip.logit_scale.exp().item()
        self.zero_shot_head = zero_shot_head
        self.tunes_tower = copy_tower
        self.image_tower = ImageTower(clip, copy=copy_tower)
        text_features = zero_shot_text_features(clip, tokenizer, self.classnames, cfg.template)
        weight = next(self.image_tower.parameters())
        self.head = nn.Linear(text_features.shape[1], len(self.classnames), device=weight.device, dtype=weight.dtype)
        if zero_shot_head:
            with torch.no_grad():
                self.head.weight.copy_(self.logit_scale * text_features)
                self.head.bias.zero_()

    @property
    def score_temperature(self) -> float:
        return MCM_TEMPERATURE * self.logit_scale if self.zero_shot_head else 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.image_tower(images), dim=-1))

    def loss(self, images, labels):
        return F.cross_entropy(self(images).float(), labels)

    def _learned_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors training changes, by checkpoint key (the live parameters, not copies)."""
        tensors = {"head.weight": self.head.weight, "head.bias": self.head.bias}
        if self.tunes_tower:
            tensors.update({f"visual.{k}": v for k, v in self.image_tower.visual.state_dict(keep_vars=True).items()})
        return tensors

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._learned_tensors().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        load_checked(self._learned_tensors(), state, self.method)


def linear_probe_optimizer(head: nn.Linear, lr=None, weight_decay=None) -> torch.optim.Optimizer:
    """Adam, lr 1e-2, no weight decay (the authors' linear probe) unless given."""
    return torch.optim.Adam([{"params": list(head.parameters()), "name": "head"}], lr=or_default(lr, 1e-2), weight_decay=or_default(weight_decay, 0.0))


class LinearProbeClassifier(LinearHeadClassifier):
    """Randomly initialised `D -> C` head with bias on frozen, L2-normalised image features."""

    method = "linear-probe"
    default_epochs = 25

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig):
        super().__init__(clip, tokenizer, classnames, cfg, zero_shot_head=False, copy_tower=False)

    def make_optimizers(self, total_steps):
        optimizer = linear_probe_optimizer(self.head, self.cfg.lr, self.cfg.weight_decay)
        return [optimizer], [step_scheduled(optimizer, or_default(self.cfg.warmup_steps, 0), total_steps)]


def build_linear_probe(clip, tokenizer, classnames, cfg):
    return LinearProbeClassifier(clip, tokenizer, classnames, cfg)
