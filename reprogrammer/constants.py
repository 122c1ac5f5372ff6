"""Numbers the method fixes (docs/method.md), named once for every module that uses them."""

# CLIP's image normalisation (used when an open_clip model carries no preprocessing config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The one prompt template of the paper (no trailing period).
DEFAULT_TEMPLATE = "a photo of a {}"

# MCM / MSP temperature on cosine similarities: max softmax(cos / 0.01), the authors' fixed x100.
MCM_TEMPERATURE = 0.01

# Residual Reprogrammer's weight of the zero-shot features, the paper's setting: the default of
# `method.alpha`, of evaluation's residual row and of the benchmarks (0 is plain Reprogrammer).
RESIDUAL_ALPHA = 0.4
