"""Reprogrammer as a method: the paper's loss, optimisers and schedule (docs/method.md 1-4)."""
import torch

from .. import kernels
from ..config import MethodConfig
from ..constants import MCM_TEMPERATURE
from ..model import Reprogrammer
from ..towers import text_tower
from .base import Classifier
from .losses import batch_classes, contrastive_focal_loss, gather_batch
from .optim import reprogrammer_optimizers, scheduled


class ReprogrammerClassifier(Reprogrammer, Classifier):
    """`Reprogrammer` plus training. Logits are `s * cos`; MCM uses `T = 0.01` on the cosine."""

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig, *, image=True, text=True):
        super().__init__(clip, tokenizer, classnames, template=cfg.template, up_resolution=cfg.up_resolution,
                         mr_resolution=cfg.mr_resolution, dropout=cfg.dropout, image=image, text=text,
                         alpha=cfg.alpha if cfg.train_residual else 0.0)
        self.cfg = cfg
        self.warmup_steps = 500 if cfg.warmup_steps is None else cfg.warmup_steps

    @property
    def score_temperature(self) -> float:
        return MCM_TEMPERATURE * self.logit_scale.item()

    def frozen_towers(self):
        return [self.clip.visual.transformer, text_tower(self.clip)[0].transformer]

    def loss(self, images, labels):
        image_features = self.image_features(images)
        if self.alpha > 0:  # residual path on during training
            image_features = kernels.blend(image_features, self.zero_shot_image_features(images), self.alpha)
        else:
            image_features = torch.nn.functional.normalize(image_features, dim=-1)
        image_features, labels = gather_batch(image_features, labels)
        classes, class_of_image = batch_classes(labels, len(self.classnames))
        text_features = self.encode_text(classes)
        if self.alpha > 0:
            text_features = kernels.blend(text_features, self.zs_text_features[classes], self.alpha)
        return contrastive_focal_loss(image_features, text_features, class_of_image, self.logit_scale)

    def make_optimizers(self, total_steps):
        optimizers = reprogrammer_optimizers(self, image_lr=self.cfg.image_lr, text_lr=self.cfg.text_lr,
                                             weight_decay=0.1 if self.cfg.weight_decay is None else self.cfg.weight_decay)
        return optimizers, [scheduled(o, self.warmup_steps, total_steps) for o in optimizers]

def build_reprogrammer(clip, tokenizer, classnames, cfg):
    return ReprogrammerClassifier(clip, tokenizer, classnames, cfg)

def build_reprogrammer_image(clip, tokenizer, classnames, cfg):
    return ReprogrammerClassifier(clip, tokenizer, classnames, cfg, text=False)

def build_reprogrammer_text(clip, tokenizer, classnames, cfg):
    return ReprogrammerClassifier(clip, tokenizer, classnames, cfg, image=False)
