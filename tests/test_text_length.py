"""The text tower at the prompts' own length equals open_clip's own full-length `encode_text`.

Oracles: open_clip's `encode_text` at the full 77-token context on a copy of the CLIP, its token
embedding's output replaced by the prompts' (learned) embeddings through a forward hook and its
positional embedding by the learned one; the sequence length comes from the tokenizer's own
encoding of each prompt.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from reprogrammer.methods import MethodConfig
from reprogrammer.methods.coop import CoOpClassifier
from reprogrammer.methods.features import zero_shot_text_features
from reprogrammer.methods.finetune import FineTuneClassifier
from reprogrammer.methods.losses import batch_classes, contrastive_focal_loss
from reprogrammer.methods.optim import reprogrammer_optimizers
from reprogrammer.methods.reprogramming import ReprogrammerClassifier
from reprogrammer.methods.zero_shot import ZeroShotClassifier
from tests.helpers import TEXT_VARIANTS, tiny_text_variant

# Prompts of very different lengths: 7, 9 and 26 tokens with "a photo of a {}" (SOT and EOT included).
NAMES = ["cat", "Chesapeake Bay retriever",
         "the quick brown fox that jumps over the lazy sleeping dog near the old river bank at dawn in spring",
         "ship"]
TOLERANCE = {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=0, atol=1e-5)}


def text_module(clip):
    return clip if isinstance(clip, CLIP) else clip.text


def expected_length(tokenizer, prompts, variant) -> int:
    """The longest prompt in tokens (SOT and EOT included), rounded up to 8; the context if bidirectional."""
    if variant == "bidirectional":
        return 77
    longest = max(len(tokenizer.encode(p)) + 2 for p in prompts)
    return min(77, math.ceil(longest / 8) * 8)


def open_clip_features(clip, tokens, embeddings=None, positional=None):
    """L2-normalised `clip.encode_text(tokens)` at the full context, on a copy of `clip` whose token
    embedding gives `embeddings` and whose positional embedding is `positional` (when given);
    gradients flow to both."""
    clip = copy.deepcopy(clip)
    text = text_module(clip)
    if positional is not None:
        del text.positional_embedding
        text.positional_embedding = positional
    if embeddings is not None:
        text.token_embedding.register_forward_hook(lambda module, args, out: embeddings)
    assert tokens.shape[1] == 77
    return F.normalize(clip.encode_text(tokens), dim=-1)


def reprogrammer_oracle(model, classes=slice(None)):
    return open_clip_features(model.clip, model.prompt_tokens[classes],
                              model.token_rows[model.prompt_index[classes]], model.text_positional)


def coop_oracle(model):
    return open_clip_features(model.clip, model.prompt_tokens, model.prompt_embeddings_with_context())


class LengthCounter:
    """Records the sequence length of every call of the text transformer (batch-first input)."""

    def __init__(self, clip):
        self.lengths = []
        self.handle = text_module(clip).transformer.register_forward_pre_hook(
            lambda module, args: self.lengths.append(args[0].shape[1]))

    def __enter__(self):
        return self.lengths

    def __exit__(self, *exc):
        self.handle.remove()


def reprogrammer(variant, dtype, **cfg):
    clip, tokenizer = tiny_text_variant(variant, dtype)
    cfg = MethodConfig(up_resolution=20, mr_resolution=11, warmup_steps=1, **cfg)
    return ReprogrammerClassifier(clip, tokenizer, NAMES, cfg), tokenizer


def train_steps(model, optimizers, steps=3):
    g = torch.Generator().manual_seed(0)
    dtype = model.clip.logit_scale.dtype
    for _ in range(steps):
        images = torch.rand(6, 3, 16, 16, generator=g, dtype=dtype)
        labels = torch.randint(0, len(NAMES), (6,), generator=g)
        for optimizer in optimizers:
            optimizer.zero_grad()
        model.loss(images, labels).backward()
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_reprogrammer_text_features_equal_open_clip_at_init_and_after_training(variant, dtype):
    model, tokenizer = reprogrammer(variant, dtype)
    prompts = [model.template.format(c) for c in NAMES]
    assert model.text_length == expected_length(tokenizer, prompts, variant)
    with torch.no_grad():
        full = model.clip.encode_text(model.prompt_tokens, normalize=True)
        torch.testing.assert_close(model.zs_text_features, full, **TOLERANCE[dtype])
        torch.testing.assert_close(model.encode_text(), full, **TOLERANCE[dtype])
        positional_before = model.text_positional.detach().clone()

    train_steps(model, reprogrammer_optimizers(model))
    with torch.no_grad():
        # Weight decay moved every positional row, those past the cut too: they still cannot count.
        assert not torch.equal(model.text_positional[model.text_length:], positional_before[model.text_length:]) \
            or model.text_length == 77
        subset = torch.tensor([2, 0])
        torch.testing.assert_close(model.encode_text(), reprogrammer_oracle(model), **TOLERANCE[dtype])
        torch.testing.assert_close(model.encode_text(subset), reprogrammer_oracle(model, subset), **TOLERANCE[dtype])
        model.eval()
        torch.testing.assert_close(model.text_features(), reprogrammer_oracle(model), **TOLERANCE[dtype])


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_reprogrammer_gradients_equal_full_length_in_float64(variant):
    model, _ = reprogrammer(variant, torch.float64)
    train_steps(model, reprogrammer_optimizers(model), steps=1)  # away from the pretrained values
    weights = torch.randn(2, model.zs_text_features.shape[1], dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([2, 1])

    def gradients(features):
        model.token_rows.grad = model.text_positional.grad = None
        (features * weights).sum().backward()
        return model.token_rows.grad.clone(), model.text_positional.grad.clone()

    rows, positional = gradients(model.encode_text(classes))
    rows_full, positional_full = gradients(reprogrammer_oracle(model, classes))
    torch.testing.assert_close(rows, rows_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(positional, positional_full, rtol=0, atol=1e-12)
    assert rows.abs().sum() > 0 and positional[:model.text_length].abs().sum() > 0
    assert not positional[model.text_length:].any()  # exactly zero past the cut, as at full length


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_coop_features_and_gradients_equal_open_clip(variant, dtype):
    clip, tokenizer = tiny_text_variant(variant, dtype)
    n_ctx = 6
    model = CoOpClassifier(clip, tokenizer, NAMES, MethodConfig(name="coop", n_ctx=n_ctx, warmup_steps=1))
    # The context counts: "X X X X X X name." is the prompt.
    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in NAMES]
    assert model.text_length == expected_length(tokenizer, prompts, variant)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(), coop_oracle(model), **TOLERANCE[dtype])
    train_steps(model, model.make_optimizers(10)[0])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(), coop_oracle(model), **TOLERANCE[dtype])
    if dtype == torch.float64:
        weights = torch.randn(len(NAMES), model.encode_text().shape[1], dtype=dtype)
        grads = []
        for features in (model.encode_text, lambda: coop_oracle(model)):
            model.context.grad = None
            (features() * weights).sum().backward()
            grads.append(model.context.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_zero_shot_and_fine_tune_heads_start_at_open_clip_features(variant):
    clip, tokenizer = tiny_text_variant(variant, torch.float64)
    cfg = MethodConfig(name="zero-shot")
    tokens = tokenizer([cfg.template.format(c) for c in NAMES])
    expected = clip.encode_text(tokens, normalize=True).detach()
    scale = clip.logit_scale.exp().item()
    torch.testing.assert_close(zero_shot_text_features(clip, tokenizer, NAMES, cfg.template), expected,
                               rtol=0, atol=1e-12)
    for classifier in (ZeroShotClassifier(clip, tokenizer, NAMES, cfg),
                       FineTuneClassifier(clip, tokenizer, NAMES, MethodConfig(name="fine-tune"))):
        torch.testing.assert_close(classifier.head.weight.detach(), scale * expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_the_tower_runs_at_the_longest_prompt_rounded_up_to_eight(variant):
    model, tokenizer = reprogrammer(variant, torch.float32)
    every = expected_length(tokenizer, [model.template.format(c) for c in NAMES], variant)
    assert every == (32 if variant != "bidirectional" else 77)
    with LengthCounter(model.clip) as lengths:
        model.encode_text()
        train_steps(model, reprogrammer_optimizers(model), steps=1)  # the loss, on the batch's classes
        model.eval()
        with torch.no_grad():
            model(torch.rand(2, 3, 16, 16))
        zero_shot_text_features(model.clip, tokenizer, NAMES[:2], model.template)  # "cat", "Chesapeake ..."
    short = expected_length(tokenizer, [model.template.format(c) for c in NAMES[:2]], variant)
    assert short == (16 if variant != "bidirectional" else 77)
    assert lengths == [every, every, every, short]


def test_batch_classes_match_unique_padded_or_not():
    g = torch.Generator().manual_seed(0)
    for num_classes, n in [(10, 32), (100, 32), (1000, 7), (3, 3)]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        unique, inverse = torch.unique(labels, return_inverse=True)
        exact = batch_classes(labels, num_classes)
        assert torch.equal(exact[0], unique) and torch.equal(exact[1], inverse)
        classes, class_of_image = batch_classes(labels, num_classes, padded=True)
        assert len(classes) == min(n, num_classes) and len(set(classes.tolist())) == len(classes)
        assert torch.equal(classes[:len(unique)], unique) and torch.equal(class_of_image, inverse)
        # The padding rows are never read: the loss equals the one on the unique classes alone.
        texts = F.normalize(torch.randn(num_classes, 8, generator=g, dtype=torch.float64), dim=-1)
        images = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
        scale = torch.tensor(10.0, dtype=torch.float64)
        torch.testing.assert_close(contrastive_focal_loss(images, texts[classes], class_of_image, scale),
                                   contrastive_focal_loss(images, texts[unique], inverse, scale))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists on CUDA only")
def test_training_text_side_never_waits_for_the_device():
    model, _ = reprogrammer("clip", torch.float32)
    model = model.cuda()
    labels = torch.randint(0, len(NAMES), (6,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        classes, class_of_image = batch_classes(labels, len(NAMES))
        model.encode_text(classes)[class_of_image].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
