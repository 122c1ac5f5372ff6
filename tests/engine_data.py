"""A small learnable dataset for engine tests: class = dominant colour channel pattern."""
import torch

from reprogrammer.data import ArrayImageDataset
from reprogrammer.data.suites import TrainData

CLASSNAMES = ["red", "green", "blue", "grey"]


def colour_dataset(n: int, seed: int, size: int = 12) -> ArrayImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSNAMES)
    images = torch.randint(0, 90, (n, 3, size, size), generator=g)
    for c in range(3):
        images[labels == c, c] += 150
    images[labels == 3] += 100
    hwc = images.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ArrayImageDataset(f"colours-{seed}", hwc, labels.numpy(), CLASSNAMES)


def train_data(n_train: int = 48, n_val: int = 16) -> TrainData:
    return TrainData(colour_dataset(n_train, 0), colour_dataset(n_val, 1), CLASSNAMES)
