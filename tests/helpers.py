"""Small models shared by the tests."""
import warnings

import torch

from reprogrammer import Reprogrammer, load_clip

CLASSNAMES = ["cat", "dog", "airplane", "red star", "ship"]


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip("RP-ViT-Tiny")


def tiny_reprogrammer(seed: int = 0, **kwargs):
    clip, tokenizer = tiny_clip(seed)
    kwargs.setdefault("up_resolution", 20)
    kwargs.setdefault("mr_resolution", 11)
    return Reprogrammer(clip, tokenizer, CLASSNAMES, **kwargs)


#: Text-tower variants the toolkit supports, as tiny open_clip models with CLIP's real 77-token
#: context: `clip` (open_clip CLIP, EOT by argmax, projection matrix), `custom` (CustomTextCLIP
#: with a TextTransformer, EOT by id, biased linear projection) and `bidirectional` (a
#: TextTransformer without a causal mask, where every position counts).
TEXT_VARIANTS = ("clip", "custom", "bidirectional")


def tiny_text_variant(variant: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """`(model, tokenizer)`: a tiny ViT CLIP of `variant` (see TEXT_VARIANTS), in eval mode."""
    from open_clip import get_tokenizer
    from open_clip.model import CLIP, CustomTextCLIP

    tokenizer = get_tokenizer("ViT-B-32")
    vision = dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2, mlp_ratio=2)
    if variant != "clip":
        text.update(pool_type="eos", eos_id=tokenizer.eot_token_id, proj_bias=True,
                    no_causal_mask=variant == "bidirectional")
    torch.manual_seed(seed)
    model = (CLIP if variant == "clip" else CustomTextCLIP)(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return model.to(dtype).eval(), tokenizer
