"""The methods of the paper's comparison behind one interface (`base.Classifier`)."""
from ..config import MethodConfig
from .base import Classifier, TrainingObjective
from .coop import build_coop
from .finetune import build_fine_tune, build_lp_ft, build_wise_ft
from .linear import build_linear_probe
from .reprogramming import build_reprogrammer, build_reprogrammer_image, build_reprogrammer_text
from .zero_shot import build_zero_shot

METHODS = {
    "reprogrammer": build_reprogrammer,
    "reprogrammer-image": build_reprogrammer_image,
    "reprogrammer-text": build_reprogrammer_text,
    "zero-shot": build_zero_shot,
    "linear-probe": build_linear_probe,
    "fine-tune": build_fine_tune,
    "lp-ft": build_lp_ft,
    "wise-ft": build_wise_ft,
    "coop": build_coop,
}


def build_method(clip, tokenizer, classnames, cfg: MethodConfig) -> Classifier:
    if cfg.name not in METHODS:
        raise ValueError(f"unknown method {cfg.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name](clip, tokenizer, classnames, cfg)


__all__ = ["Classifier", "MethodConfig", "TrainingObjective", "METHODS", "build_method"]
