"""Shared fixtures: a generated textured-part dataset and a tiny bundle trained on it.

Self-contained (no ../shared): the images come from inspectd.engines.synthetic, the backbone
weights from the installed efficientnet-lite0 weights package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inspectd.engines.synthetic import SyntheticSet, make_dataset

TINY_IMAGE_SIZE = 128
CAMERA_FRAME_SIZE = 400  # viky.cti's simulated cameras: 400x400


@pytest.fixture()
def one_torch_thread():
    """The test runs on one intra-op PyTorch thread (inspectd.engines.fitting.one_thread, which
    restores the count after it), as the trained fixtures below do.

    On the 2-core CI machines eager PyTorch on two threads slows down many times over as soon as
    anything else takes a core, and gains little when the machine is quiet; the tiny bundles score
    the same either way. Default-thread training stays covered where a user's command runs whole
    (tests/test_demo.py, the seed test of tests/engines/test_train_cli.py)."""
    from inspectd.engines.fitting import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def synthetic_parts(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    """train_good/ (40), test_good/ (12), test_bad/ (12: scratches, spots, chips) + masks/, 128x128 grey PNGs."""
    return make_dataset(tmp_path_factory.mktemp("parts"), n_train=40, n_test_good=12, n_test_bad=12,
                        size=TINY_IMAGE_SIZE, seed=0)


def _train_tiny(parts: SyntheticSet, out: Path) -> Path:
    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.train import AUGMENTATIONS, TrainConfig, train

    # 4 coupling steps and augmentation on: a small, fast bundle that still runs the augmented path.
    cfg = TrainConfig(model=ModelConfig(image_height=TINY_IMAGE_SIZE, image_width=TINY_IMAGE_SIZE, taps=[4, 10],
                                        steps=4),
                      epochs=12, augment=list(AUGMENTATIONS), views=2, seed=0, select=False)
    with one_thread():  # see one_torch_thread
        train(parts.train_good, out, cfg, golden_bad_dir=parts.test_bad)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_parts: SyntheticSet) -> Path:
    """A real bundle (Lite0 taps 4+10, 128 px grey, 64x64... map 32x32) trained for a few seconds.

    Golden images: 4 held-out good + 4 bad. Treat it as read-only; copy it to modify it.
    """
    return _train_tiny(synthetic_parts, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def camera_sized_parts(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    """Synthetic parts at the GenTL simulator camera's frame size (400x400): a bundle learns the size of
    the frames it is trained on and refuses others, so bundles for the camera tests train on these."""
    return make_dataset(tmp_path_factory.mktemp("camera-parts"), n_train=24, n_test_good=0, n_test_bad=4,
                        size=CAMERA_FRAME_SIZE, seed=3)


@pytest.fixture(scope="session")
def tiny_camera_bundle(tmp_path_factory: pytest.TempPathFactory, camera_sized_parts: SyntheticSet) -> Path:
    """tiny_bundle's design, trained on 400x400 frames (what the GenTL simulator camera delivers)."""
    return _train_tiny(camera_sized_parts, tmp_path_factory.mktemp("bundle") / "tiny-camera")


# Small, fast trainings of every method besides the flow (its tiny bundle is above): options sized
# for the 128 px synthetic parts so each trains in seconds on 2 cores.
TINY_METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "cutpaste-ae": {"epochs": "40", "classifier_epochs": "40"},  # 36 tiles, ~10 s
    "inpaint": {"epochs": "10", "size": "64"},                   # 160 steps at 64 px, ~15-40 s
    "vae": {"epochs": "20", "size": "64", "width": "8"},         # 320 steps at 64 px, ~12 s
    "classifier": {"epochs": "4"},                               # 4 x 27 steps on cached features, ~10 s
}


@pytest.fixture(scope="session")
def default_architecture_bundle(tmp_path_factory: pytest.TempPathFactory, camera_sized_parts: SyntheticSet) -> Path:
    """A bundle of the product's default architecture (what `inspectd train` builds with no flags: three
    flows at 384x384), trained for one epoch on the camera-sized synthetic parts: for tests of behaviour
    that depends on the size of the engine (its operators, its threads), not on its accuracy."""
    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.model_config import METHOD_SHORT_SIDE
    from inspectd.engines.train import TrainConfig, train

    out = tmp_path_factory.mktemp("bundle") / "default-architecture"
    side = METHOD_SHORT_SIDE["flow"]
    cfg = TrainConfig(model=ModelConfig(image_height=side, image_width=side), epochs=1, seed=0, select=False)
    with one_thread():  # see one_torch_thread
        train(camera_sized_parts.train_good, out, cfg, golden_bad_dir=camera_sized_parts.test_bad)
    return out


@pytest.fixture(scope="session")
def other_defects(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    """Defective parts of another seed (test_bad: 12): what the methods that learn from defects
    train on, so every shared check scores them on synthetic_parts' defects, never seen."""
    return make_dataset(tmp_path_factory.mktemp("other-defects"), n_train=0, n_test_good=0, n_test_bad=12,
                        size=TINY_IMAGE_SIZE, seed=21)


@pytest.fixture(scope="session")
def tiny_method_bundles(tmp_path_factory: pytest.TempPathFactory, synthetic_parts: SyntheticSet,
                        other_defects: SyntheticSet):
    """method name -> a real tiny bundle of that method, trained once per session on first use."""
    from inspectd.engines import methods
    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.train import TrainConfig, train

    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp("bundle") / method
            cfg = TrainConfig(model=ModelConfig(image_height=TINY_IMAGE_SIZE, image_width=TINY_IMAGE_SIZE, taps=[4, 10]),
                              method=method, options=dict(TINY_METHOD_OPTIONS[method]), seed=0, select=False,
                              bad=str(other_defects.test_bad) if getattr(methods.get(method), "needs_defects", False)
                              else None)
            with one_thread():  # see one_torch_thread
                train(synthetic_parts.train_good, out, cfg, golden_bad_dir=synthetic_parts.test_bad)
            made[method] = out
        return made[method]

    return get


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path):
    """A real 64 KiB tmpfs (fills after a few records); skipped where mounting is not permitted."""
    from tests.helpers import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "archive", "64k") as mnt:
        yield mnt
