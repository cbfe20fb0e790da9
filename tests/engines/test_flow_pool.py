"""ModelConfig.pool "avgmax": the finer taps reach the fused grid by each block's mean and its maximum,
so a response smaller than the block keeps its height. The ImageNet backbone, as in training."""

from __future__ import annotations

import pytest
import torch

from inspectd.engines.methods.flow import block_max, build_model
from inspectd.engines.model import resample_grid
from inspectd.engines.model_config import ModelConfig


def test_a_one_cell_spike_survives_the_block_maximum_and_is_diluted_by_the_mean() -> None:
    f = torch.zeros(1, 2, 16, 16)
    f[0, 1, 5, 6] = 8.0  # one stride-8 cell of a tap, inside the 4x4 block (1, 1) of a 4x4 grid
    mean, peak = resample_grid(f, (4, 4)), block_max(f, (4, 4))
    assert peak[0, 1, 1, 1] == 8.0 and mean[0, 1, 1, 1] == 0.5
    assert peak[0, 1].sum() == 8.0 and peak[0, 0].abs().sum() == 0  # nowhere else


def test_block_max_refuses_a_grid_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        block_max(torch.zeros(1, 1, 10, 10), (4, 4))


@pytest.mark.usefixtures("one_torch_thread")
def test_avgmax_adds_the_finer_taps_maxima_and_keeps_the_means_as_avg_has_them() -> None:
    images = torch.randint(0, 255, (2, 128, 128, 3), dtype=torch.uint8)
    avg = build_model(ModelConfig(image_height=128, image_width=128, taps=[4, 10, 15], members=1, steps=2))
    both = build_model(ModelConfig(image_height=128, image_width=128, taps=[4, 10, 15], members=1, steps=2,
                                   pool="avgmax"))
    with torch.no_grad():
        feats = avg.features(images)
        e_avg, e_both = avg.embed(feats)[0], both.embed(feats)[0]
    # taps 4 / 10 / 15 of Lite0: 40 + 112 + 320 channels at strides 8 / 16 / 32; the first two are finer
    assert e_avg.shape == (2, 472, 4, 4) and e_both.shape == (2, 472 + 40 + 112, 4, 4)
    assert torch.equal(e_both[:, :472], e_avg)
    assert torch.all(e_both[:, 472:512] >= e_avg[:, :40] - 1e-6)  # a block's max is at least its mean
    # the flow models the same number of components either way: the head costs the same
    assert both.flows[0].steps[0].c1 + both.flows[0].steps[0].c2 == avg.flows[0].steps[0].c1 + avg.flows[0].steps[0].c2


def test_a_bad_pool_is_refused_by_name_and_older_bundles_load_with_avg() -> None:
    with pytest.raises(ValueError, match="pool must be 'avg' or 'avgmax'"):
        ModelConfig(pool="median").check()
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).pool == "avg"
    assert ModelConfig.from_dict(ModelConfig(pool="avgmax").to_dict()).pool == "avgmax"


@pytest.mark.usefixtures("one_torch_thread")
def test_an_avgmax_bundle_trained_from_the_command_line_runs_in_onnx_runtime_as_in_torch(tmp_path,
                                                                                        synthetic_parts) -> None:
    import numpy as np

    from inspectd.cli import main
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.model import build_from_bundle
    from inspectd.engines.preprocess import list_images, load_prepared
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend

    out = tmp_path / "b"
    code = main(["train", "--good", str(synthetic_parts.train_good), "--out", str(out), "--image-size", "128",
                 "--taps", "4,10", "--steps", "2", "--members", "1", "--epochs", "2", "--no-select",
                 "--pool", "avgmax"])
    assert code == 0
    bundle = load_bundle(out)
    assert bundle.manifest.training.config["model"]["pool"] == "avgmax"
    assert bundle.manifest.flow.pool == "avgmax"
    batch = np.stack([load_prepared(p, bundle.input_spec)
                      for p in list_images(synthetic_parts.test_good)[:2] + list_images(synthetic_parts.test_bad)[:2]])
    with torch.no_grad():
        t_scores, t_maps = (x.numpy() for x in build_from_bundle(bundle)(torch.from_numpy(batch)))
    with OnnxRuntimeBackend(bundle) as backend:
        o_scores, o_maps = backend.infer(batch)
    np.testing.assert_allclose(o_scores, t_scores, rtol=1e-4, atol=1e-4)   # the tolerance of the other methods' tests
    np.testing.assert_allclose(o_maps, t_maps, atol=1e-3)
