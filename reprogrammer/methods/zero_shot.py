"""Zero-shot CLIP: the class prompts' text features as a frozen linear head (docs/method.md 6)."""
from ..config import MethodConfig
from .linear import LinearHeadClassifier


class ZeroShotClassifier(LinearHeadClassifier):
    """Logits `s * cos(image, prompt)` of the frozen CLIP under standard preprocessing.

    Nothing trains: `trainable` is False so the engine skips training; `loss` refuses, and
    `make_optimizers` and `learned_state` are empty.
    """

    method = "zero-shot"
    trainable = False
    default_epochs = 0

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig):
        super().__init__(clip, tokenizer, classnames, cfg, zero_shot_head=True, copy_tower=False)
        self.head.requires_grad_(False)

    def loss(self, images, labels):
        raise RuntimeError("the zero-shot classifier has nothing to train (trainable=False): evaluate it directly")

    def make_optimizers(self, total_steps):
        return [], []

    def _learned_tensors(self):
        return {}


def build_zero_shot(clip, tokenizer, classnames, cfg):
    return ZeroShotClassifier(clip, tokenizer, classnames, cfg)
