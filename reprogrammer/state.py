"""Loading a classifier's learned tensors with the checks that name what does not fit."""
import torch


@torch.no_grad()
def load_checked(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], method: str) -> None:
    """Copy `state` into the tensors `targets` after checking that keys and shapes match."""
    if set(state) != set(targets):
        missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        raise ValueError(
            f"checkpoint does not fit a {method} classifier: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it saved by another method or another architecture?)"
        )
    for key, target in targets.items():
        if state[key].shape != target.shape:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}: "
                "it was trained for another architecture or class set"
            )
    for key, target in targets.items():
        target.copy_(state[key])
