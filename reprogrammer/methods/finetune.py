"""Full fine-tuning and the robust fine-tuning references LP-FT and WiSE-FT (docs/method.md 6).

All three train a private copy of the image tower plus a linear head on normalised features;
the text tower only provides the zero-shot head and the caller's CLIP is never modified.

LP-FT runs its two stages inside one optimiser schedule (see `LPFTClassifier`).
WiSE-FT trains exactly like fine-tuning; `set_wise_alpha` then moves the weights along the line
between the zero-shot and the fine-tuned endpoint without retraining.
"""
import torch

from ..config import MethodConfig
from .linear import (
    LinearHeadClassifier,
    LinearProbeClassifier,
    linear_probe_optimizer,
    or_default,
    step_decay,
    step_scheduled,
)
from .optim import check_schedule


def fine_tune_optimizer(classifier: LinearHeadClassifier, cfg: MethodConfig) -> torch.optim.Optimizer:
    """AdamW over image tower + head: lr 3e-5, wd 0.1, betas (0.9, 0.98), eps 1e-6, unless `cfg` overrides."""
    params = [*classifier.image_tower.parameters(), *classifier.head.parameters()]
    return torch.optim.AdamW([{"params": params, "name": "tower_and_head"}], lr=or_default(cfg.lr, 3e-5), betas=(0.9, 0.98), eps=1e-6,
                             weight_decay=or_default(cfg.weight_decay, 0.1))


class FineTuneClassifier(LinearHeadClassifier):
    """Image tower + head (started at `s * T`, bias 0) trained with cross-entropy; text tower unused."""

    method = "fine-tune"
    default_epochs = 25

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig, *, zero_shot_head: bool = True):
        super().__init__(clip, tokenizer, classnames, cfg, zero_shot_head=zero_shot_head, copy_tower=True)
        self.image_tower.requires_grad_(True)

    def make_optimizers(self, total_steps):
        optimizer = fine_tune_optimizer(self, self.cfg)
        return [optimizer], [step_scheduled(optimizer, or_default(self.cfg.warmup_steps, 0), total_steps)]


class _FreshFrom(torch.optim.lr_scheduler.LambdaLR):
    """`LambdaLR` that empties its optimiser's state when step `start` begins, as a new optimiser would be."""

    def __init__(self, optimizer, lr_lambda, start: int):
        self.start = start
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch=None):
        super().step(epoch)
        if self.last_epoch == self.start:
            self.optimizer.state.clear()


class LPFTClassifier(FineTuneClassifier):
    """Linear probe, then fine-tuning from the probed head (Kumar et al.'s LP-FT), in one run.

    The first `lp_epochs / (lp_epochs + 25)` of the steps are the LP stage: the randomly started
    head trains with the linear-probe optimiser and the step schedule over that stage. The rest
    is the FT stage: tower + head with the fine-tuning optimiser and the step schedule over the
    remaining steps (`cfg.lr` / `cfg.weight_decay` set this stage only). Each optimiser has LR 0
    outside its stage, which moves no parameter (Adam's and AdamW's updates, decoupled decay
    included, scale with the LR), and the fine-tuning optimiser starts its stage with empty
    state, so the run equals two separate runs. The engine stays one-stage: the tower computes
    gradients in the LP stage too, which costs a backward pass but uses every parameter in every
    step, as DistributedDataParallel needs.
    """

    method = "lp-ft"

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig):
        super().__init__(clip, tokenizer, classnames, cfg, zero_shot_head=False)
        self.lp_epochs = or_default(cfg.lp_epochs, LinearProbeClassifier.default_epochs)
        self.default_epochs = self.lp_epochs + FineTuneClassifier.default_epochs

    def make_optimizers(self, total_steps):
        lp_steps = round(total_steps * self.lp_epochs / self.default_epochs)
        ft_steps = total_steps - lp_steps
        warmup = or_default(self.cfg.warmup_steps, 0)
        check_schedule(warmup, lp_steps)
        check_schedule(warmup, ft_steps)
        probe, tune = linear_probe_optimizer(self.head), fine_tune_optimizer(self, self.cfg)
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                probe, lambda step: step_decay(step, warmup, lp_steps) if step < lp_steps else 0.0),
            _FreshFrom(tune, lambda step: step_decay(step - lp_steps, warmup, ft_steps) if step >= lp_steps else 0.0,
                       start=lp_steps),
        ]
        return [probe, tune], schedulers


class WiseFTClassifier(FineTuneClassifier):
    """Fine-tuning whose weights can be set to `(1 - a) * theta_zs + a * theta_ft` (Wortsman et al.).

    `theta_zs` is the pretrained image tower (the caller's, never modified) with the zero-shot
    head `s * T`; `theta_ft` is the trained copy. The first `set_wise_alpha` keeps a snapshot of
    the fine-tuned weights; `set_wise_alpha(1.0)` restores them and drops the snapshot, after
    which training may go on. `learned_state` is always the fine-tuned endpoint.
    """

    method = "wise-ft"

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig):
        super().__init__(clip, tokenizer, classnames, cfg)
        self.wise_alphas = list(cfg.wise_alphas)
        self.wise_alpha = 1.0
        # References, not copies: the caller's tower is never trained. Not a registered module, so
        # `.to()` leaves it as it is; `set_wise_alpha` converts each tensor as it reads it.
        self._zero_shot_visual = clip.visual.state_dict()
        self.register_buffer("zero_shot_weight", self.head.weight.detach().clone())
        self._finetuned = None

    def _zero_shot_endpoint(self) -> dict[str, torch.Tensor]:
        state = {f"visual.{k}": v for k, v in self._zero_shot_visual.items()}
        state["head.weight"] = self.zero_shot_weight
        state["head.bias"] = torch.zeros_like(self.head.bias)
        return state

    def learned_state(self):
        if self._finetuned is not None:
            return dict(self._finetuned)
        return super().learned_state()

    def load_learned_state(self, state):
        super().load_learned_state(state)
        self._finetuned = None
        self.wise_alpha = 1.0

    @torch.no_grad()
    def set_wise_alpha(self, alpha: float) -> None:
        """Set the weights to `(1 - alpha) * zero-shot + alpha * fine-tuned` (alpha 0: zero-shot, 1: fine-tuned)."""
        if self._finetuned is None:
            self._finetuned = {k: v.detach().clone() for k, v in self._learned_tensors().items()}
        zero_shot = self._zero_shot_endpoint()
        for key, target in self._learned_tensors().items():
            finetuned = self._finetuned[key].to(target)
            if alpha == 1.0 or not target.is_floating_point():
                target.copy_(finetuned)
            else:
                target.copy_(torch.lerp(zero_shot[key].to(target), finetuned, alpha))
        self.wise_alpha = float(alpha)
        if alpha == 1.0:
            self._finetuned = None

    def loss(self, images, labels):
        if self._finetuned is not None:
            raise RuntimeError(f"WiSE-FT weights are interpolated (alpha={self.wise_alpha}); call "
                               "set_wise_alpha(1.0) to restore the fine-tuned weights before training")
        return super().loss(images, labels)


def build_fine_tune(clip, tokenizer, classnames, cfg):
    return FineTuneClassifier(clip, tokenizer, classnames, cfg)


def build_lp_ft(clip, tokenizer, classnames, cfg):
    return LPFTClassifier(clip, tokenizer, classnames, cfg)


def build_wise_ft(clip, tokenizer, classnames, cfg):
    return WiseFTClassifier(clip, tokenizer, classnames, cfg)
