"""What every method of the comparison provides to the training engine and the evaluator.

A method builds a `Classifier`: an `nn.Module` whose `forward(images)` maps float images in
[0, 1] (`[B, 3, h, w]`) to logits `[B, C]`, plus what training needs. The engine never looks
inside: it calls `loss`, steps the optimisers and schedulers the method made, and saves
`learned_state()`.
"""
import torch
import torch.nn as nn

from ..config import MethodConfig


class Classifier(nn.Module):
    """Interface of a trainable classifier; see the module docstring."""

    #: `max softmax(logits / score_temperature)` is the MCM/MSP OOD score of these logits.
    score_temperature: float = 1.0
    #: Default number of epochs of the authors' recipe for this method.
    default_epochs: int = 25
    #: False for methods with nothing to train (zero-shot).
    trainable: bool = True

    def frozen_towers(self) -> list:
        """Frozen encoder blocks that `train.compile: model` hands to torch.compile."""
        return []

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_optimizers(self, total_steps: int) -> tuple[list, list]:
        """`(optimizers, schedulers)`; schedulers step once per optimiser step."""
        raise NotImplementedError

    def learned_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class TrainingObjective(nn.Module):
    """`forward(images, labels) -> loss`, so that DDP sees the loss computation as the forward pass."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images, labels):
        return self.classifier.loss(images, labels)
