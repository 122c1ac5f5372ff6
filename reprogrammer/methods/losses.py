"""The paper's loss (docs/method.md section 3): a two-direction contrastive focal loss."""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: float = 4.0,
               eps: float = 1e-7) -> torch.Tensor:
    """`mean_b sum_c (onehot_c + eps) * (-alpha * (1 - p_c)^gamma * log p_c)`, `p = softmax(logits)`.

    The `eps` term keeps every class in the sum, as the authors' implementation does. Classes lie
    on the last dimension of `logits`; the mean runs over all the others (`target` has their shape).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    onehot = F.one_hot(target, logits.shape[-1]).to(log_p.dtype)
    per_class = -alpha * (1 - log_p.exp()).pow(gamma) * log_p
    return ((onehot + eps) * per_class).sum(-1).mean()


def contrastive_focal_loss(image_features: torch.Tensor, class_text_features: torch.Tensor,
                           class_of_image: torch.Tensor, logit_scale: torch.Tensor, **focal) -> torch.Tensor:
    """Mean of the image->text and text->image focal losses over an `N x N` batch.

    The text of image `i` is row `class_of_image[i]` of `class_text_features` (the features of the
    batch's unique prompts), so the `N` texts are gathered instead of encoded `N` times; the
    value and gradients equal encoding all `N` prompts. Two images of one class are negatives
    of each other, as in the paper's loss.
    """
    texts = class_text_features[class_of_image]
    image_logits = logit_scale * image_features @ texts.T
    target = torch.arange(image_logits.shape[0], device=image_logits.device)
    return 0.5 * (focal_loss(image_logits, target, **focal) + focal_loss(image_logits.T, target, **focal))


def batch_classes(labels: torch.Tensor, num_classes: int, *, padded: Optional[bool] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(classes, class_of_image)`: the classes present in `labels`, ascending, and each label's row
    in them (`classes[class_of_image] == labels`), as `torch.unique(labels, return_inverse=True)`.

    How many classes a batch holds is data, and a tensor shaped by it needs that count on the host:
    on an accelerator a sync per step that drains the queue of launched work, and a new text-tower
    shape per step (a recompile, no CUDA graph). `padded` (the default off the CPU) keeps the shape
    fixed at `min(N, num_classes)` instead, filling the rows after the present classes with absent
    ones, which the loss never reads (zero gradient); on the CPU the count costs nothing.
    """
    padded = labels.device.type != "cpu" if padded is None else padded
    present = torch.zeros(num_classes, dtype=torch.bool, device=labels.device).index_fill_(0, labels, True)
    size = min(len(labels), num_classes) if padded else int(present.sum())
    classes = torch.argsort((~present).to(torch.uint8), stable=True)[:size]  # present ones first
    return classes, present.cumsum(0)[labels] - 1


def gather_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole global batch on every rank, features keeping their gradient.

    A contrastive loss over the gathered batch, averaged by DDP, has exactly the gradient of the
    single-process loss over the same global batch (the all-gather's backward sums the ranks'
    gradients of each shard).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    from torch.distributed._functional_collectives import all_gather_tensor, all_gather_tensor_autograd

    # The autograd variant's backward is a reduce-scatter (sum); labels need no gradient.
    group = dist.group.WORLD
    return all_gather_tensor_autograd(features, 0, group), all_gather_tensor(labels, 0, group)
