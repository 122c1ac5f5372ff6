"""The built-in world: a procedural image-caption generator, the pretraining of the toolkit's small
CLIP on it (and the weights shipped from it), and the demo that runs the paper's comparison
offline. Not on the library's core path."""
