"""Holistic evaluation (docs/method.md 5): ID accuracy, OOD generalisation, OOD detection, in one run.

Each dataset is encoded once per model. For Reprogrammer the reprogrammed and the zero-shot
image features are both kept, so every alpha of Residual Reprogrammer is one pass of the fused
`kernels.residual_scores` op over cached features (Triton on CUDA where the backend allows,
its reference elsewhere), not another encoder pass. The OOD scores of every model come from
their one definition, `kernels.ood_scores`, which that op computes too.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from .. import kernels
from ..constants import MCM_TEMPERATURE, RESIDUAL_ALPHA
from ..data.images import base_dataset
from ..data.loaders import eval_loader
from ..data.suites import EvalSets
from ..model import Reprogrammer
from ..runtime import autocast, to_device_images
from . import metrics

SCORES = ("mcm", "energy", "max_logit")


@dataclass
class EvalOptions:
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 256
    temperature: float = MCM_TEMPERATURE
    bootstrap: int = 0
    num_workers: Optional[int] = None
    progress: bool = True


def _batches(dataset, options: EvalOptions, what: str):
    loader = eval_loader(dataset, options.batch_size, options.device, num_workers=options.num_workers)
    bar = tqdm(loader, desc=f"  {what}: {getattr(dataset, 'name', 'data')}", unit="batch", leave=False,
               disable=not options.progress, dynamic_ncols=True)
    for images, labels, skipped in bar:
        if skipped:
            base_dataset(dataset).record_skipped(skipped)
        if not len(labels):
            continue
        bar.set_postfix(images=len(labels))
        yield to_device_images(images, options.device), labels


@torch.no_grad()
def encode(dataset, fn: Callable, options: EvalOptions, what: str) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """`fn(images)` (a tensor or tuple of tensors) over `dataset`, concatenated on the CPU in fp32."""
    outputs, labels = [], []
    for images, batch_labels in _batches(dataset, options, what):
        with autocast(options.device, options.precision):
            out = fn(images)
        out = out if isinstance(out, tuple) else (out,)
        outputs.append(tuple(o.float().cpu() for o in out))
        labels.append(batch_labels.numpy())
    return tuple(torch.cat(parts) for parts in zip(*outputs)), np.concatenate(labels)


def _score_temperature(classifier, options: EvalOptions) -> float:
    """MCM temperature on the classifier's logits: `T` on the cosine for CLIP-style logits."""
    if isinstance(classifier, Reprogrammer):
        return options.temperature * classifier.logit_scale.item()
    return classifier.score_temperature


def _score_arrays(scores: kernels.ResidualScores) -> dict[str, np.ndarray]:
    return {name: getattr(scores, name).cpu().numpy() for name in SCORES}


def summarise(logits: dict, scores: dict, labels: dict, sets: EvalSets, options: EvalOptions) -> dict:
    """Metrics of one model from its logits and OOD scores (`{score name: [N]}`) on every set."""
    test = logits["test"]
    top = metrics.topk_accuracy(test, labels["test"], k=(1, min(5, test.shape[1])))
    probs = torch.softmax(torch.as_tensor(test), -1).numpy()
    result = {"id_accuracy": top[1], "id_top5": top[min(5, test.shape[1])],
              "id_ece": metrics.expected_calibration_error(probs, labels["test"]),
              "ood_generalization": {}, "ood_generalization_subset": {}, "ood_detection": {},
              "ood_detection_by_score": {name: {} for name in SCORES if name != "mcm"}}
    for name, dataset in sets.covariate.items():
        result["ood_generalization"][name] = metrics.topk_accuracy(logits[name], labels[name], k=1)[1]
        subset = getattr(dataset, "class_indices", None)
        if subset is not None and 0 < len(subset) < test.shape[1]:
            sub_logits, sub_labels = metrics.restrict_to_classes(logits[name], labels[name], subset)
            result["ood_generalization_subset"][name] = metrics.topk_accuracy(sub_logits, sub_labels, k=1)[1]
    if sets.covariate:
        result["ood_generalization_mean"] = float(np.mean(list(result["ood_generalization"].values())))
    for score_name in SCORES:
        per_set = {name: metrics.ood_metrics(scores["test"][score_name], scores[name][score_name],
                                             bootstrap=options.bootstrap)
                   for name in sets.semantic}
        target = result["ood_detection"] if score_name == "mcm" else result["ood_detection_by_score"][score_name]
        target.update(per_set)
    if sets.semantic:
        result["ood_detection_mean"] = metrics.mean_ood_metrics(result["ood_detection"])
    return result


def _all_sets(sets: EvalSets):
    yield "test", sets.test
    yield from sets.covariate.items()
    yield from sets.semantic.items()


def evaluate_classifier(classifier, sets: EvalSets, options: EvalOptions, name: str) -> dict:
    """Metrics of a classifier whose `forward(images)` gives logits."""
    classifier.eval()
    temperature = _score_temperature(classifier, options)
    logits, scores, labels = {}, {}, {}
    for set_name, dataset in _all_sets(sets):
        (set_logits,), labels[set_name] = encode(dataset, classifier, options, name)
        scores[set_name] = _score_arrays(kernels.ood_scores(set_logits, temperature))
        logits[set_name] = set_logits.numpy()
    return summarise(logits, scores, labels, sets, options)


@dataclass
class ReprogrammerFeatures:
    """Cached features of a Reprogrammer on every set: enough for any alpha."""
    image_rp: dict
    image_zs: dict
    labels: dict
    text_rp: torch.Tensor
    text_zs: torch.Tensor
    logit_scale: float

    def logits(self, alpha: float) -> dict:
        return {name: kernels.residual_logits(self.image_rp[name], self.image_zs[name], self.text_rp, self.text_zs,
                                              alpha=alpha, logit_scale=self.logit_scale).numpy()
                for name in self.image_rp}

    def scored(self, alpha: float, temperature: float, device: torch.device) -> tuple[dict, dict]:
        """`(logits, OOD scores)` of every set at `alpha`, from one `residual_scores` pass per set
        on `device`; the scores are of the cosines at `temperature`."""
        text_rp, text_zs = self.text_rp.to(device), self.text_zs.to(device)
        logits, scores = {}, {}
        for name in self.image_rp:
            result = kernels.residual_scores(self.image_rp[name].to(device), self.image_zs[name].to(device),
                                             text_rp, text_zs, alpha=alpha, logit_scale=self.logit_scale,
                                             temperature=temperature, return_logits=True)
            logits[name] = result.logits.cpu().numpy()
            scores[name] = _score_arrays(result)
        return logits, scores


@torch.no_grad()
def reprogrammer_features(model: Reprogrammer, sets: EvalSets, options: EvalOptions) -> ReprogrammerFeatures:
    model.eval()
    image_rp, image_zs, labels = {}, {}, {}
    for set_name, dataset in _all_sets(sets):
        (image_rp[set_name], image_zs[set_name]), labels[set_name] = encode(
            dataset, model.image_feature_pair, options, "reprogrammer")
    with autocast(options.device, options.precision):
        text_rp = model.text_features()
    return ReprogrammerFeatures(image_rp, image_zs, labels, text_rp.float().cpu(),
                                model.zs_text_features.float().cpu(), model.logit_scale.item())


def alpha_sweep(features: ReprogrammerFeatures, sets: EvalSets, alphas, options: EvalOptions) -> list[dict]:
    """Residual Reprogrammer at each alpha, from the cached features (no encoder pass)."""
    rows = []
    for alpha in alphas:
        logits, scores = features.scored(alpha, options.temperature, options.device)
        result = summarise(logits, scores, features.labels, sets, options)
        rows.append({"alpha": float(alpha), **result})
    return rows


def evaluate_wise_ft(classifier, sets: EvalSets, alphas, options: EvalOptions) -> list[dict]:
    """WiSE-FT: one encoder pass per interpolation weight (the weights change)."""
    rows = []
    for alpha in alphas:
        classifier.set_wise_alpha(alpha)
        rows.append({"alpha": float(alpha), **evaluate_classifier(classifier, sets, options, f"wise-ft a={alpha}")})
    return rows


def dataset_line(name: str, result: dict) -> str:
    """One summary line of a method's results."""
    parts = [f"{name:>22}: ID acc {100 * result['id_accuracy']:5.1f}"]
    if "ood_generalization_mean" in result:
        parts.append(f"shift acc {100 * result['ood_generalization_mean']:5.1f}")
    if "ood_detection_mean" in result:
        mean = result["ood_detection_mean"]
        parts.append(f"FPR95 {100 * mean['fpr95']:5.1f}  AUROC {100 * mean['auroc']:5.1f}")
    return "  ".join(parts)


def pick_alpha(rows: list[dict], preferred: Optional[float]) -> dict:
    """The sweep row at `preferred` alpha (the configured one), else the closest."""
    target = RESIDUAL_ALPHA if preferred is None else preferred
    return min(rows, key=lambda row: abs(row["alpha"] - target))
