"""The public Python API end to end: `reprogrammer.train` a tiny run, then `reprogrammer.load_run`
gives back the classifier that training left in memory, at the run's residual alpha."""
import numpy as np
import pytest
import torch
from PIL import Image

import reprogrammer
from reprogrammer.training import engine

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _image_folder(root, n_per_class=8):
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`(run_dir, the classifier object the engine trained)`."""
    base = tmp_path_factory.mktemp("api")
    built = []

    def recording(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    build = engine.build_method
    overrides = ["model.name=RP-ViT-Tiny", "model.pretrained=null", "data.dataset=imagefolder",
                 f"data.root={_image_folder(base / 'images')}", "data.val_size=6", "data.num_workers=0",
                 "method.up_resolution=20", "method.mr_resolution=11", "method.warmup_steps=1",
                 "method.alpha=0.3", "train.batch_size=6", "train.epochs=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "build_method", recording)
        summary = reprogrammer.train(None, base / "run", overrides=overrides, progress=False)
    assert summary["steps"] == 6 and len(built) == 1
    return base / "run", built[0]


def _logits(classifier, alpha):
    classifier.eval()
    classifier.alpha = alpha
    images = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return classifier(images)


def test_load_run_round_trip_equals_the_trained_model_at_the_runs_alpha(trained):
    run_dir, in_memory = trained
    loaded, cfg, meta = reprogrammer.load_run(run_dir, "latest")
    assert loaded.alpha == 0.3 == cfg.method.alpha and meta["classnames"] == sorted(COLOURS)
    expected = _logits(in_memory, 0.3)
    torch.testing.assert_close(_logits(loaded, loaded.alpha), expected, rtol=0, atol=1e-6)
    plain, _, _ = reprogrammer.load_run(run_dir, "latest", alpha=0.0)  # plain Reprogrammer when asked
    assert plain.alpha == 0.0
    torch.testing.assert_close(_logits(plain, 0.0), _logits(in_memory, 0.0), rtol=0, atol=1e-6)
    assert (_logits(plain, 0.0) - expected).abs().max() > 1e-3  # the alpha really changes the logits
