"""CoOp: learned prompt context shared by all classes, frozen CLIP (docs/method.md 6; Zhou et al. 2022).

The prompt of class `c` is `[SOS] ctx_1 .. ctx_n classname . [EOS]`: the tokenizer encodes
`"X X .. X classname."` and the embeddings of the `n` placeholder X tokens are replaced by the
learned context vectors. Pooling reads the prompt's own token ids, so the EOT position is the
one the tokenizer gave. The text tower runs on the prompts cut to `text_length` (the longest
prompt, context included, rounded up to 8; `towers.text_length`).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classnames import checked_classnames
from ..config import MethodConfig
from ..constants import MCM_TEMPERATURE
from ..state import load_checked
from ..text_cache import TextFeatureCache, text_tower_tensors
from ..towers import encode_text_embeddings, text_length, text_tower
from .base import Classifier
from .features import ImageTower
from .linear import or_default
from .optim import scheduled


def context_prompts(tokenizer, classnames, n_ctx: int) -> tuple[torch.Tensor, int]:
    """`(tokens [C, L], start)`: CoOp prompts with the placeholders at positions `start .. start + n_ctx - 1`."""
    if n_ctx < 1:
        raise ValueError(f"n_ctx={n_ctx} must be at least 1 context vector")
    classnames = checked_classnames(classnames)
    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]
    tokens = tokenizer(prompts)
    context_length = tokens.shape[1]
    # A prompt that fits tokenizes the same with one more slot; a truncated one does not.
    longer = tokenizer(prompts, context_length=context_length + 1)
    too_long = (longer[:, :context_length] != tokens).any(-1).nonzero()
    if len(too_long):
        raise ValueError(
            f"the CoOp prompt of class {classnames[too_long[0, 0]]!r} with n_ctx={n_ctx} context tokens does not "
            f"fit the text tower's context_length={context_length}; lower n_ctx or shorten the class name"
        )
    bare, with_x = tokenizer([""])[0], tokenizer(["X"])[0]
    placeholder = with_x[(bare != with_x).nonzero()[0, 0]]
    start = int((tokens[0] == placeholder).int().argmax())  # first placeholder
    if not (tokens[:, start:start + n_ctx] == placeholder).all():
        raise ValueError("the tokenizer does not encode the context placeholders 'X X .. X' as one token each")
    return tokens, start


class CoOpClassifier(Classifier):
    """Logits `s * cos(image, prompt_c)` with learned context vectors; everything of CLIP frozen."""

    method = "coop"
    default_epochs = 50

    def __init__(self, clip, tokenizer, classnames, cfg: MethodConfig):
        super().__init__()
        text, _, _ = text_tower(clip)
        self.cfg = cfg
        self.classnames = list(classnames)
        self.clip = clip.requires_grad_(False).eval()
        self.logit_scale = clip.logit_scale.exp().item()
        self.image_tower = ImageTower(clip)
        table = text.token_embedding.weight
        tokens, self.context_start = context_prompts(tokenizer, self.classnames, cfg.n_ctx)
        tokens = tokens.to(table.device)
        self.register_buffer("prompt_tokens", tokens)
        self.text_length = text_length(clip, tokens)
        self.register_buffer("prompt_embeddings", text.token_embedding(tokens).detach())
        self.context = nn.Parameter(torch.empty(cfg.n_ctx, table.shape[1], device=table.device,
                                                dtype=table.dtype).normal_(std=0.02))
        self._text_cache = TextFeatureCache()

    @property
    def score_temperature(self) -> float:
        return MCM_TEMPERATURE * self.logit_scale

    # The frozen CLIP stays in eval mode whatever the wrapper's mode.
    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    def prompt_embeddings_with_context(self, length: Optional[int] = None) -> torch.Tensor:
        """Token embeddings `[C, L, width]` of the prompts with the placeholders replaced by the context,
        at the first `length` positions (all by default)."""
        start, end = self.context_start, self.context_start + self.context.shape[0]
        prompts = self.prompt_embeddings[:, :length]
        context = self.context.expand(prompts.shape[0], -1, -1)
        return torch.cat([prompts[:, :start], context, prompts[:, end:]], dim=1)

    def encode_text(self) -> torch.Tensor:
        """L2-normalised text features `[C, D]` of all class prompts."""
        length = self.text_length
        features = encode_text_embeddings(self.clip, self.prompt_embeddings_with_context(length),
                                          self.prompt_tokens[:, :length])
        return F.normalize(features, dim=-1)

    def text_features(self) -> torch.Tensor:
        """`encode_text()`, cached while no gradient flows to the context (see `text_cache`)."""
        if (torch.is_grad_enabled() and self.context.requires_grad) or torch.jit.is_tracing():
            return self.encode_text()
        inputs = [self.context, self.prompt_embeddings, self.prompt_tokens, *text_tower_tensors(self.clip)]
        return self._text_cache(inputs, self.encode_text)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(self.image_tower(images), dim=-1)
        return self.logit_scale * image_features @ self.text_features().T.to(image_features.dtype)

    def loss(self, images, labels):
        return F.cross_entropy(self(images).float(), labels)

    def make_optimizers(self, total_steps):
        optimizer = torch.optim.SGD([{"params": [self.context], "name": "context"}], lr=or_default(self.cfg.lr, 2e-3), momentum=0.9,
                                    weight_decay=or_default(self.cfg.weight_decay, 5e-4))
        return [optimizer], [scheduled(optimizer, or_default(self.cfg.warmup_steps, 500), total_steps)]

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.detach()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        load_checked({"context": self.context}, state, self.method)


def build_coop(clip, tokenizer, classnames, cfg):
    return CoOpClassifier(clip, tokenizer, classnames, cfg)
