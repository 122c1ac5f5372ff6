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
