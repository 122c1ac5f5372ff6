"""The metadata an exported classifier carries in its ONNX `metadata_props` (string -> string).

Strings are stored as they are, everything else as JSON, so a model viewer shows readable values;
`decode` turns the typed keys back into Python values. Pure Python: the predict path reads it
without torch.
"""
import json
from collections.abc import Mapping

CLASSNAMES = "classnames"
ALPHA = "alpha"
TEMPLATE = "template"
IMAGE_RESOLUTION = "image_resolution"
UP_RESOLUTION = "up_resolution"
CANVAS = "canvas"
LOGIT_SCALE = "logit_scale"
PRECISION = "precision"
OOD_TEMPERATURE = "ood_temperature"
OOD_THRESHOLD = "ood_threshold"
MODEL_NAME = "model_name"
PRETRAINED = "pretrained"

# Keys the exporter derives from the model itself; user metadata may not override them.
DERIVED = frozenset({CLASSNAMES, ALPHA, TEMPLATE, IMAGE_RESOLUTION, UP_RESOLUTION, CANVAS, LOGIT_SCALE,
                     PRECISION, OOD_TEMPERATURE, OOD_THRESHOLD})
_TYPED = frozenset({CLASSNAMES, ALPHA, IMAGE_RESOLUTION, UP_RESOLUTION, CANVAS, LOGIT_SCALE,
                    OOD_TEMPERATURE, OOD_THRESHOLD})


def encode(entries: Mapping[str, object]) -> dict[str, str]:
    """`{key: value}` -> `{key: text}`: strings unchanged, other values as JSON."""
    out = {}
    for key, value in entries.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metadata keys must be non-empty strings, got {key!r}")
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def decode(props: Mapping[str, str]) -> dict[str, object]:
    """Inverse of `encode` for the typed keys; other entries stay strings."""
    return {key: json.loads(text) if key in _TYPED else text for key, text in props.items()}
