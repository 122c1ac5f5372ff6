"""How far a method moved the image features away from the frozen encoder's: the mechanism behind
the paper's claim that fine-tuning distorts pretrained features and reprogramming keeps them.

For every image, the cosine between the method's image feature and the frozen CLIP's (zero-shot)
feature of the same image; the report gives its mean per set. 1.0 means the features did not move.
"""
import torch
import torch.nn.functional as F

from ..constants import RESIDUAL_ALPHA
from ..methods.finetune import WiseFTClassifier
from ..methods.linear import LinearHeadClassifier
from ..model import Reprogrammer
from .evaluate import EvalOptions, encode


def _feature_functions(classifier, wise_alpha: float, residual_alpha: float) -> dict:
    """`{report name: images -> (method features, zero-shot features)}`, both L2-normalised."""
    if isinstance(classifier, Reprogrammer):
        def reprogrammed(images):
            rp = F.normalize(classifier.image_features(images), dim=-1)
            zs = F.normalize(classifier.zero_shot_image_features(images), dim=-1)
            # Residual Reprogrammer's image side: the blend its logits are taken from (kernels.blend).
            residual = (1 - residual_alpha) * rp + residual_alpha * zs
            return rp, F.normalize(residual, dim=-1)

        return {"reprogrammer": (reprogrammed, 0), "residual-reprogrammer": (reprogrammed, 1)}
    if isinstance(classifier, WiseFTClassifier):
        classifier.set_wise_alpha(wise_alpha)
    if isinstance(classifier, LinearHeadClassifier):
        return {classifier.method: (lambda images: (F.normalize(classifier.image_tower(images), dim=-1),), 0)}
    raise TypeError(f"no feature-drift diagnostic for {type(classifier).__name__}")


def feature_drift(classifier, reference_features: dict, sets: dict, options: EvalOptions, *,
                  wise_alpha: float = 0.5, residual_alpha: float = RESIDUAL_ALPHA) -> dict:
    """`{report name: {set: mean cosine to the frozen features, "mean": over the sets}}`.

    `reference_features` maps each set name to the frozen encoder's L2-normalised features of
    `sets[name]`, in the same order; WiSE-FT is measured at `wise_alpha` (and left there).
    """
    classifier.eval()
    functions = _feature_functions(classifier, wise_alpha, residual_alpha)
    out = {}
    for name, dataset in sets.items():
        cached = {}
        for report_name, (fn, index) in functions.items():
            if fn not in cached:
                cached[fn] = encode(dataset, fn, options, f"drift {report_name}")[0]
            features = cached[fn][index]
            cosine = (features * reference_features[name]).sum(-1).mean().item()
            out.setdefault(report_name, {})[name] = cosine
    for per_set in out.values():
        per_set["mean"] = float(torch.tensor(list(per_set.values())).mean())
    return out


def frozen_features(zero_shot_classifier: LinearHeadClassifier, sets: dict, options: EvalOptions) -> dict:
    """The frozen CLIP's L2-normalised image features of every set, `{set: [N, D]}`."""
    zero_shot_classifier.eval()
    fn = lambda images: F.normalize(zero_shot_classifier.image_tower(images), dim=-1)  # noqa: E731
    return {name: encode(dataset, fn, options, "frozen features")[0][0] for name, dataset in sets.items()}
