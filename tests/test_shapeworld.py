import re
import subprocess
import sys
import time

import numpy as np
import pytest
from matplotlib.path import Path
from PIL import Image

from reprogrammer.data import shapeworld as sw

POLYGONS = [name for name, f in sw.SHAPES.items() if hasattr(f, "keywords")]
ALL_DOMAINS = ["id", *sw.COVARIATE_DOMAINS, "pretrain"]


def _supersampled_points(resolution, centre, scale, angle, k=8):
    """Shape coordinates of a `k x k` grid of samples in every pixel, `[R, R, k*k, 2]`.

    The image -> shape map inverts "scale, rotate counter-clockwise, move to `centre`" with
    y pointing up in the shape and down in the image.
    """
    offsets = (np.arange(k) + 0.5) / k
    cols = (np.arange(resolution)[:, None] + offsets[None]).reshape(-1) / resolution
    px, py = np.meshgrid(cols, cols, indexing="xy")
    rel = np.stack([px - centre[0], centre[1] - py], -1) / scale
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    q = rel @ rot  # row vectors: q = rot.T @ rel, the inverse rotation
    q = q.reshape(resolution, k, resolution, k, 2).transpose(0, 2, 1, 3, 4)
    return q.reshape(resolution, resolution, k * k, 2)


def _foreground(images):
    """Per-pixel colour distance from the border's median colour: the shape, whatever its colour."""
    x = images.astype(np.float32) / 255
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], -1)
    return np.sqrt(((x - np.median(border, -1)[..., None, None]) ** 2).sum(1))


def _spectrum_features(images):
    """log |FFT| of the foreground map: blind to colour, polarity and position."""
    return np.log1p(np.abs(np.fft.rfft2(_foreground(images)))).reshape(len(images), -1)


def _nearest_centroid(train_x, train_y, test_x, k):
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(k)])
    return ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)


# --- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", POLYGONS)
def test_polygon_distance_matches_point_in_polygon_and_dense_boundary(name):
    vertices = sw.SHAPES[name].keywords["vertices"]
    rng = np.random.default_rng(7)
    p = rng.uniform(-1.3, 1.3, (401, 2))
    d = sw.SHAPES[name](p[:, 0], p[:, 1])
    inside = Path(vertices).contains_points(p)
    assert np.array_equal(d < 0, inside)
    closed = np.vstack([vertices, vertices[:1]])
    arc = np.r_[0, np.cumsum(np.hypot(*np.diff(closed, axis=0).T))]
    along = np.linspace(0, arc[-1], 5003)
    boundary = np.stack([np.interp(along, arc, closed[:, 0]), np.interp(along, arc, closed[:, 1])], 1)
    dense = np.sqrt(((p[:, None] - boundary[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(np.abs(d), dense, atol=2e-3)


def test_distance_shapes_match_their_defining_inequalities():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-1.3, 1.3, (2, 2003))
    r = np.hypot(x, y)
    assert np.array_equal(sw.SHAPES["circle"](x, y) < 0, r < 1)
    assert np.array_equal(sw.SHAPES["ring"](x, y) < 0, (r > 0.44) & (r < 1))
    assert np.array_equal(sw.SHAPES["crescent"](x, y) < 0, (r < 1) & (np.hypot(x - 0.45, y - 0.17) > 0.8))


@pytest.mark.parametrize("name", sw.SHAPE_NAMES)
def test_every_shape_just_fits_the_unit_disc(name):
    grid = np.linspace(-1.2, 1.2, 241)
    x, y = np.meshgrid(grid, grid)
    radius = np.hypot(x, y)[sw.SHAPES[name](x, y) < 0]
    assert 0.97 <= radius.max() <= 1.0 + 1e-9


# --- renderer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("outlined", [False, True])
def test_coverage_matches_supersampled_rasterisation(outlined):
    names = ["square", "star", "heart", "triangle", "arrow", "lightning bolt", "circle"]
    rng = np.random.default_rng(11)
    n, res = len(names), 29
    ids = np.array([sw.SHAPE_NAMES.index(s) for s in names])
    scales = rng.uniform(0.2, 0.44, n)
    centres = 0.5 + rng.uniform(-0.04, 0.04, (n, 2))
    angles = rng.uniform(-1, 1, n)
    got = sw.shape_coverage(ids, centres, scales, angles, np.full(n, outlined), res)
    half_stroke = sw.OUTLINE_WIDTH / 2  # fraction of the image side
    for i, name in enumerate(names):
        q = _supersampled_points(res, centres[i], scales[i], angles[i])
        d = sw.SHAPES[name](q[..., 0], q[..., 1]) * scales[i]  # fraction of the image side
        expected = ((np.abs(d) < half_stroke) if outlined else (d < 0)).mean(-1)
        err = np.abs(got[i] - expected)
        assert err.mean() < 0.015 and err.max() < 0.4, (name, err.mean(), err.max())


def test_coverage_areas_and_orientation_match_analytic_values():
    res, s = 64, 0.4
    names = ["circle", "square", "ring", "circle", "rectangle"]
    ids = np.array([sw.SHAPE_NAMES.index(x) for x in names])
    angle = np.deg2rad(30)
    cov = sw.shape_coverage(ids, np.full((5, 2), 0.5), np.full(5, s), np.array([0, 0.3, 0, 0, angle]),
                            np.array([False, False, False, True, False]), res)
    r = s * res
    stroke = sw.OUTLINE_WIDTH * res
    area = cov.sum((1, 2))
    np.testing.assert_allclose(area[:4], [np.pi * r ** 2, 2 * r ** 2, np.pi * (1 - 0.44 ** 2) * r ** 2,
                                          2 * np.pi * r * stroke], rtol=0.01)
    # Counter-clockwise with y up: the rectangle's long axis sits at +30 degrees.
    rows, cols = np.mgrid[:res, :res]
    x, y = cols + 0.5 - res / 2, res / 2 - rows - 0.5
    w = cov[4]
    sxx, syy, sxy = (w * x * x).sum(), (w * y * y).sum(), (w * x * y).sum()
    assert np.isclose(0.5 * np.arctan2(2 * sxy, sxx - syy), angle, atol=0.01)


def test_shapes_stay_inside_the_image():
    n = 600
    rng = np.random.default_rng(0)
    scene = sw._draw_scene(rng.integers(0, len(sw.SHAPE_NAMES), n), sw.DOMAINS["pretrain"], rng)
    scene.outlined[:] = rng.random(n) < 0.5
    cov = sw.shape_coverage(scene.shape, scene.centre, scene.scale, scene.angle, scene.outlined, 32)
    edge = np.concatenate([cov[:, 0], cov[:, -1], cov[:, :, 0], cov[:, :, -1]], 1)
    assert edge.max() < 0.05


# --- determinism and outputs ---------------------------------------------------------------------

@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_render_is_a_pure_function_of_the_seed(domain):
    a = sw.render(sw.SHAPE_NAMES, 37, seed=5, domain=domain)
    b = sw.render(sw.SHAPE_NAMES, 37, seed=5, domain=domain)
    c = sw.render(sw.SHAPE_NAMES, 37, seed=6, domain=domain)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert (a[0] != c[0]).mean() > 0.5


def test_pretraining_pairs_are_a_pure_function_of_the_seed():
    p, q = sw.pretraining_pairs(41, 3), sw.pretraining_pairs(41, 3)
    assert p[0].tobytes() == q[0].tobytes() and p[2] == q[2]
    assert sw.pretraining_pairs(41, 4)[0].tobytes() != p[0].tobytes()


@pytest.mark.parametrize("resolution", [32, 64, 23])
@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_outputs_have_the_documented_shapes_types_and_balance(resolution, domain):
    classes = sw.ID_CLASSES[:7]
    images, labels, captions = sw.render(classes, 45, 1, resolution, domain)
    assert images.dtype == np.uint8 and images.shape == (45, 3, resolution, resolution)
    assert labels.dtype == np.int64 and labels.shape == (45,)
    counts = np.bincount(labels, minlength=len(classes))
    assert len(counts) == len(classes) and counts.max() - counts.min() <= 1
    assert len(captions) == 45 and all(isinstance(c, str) for c in captions)
    per_image_range = images.reshape(45, -1).max(1).astype(int) - images.reshape(45, -1).min(1)
    assert per_image_range.min() > 60  # every image shows something, none is flat
    images, labels, captions = sw.pretraining_pairs(45, 1, resolution)
    assert images.shape == (45, 3, resolution, resolution) and labels.dtype == np.int64
    assert labels.min() >= -1 and labels.max() < len(sw.SHAPE_NAMES) and len(captions) == 45
    textures, names = sw.render_textures(13, 1, resolution)
    assert textures.shape == (13, 3, resolution, resolution) and len(names) == 13


def test_palette_and_shape_table_are_as_large_as_promised():
    assert len(sw.SHAPE_NAMES) >= 20 and len(sw.COLOURS) >= 10 and len(sw.BACKGROUNDS) == 5
    assert set(sw.SIZE_NAMES) == {"small", "medium", "large"}


# --- captions ------------------------------------------------------------------------------------

def _shapes_named(caption):
    return [s for s in sw.SHAPE_NAMES if re.search(rf"\b{s}\b", caption)]


def test_captions_name_exactly_the_rendered_shape():
    _, labels, captions = sw.render(sw.SHAPE_NAMES, 96, 2, domain="pretrain")
    for label, caption in zip(labels, captions):
        assert _shapes_named(caption) == [sw.SHAPE_NAMES[label]], caption
    _, labels, captions = sw.pretraining_pairs(600, 2)
    for label, caption in zip(labels, captions):
        if label < 0:
            assert not _shapes_named(caption) and re.search(r"(pattern|texture)$", caption), caption
        else:
            assert _shapes_named(caption) == [sw.SHAPE_NAMES[label]], caption
    assert (labels < 0).any()
    # The downstream prompt itself is among the pretraining captions, phrasing varies otherwise.
    assert sum(c == f"a photo of {sw._a(sw.SHAPE_NAMES[y])}" for c, y in zip(captions, labels) if y >= 0) > 60
    assert len({c.split(" ")[1] for c in captions}) >= 4


def test_caption_colour_is_the_ink_colour():
    images, _, captions = sw.render(sw.ID_CLASSES, 60, 9, domain="texture")
    for image, caption in zip(images, captions):
        colour = [c for c in sw.COLOURS if re.search(rf"\b{c}\b", caption)]
        assert len(colour) == 1, caption
        ink = np.round(np.array(sw.COLOURS[colour[0]]) * 255)
        assert np.abs(image.reshape(3, -1).T - ink).max(1).min() <= 1, caption


# --- the benchmark's properties ------------------------------------------------------------------

def test_id_classes_are_separable_by_a_simple_classifier():
    x_train, y_train, _ = sw.render(sw.ID_CLASSES, 1500, 21)
    x_test, y_test, _ = sw.render(sw.ID_CLASSES, 700, 22)
    f_train, f_test = _spectrum_features(x_train), _spectrum_features(x_test)
    accuracy = (_nearest_centroid(f_train, y_train, f_test, 10) == y_test).mean()
    shuffled = np.random.default_rng(0).permutation(y_train)
    control = (_nearest_centroid(f_train, shuffled, f_test, 10) == y_test).mean()
    assert accuracy > 0.5 and control < 0.2, (accuracy, control)


def _pixel_statistics(images):
    x = images.astype(np.float32) / 255
    luma = x.mean(1)
    return np.stack([luma.mean((1, 2)), luma.std((1, 2)), np.abs(np.diff(luma, axis=-1)).mean((1, 2)),
                     x.std(1).mean((1, 2))], 1)


def _largest_effect(a, b):
    """Largest standardised mean difference over the statistics."""
    sa, sb = _pixel_statistics(a), _pixel_statistics(b)
    pooled = np.sqrt((sa.var(0) + sb.var(0)) / 2)
    return (np.abs(sa.mean(0) - sb.mean(0)) / pooled).max()


@pytest.mark.parametrize("domain", sw.COVARIATE_DOMAINS)
def test_covariate_shift_changes_pixels_but_keeps_the_classes(domain):
    reference, _, _ = sw.render(sw.ID_CLASSES, 600, 31)
    other_id, _, _ = sw.render(sw.ID_CLASSES, 600, 32)
    shifted, y_shift, _ = sw.render(sw.ID_CLASSES, 600, 33, domain=domain)
    assert _largest_effect(reference, other_id) < 0.25
    assert _largest_effect(reference, shifted) > 1.0
    # Still the same ten shapes: a classifier fitted within the shifted domain tells them apart.
    train, y_train, _ = sw.render(sw.ID_CLASSES, 1500, 34, domain=domain)
    predicted = _nearest_centroid(_spectrum_features(train), y_train, _spectrum_features(shifted), 10)
    assert set(y_shift) == set(range(10)) and (predicted == y_shift).mean() > 0.4


def test_semantic_sets_hold_no_id_class():
    assert not set(sw.OOD_CLASSES) & set(sw.ID_CLASSES)
    assert set(sw.OOD_CLASSES) | set(sw.ID_CLASSES) == set(sw.SHAPE_NAMES) and len(sw.ID_CLASSES) == 10
    bench = sw.downstream_benchmark(seed=4, n_train=10, n_val=10, n_test=600, n_shift=10, n_ood=600)
    # A 24-way classifier trained on known renders calls far fewer of the OOD images an ID class.
    x, y, _ = sw.render(sw.SHAPE_NAMES, 3000, 41)
    features = _spectrum_features(x)
    is_id = np.isin(np.array(sw.SHAPE_NAMES), sw.ID_CLASSES)

    def id_rate(images):
        return is_id[_nearest_centroid(features, y, _spectrum_features(images), len(sw.SHAPE_NAMES))].mean()

    assert id_rate(bench["semantic"]["shapes"]) < id_rate(bench["test"][0]) - 0.3
    # Textures have no object, so nothing stands out from the background pattern.
    assert _foreground(bench["semantic"]["textures"]).max((1, 2)).mean() < \
        _foreground(bench["test"][0]).max((1, 2)).mean() - 0.2


def test_benchmark_is_deterministic_with_disjoint_splits():
    sizes = dict(n_train=23, n_val=11, n_test=13, n_shift=17, n_ood=19)
    a = sw.downstream_benchmark(seed=8, **sizes)
    b = sw.downstream_benchmark(seed=8, **sizes)
    c = sw.downstream_benchmark(seed=9, **sizes)
    assert a["classnames"] == list(sw.ID_CLASSES)
    for split, n in [("train", 23), ("val", 11), ("test", 13)]:
        assert a[split][0].shape == (n, 3, 32, 32) and a[split][1].shape == (n,)
        assert a[split][0].tobytes() == b[split][0].tobytes() != c[split][0].tobytes()
    assert set(a["covariate"]) == set(sw.COVARIATE_DOMAINS) and len(a["covariate"]) >= 2
    for images, labels in a["covariate"].values():
        assert images.shape == (17, 3, 32, 32) and labels.max() < 10
    assert set(a["semantic"]) == {"shapes", "textures"}
    assert all(images.shape == (19, 3, 32, 32) for images in a["semantic"].values())
    seen = [{im.tobytes() for im in a[split][0]} for split in ("train", "val", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown shape classes.*'blob'"):
        sw.render(["circle", "blob"], 4, 0)
    with pytest.raises(ValueError, match="unknown domain 'photo'"):
        sw.render(["circle"], 4, 0, domain="photo")
    with pytest.raises(ValueError, match="resolution must be >= 16"):
        sw.pretraining_pairs(4, 0, resolution=8)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sw.render_textures(-1, 0)


def test_contact_sheet_places_each_image_in_its_cell():
    images = np.random.default_rng(1).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    sheet = sw.contact_sheet(images, columns=3, gap=2)
    assert sheet.shape == (3 * 7 - 2, 3 * 6 - 2, 3)
    for i, image in enumerate(images):
        r, c = divmod(i, 3)
        assert np.array_equal(sheet[7 * r:7 * r + 5, 6 * c:6 * c + 4], image.transpose(1, 2, 0))
    assert (sheet[14:, 6:] == 255).all()  # the two empty cells of the last row stay white
    assert sw.sample_sheet(seed=1).shape == (7 * 34 - 2, 20 * 34 - 2, 3)


def test_module_command_writes_the_magnified_sheet(tmp_path):
    out = tmp_path / "sheet.png"
    done = subprocess.run([sys.executable, "-m", "reprogrammer.shapeworld", str(out), "16"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    sheet = np.asarray(Image.open(out))
    expected = sw.sample_sheet(resolution=16)
    assert sheet.shape == (3 * expected.shape[0], 3 * expected.shape[1], 3)
    assert np.array_equal(sheet[::3, ::3], expected)
    wrong = subprocess.run([sys.executable, "-m", "reprogrammer.shapeworld"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage: python -m reprogrammer.shapeworld OUT.png" in wrong.stderr


def test_render_speed_report():
    start = time.perf_counter()
    images, _, _ = sw.render(sw.ID_CLASSES, 20000, 0)
    elapsed = time.perf_counter() - start
    print(f"\nshapeworld: 20000 images of 32x32 in {elapsed:.2f} s")
    assert images.shape == (20000, 3, 32, 32)


@pytest.mark.parametrize("domain", ["sketch", "corrupted"])
def test_outlined_and_blurred_shapes_are_also_captioned_with_the_class_prompt(domain):
    # This pairing is what teaches the zero-shot prompt "a photo of a {shape}" the shifted domains.
    rng = np.random.default_rng(4)
    scene = sw._draw_scene(np.arange(400) % len(sw.SHAPE_NAMES), sw.DOMAINS[domain], rng)
    assert scene.outlined.all() if domain == "sketch" else scene.corrupted.all()
    captions = sw._varied_captions(scene, rng)
    bare = np.mean([c == f"a photo of {sw._a(sw.SHAPE_NAMES[s])}" for c, s in zip(captions, scene.shape)])
    assert abs(bare - sw.BARE_PROMPT_FRACTION) < 0.07, bare
    if domain == "sketch":
        assert any(c.startswith("a sketch of a") for c in captions)
        assert any(c.startswith("a drawing of a") for c in captions)
