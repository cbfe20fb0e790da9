"""Method "vae" (paper 002): trains on generated parts and separates bad from good, ONNX Runtime
matches PyTorch, the decoupled gradients reach only the weights the paper routes them to, the
steering follows each loss's target, active units are counted as Burda et al. define them, grey /
rgb / tiled / non-square inputs export, bad options are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inspectd.engines.bundle import load_bundle
from inspectd.engines.methods.vae import (METHOD, ConvVAE, DecoupledUpdate, VAEModel, VAEOptions, active_units,
                                          decoupled_gradients, kld, latent_means, losses, steering_gains, train_vae,
                                          working_size)
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.preprocess import InputSpec, list_images, load_prepared
from inspectd.engines.train import TrainConfig
from tests.helpers import (assert_bad_option_refused, assert_onnx_matches_torch, assert_onnx_separates,
                           ort_session, prepared_images)


@pytest.fixture(scope="module")
def bundle_path(tiny_method_bundles) -> Path:
    """The session's tiny vae bundle (tests/conftest.py: decoupled, 20 epochs at 64 px, width 8;
    shared with the daemon and tools tests)."""
    return tiny_method_bundles("vae")


@pytest.fixture(scope="module")
def test_images(bundle_path: Path, synthetic_parts) -> tuple[np.ndarray, np.ndarray]:
    return (prepared_images(bundle_path, synthetic_parts.test_good),
            prepared_images(bundle_path, synthetic_parts.test_bad))


def _small_vae(seed: int = 0, latent: int = 4) -> ConvVAE:
    torch.manual_seed(seed)
    return ConvVAE(1, (32, 32), latent, 4)


def test_trained_engine_separates_bad_from_good(bundle_path: Path, test_images) -> None:
    assert_onnx_separates(bundle_path, *test_images)
    m = load_bundle(bundle_path).manifest
    assert m.method.name == "vae" and m.method.options["training"] == "decoupled" and m.backbone is None
    d = m.method.details
    for key in ("final_kld", "final_mse", "kld_target", "mse_target", "baseline_mse", "active_units", "history"):
        assert key in d, key
    assert d["kld_target"] == 32.0 and d["mse_target"] == pytest.approx(0.25 * d["baseline_mse"], rel=1e-3)
    # Decoupled training keeps the posterior off the prior: KLD steered near its 32-nat target (the
    # proportional control leaves an offset), latent units in use, reconstruction beats the mean tile.
    assert 24 <= d["final_kld"] <= 48, d["final_kld"]
    assert d["final_mse"] < d["baseline_mse"] and d["active_units"] >= 8
    assert len(d["history"]) == 20 and len(d["unit_variances"]) == d["latent"] == 32


def test_onnx_runtime_matches_torch_and_batches_are_independent(bundle_path: Path, test_images) -> None:
    assert_onnx_matches_torch(bundle_path, np.concatenate(test_images))


def test_decoupled_gradients_reach_only_where_the_paper_routes_them() -> None:
    """E1 = dKLD/d(encoder), E2 = dMSE/d(encoder), D = dMSE/d(decoder), each from its loss alone:
    hooks on every weight record each gradient autograd delivers while the three are computed."""
    vae = _small_vae()
    vae.train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 32, 32, generator=g)
    eps = torch.randn(6, 4, generator=g)
    enc, dec = vae.encoder_parameters(), vae.decoder_parameters()
    assert {id(p) for p in enc}.isdisjoint({id(p) for p in dec})
    assert {id(p) for p in enc} | {id(p) for p in dec} == {id(p) for p in vae.parameters()}

    # References: autograd of each loss alone on a copy (same weights, same batch and eps).
    ref = _small_vae()
    ref.load_state_dict(vae.state_dict())
    ref.train()
    k_ref, m_ref = losses(ref, x, eps)
    want_e1 = torch.autograd.grad(k_ref, ref.encoder_parameters(), retain_graph=True)
    want_kd = torch.autograd.grad(k_ref, ref.decoder_parameters(), retain_graph=True, allow_unused=True)
    want_e2 = torch.autograd.grad(m_ref, ref.encoder_parameters(), retain_graph=True)
    want_d = torch.autograd.grad(m_ref, ref.decoder_parameters())
    assert all(w is None for w in want_kd)  # the KLD has no path to the decoder at all

    seen: dict[int, list[torch.Tensor]] = {id(p): [] for p in vae.parameters()}
    handles = [p.register_hook(lambda grad, key=id(p): seen[key].append(grad.clone())) for p in vae.parameters()]
    try:
        k, m, grads = decoupled_gradients(vae, x, eps)
    finally:
        for h in handles:
            h.remove()
    assert k.item() == pytest.approx(k_ref.item()) and m.item() == pytest.approx(m_ref.item())
    # Decoder: exactly one gradient each, and it is dMSE/d(decoder).
    for p, want, got in zip(dec, want_d, grads["D"]):
        assert len(seen[id(p)]) == 1
        torch.testing.assert_close(seen[id(p)][0], want)
        torch.testing.assert_close(got, want)
    # Encoder: two gradients each, dKLD then dMSE, never their sum.
    for p, w1, w2, g1, g2 in zip(enc, want_e1, want_e2, grads["E1"], grads["E2"]):
        assert len(seen[id(p)]) == 2
        torch.testing.assert_close(seen[id(p)][0], w1)
        torch.testing.assert_close(seen[id(p)][1], w2)
        torch.testing.assert_close(g1, w1)
        torch.testing.assert_close(g2, w2)


@pytest.mark.usefixtures("one_torch_thread")
def test_each_gradient_moves_only_its_own_weights_with_its_own_optimiser() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 32, 32, generator=g)
    eps = torch.randn(6, 4, generator=g)
    for gains, moved in (({"E1": 1.0, "E2": 0.0, "D": 0.0}, "enc"), ({"E1": 0.0, "E2": 1.0, "D": 0.0}, "enc"),
                         ({"E1": 0.0, "E2": 0.0, "D": 1.0}, "dec")):
        vae = _small_vae()
        vae.train()
        update = DecoupledUpdate(vae, 1e-2)
        before = [p.detach().clone() for p in vae.parameters()]
        _, _, grads = decoupled_gradients(vae, x, eps)
        update.apply(grads, gains, 1e-2)
        enc_ids = {id(p) for p in vae.encoder_parameters()}
        for p, b in zip(vae.parameters(), before):
            changed = not torch.equal(p.detach(), b)
            # a weight with an exactly zero gradient may stay put; none outside the routed part moves
            if (id(p) in enc_ids) != (moved == "enc"):
                assert not changed
        assert any(not torch.equal(p.detach(), b) for p, b in zip(vae.parameters(), before)
                   if (id(p) in enc_ids) == (moved == "enc"))
        key = next(k for k, v in gains.items() if v)
        assert all(not o.state for k2, o in update.opts.items() if k2 != key)  # other optimisers untouched

    # The sign of E1's gain decides whether KLD is pushed down (above target) or up (below target).
    results = {}
    for sign in (1.0, -1.0):
        vae = _small_vae()
        vae.train()
        update = DecoupledUpdate(vae, 1e-2)
        for _ in range(5):
            _, _, grads = decoupled_gradients(vae, x, eps)
            update.apply(grads, {"E1": sign, "E2": 0.0, "D": 0.0}, 1e-2)
        with torch.no_grad():
            mu, logvar = vae.encode(x)
        results[sign] = float(kld(mu, logvar).mean())
    vae = _small_vae()
    vae.train()
    with torch.no_grad():
        start = float(kld(*vae.encode(x)).mean())
    assert results[1.0] < start < results[-1.0], (results, start)


def test_steering_gains_follow_the_targets() -> None:
    # KLD: full descent far above, full ascent far below, proportional within 25 %, zero on target.
    assert steering_gains(100.0, 1.0, 32.0, 0.5)[0] == 1.0
    assert steering_gains(1.0, 1.0, 32.0, 0.5)[0] == -1.0
    assert steering_gains(32.0, 1.0, 32.0, 0.5)[0] == 0.0
    assert steering_gains(36.0, 1.0, 32.0, 0.5)[0] == pytest.approx(0.5)
    assert steering_gains(28.0, 1.0, 32.0, 0.5)[0] == pytest.approx(-0.5)
    # MSE: descends until its target, never pushed back up below it.
    assert steering_gains(32.0, 1.0, 32.0, 0.5)[1] == 1.0
    assert steering_gains(32.0, 0.5625, 32.0, 0.5)[1] == pytest.approx(0.5)
    assert steering_gains(32.0, 0.1, 32.0, 0.5)[1] == 0.0


@pytest.mark.usefixtures("one_torch_thread")
def test_both_trainings_run_and_record_their_losses() -> None:
    cfg = TrainConfig(model=ModelConfig(image_height=32, image_width=32), seed=0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 32, 32, generator=g)
    for training in ("joint", "decoupled"):
        vae = _small_vae()
        opts = VAEOptions(epochs=2, size=32, latent=4, width=4, training=training)
        loss, history = train_vae(vae, x, opts, cfg, torch.device("cpu"), mse_target_abs=0.01)
        assert np.isfinite(loss) and [h["epoch"] for h in history] == [1, 2]
        assert all(h["kld"] >= 0 and h["mse"] > 0 for h in history)
        if training == "joint":
            assert all(h["gain_kld"] == 1.0 and h["gain_mse"] == 1.0 for h in history)
        else:  # starts below the 32-nat target: E1 ascends (negative gain)
            assert history[0]["gain_kld"] < 0
        assert not vae.training


def test_active_units_on_a_constructed_case() -> None:
    # Direct: variances 0.02 and 0.5 are active, 0.005 and 0 are not (threshold 0.01, sample variance).
    g = torch.Generator().manual_seed(4)
    base = torch.randn(400, 4, generator=g)
    base = (base - base.mean(0)) / base.std(0)
    mu = base * torch.tensor([0.02, 0.005, 0.5, 0.0]).sqrt()
    n, var = active_units(mu)
    assert n == 2 and var == pytest.approx([0.02, 0.005, 0.5, 0.0], abs=1e-6)
    with pytest.raises(ValueError):
        active_units(mu[:1])

    # Through an encoder: mu units 0-2 read the features (vary with x), units 3-5 have zero weights
    # (a constant mean: the posterior of those units ignores x, i.e. collapsed).
    vae = _small_vae(latent=6).eval()
    with torch.no_grad():
        w = vae.posterior.weight
        w[3:6].zero_()
        vae.posterior.bias[3:6] = 0.7
        w[0:3] *= 50.0
    x = torch.rand(40, 1, 32, 32, generator=g)
    means = latent_means(vae, x, torch.device("cpu"))
    n, var = active_units(means)
    assert n == 3 and min(var[:3]) > 0.01 and max(var[3:]) < 1e-12


@pytest.mark.parametrize("color_mode, tiles, size", [("rgb", (1, 1), (64, 64)), ("gray", (2, 1), (64, 64)),
                                                      ("gray", (1, 1), (64, 160))])
def test_rgb_tiled_and_non_square_engines_export(color_mode: str, tiles: tuple[int, int], size: tuple[int, int],
                                                 tmp_path: Path) -> None:
    mc = ModelConfig(image_height=size[0], image_width=size[1], color_mode=color_mode, tiles=tiles, tile_overlap=32)
    torch.manual_seed(0)
    model = VAEModel(mc, VAEOptions(size=32, latent=8, width=4)).eval()
    assert model.shape == working_size(size[0], size[1], 32)
    ch = 3 if color_mode == "rgb" else 1
    images = torch.randint(0, 256, (2, mc.input_height, mc.input_width, ch), dtype=torch.uint8)
    with torch.no_grad():
        score, amap = model(images)
    assert score.shape == (2,) and amap.shape == (2, mc.input_height // 4, mc.input_width // 4)
    METHOD.export(model, tmp_path / "m.onnx")
    s, m = ort_session(tmp_path / "m.onnx").run(None, {"images": images.numpy()})
    np.testing.assert_allclose(s, score.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(m, amap.numpy(), rtol=1e-3, atol=1e-3)


def test_working_size_keeps_the_aspect_in_multiples_of_16() -> None:
    assert working_size(256, 256, 128) == (128, 128)
    assert working_size(640, 256, 128) == (320, 128)
    assert working_size(128, 128, 64) == (64, 64)
    assert working_size(64, 160, 32) == (32, 80)


@pytest.mark.parametrize("option, message", [
    ("training=both", "option training='both': choose from decoupled, joint for method vae"),
    ("size=40", "option size=40: a multiple of 16"),
    ("latent=0", "option latent=0: must be 1..512"),
    ("kld_target=0", "option kld-target=0.0: must be > 0"),
    ("mse_target=1.5", "option mse-target=1.5: must be in (0, 1)"),
    ("joint_mse=median", "option joint-mse='median': choose from sum, mean for method vae"),
    ("epochs=0", "option epochs=0: must be 1..1000"),
    ("latent=many", "option latent='many': expected int for method vae"),
])
def test_bad_options_are_config_errors(option: str, message: str, synthetic_parts, tmp_path: Path) -> None:
    assert_bad_option_refused("vae", option, message, synthetic_parts.train_good, tmp_path / "b")


def test_label_free_reduction_choice_sets_the_head(synthetic_parts) -> None:
    """`inspectd train` selects the map reduction on held-out good + synthetic defects (the shared
    fitting.select_reduction): it runs on a vae engine and sets the head, config and cfg alike."""
    from inspectd.engines.fitting import select_reduction

    mc = ModelConfig(image_height=128, image_width=128)
    cfg = TrainConfig(model=mc, method="vae", seed=0)
    hold = [load_prepared(p, InputSpec(128, 128, "gray")) for p in list_images(synthetic_parts.train_good)[:6]]
    torch.manual_seed(0)
    model = VAEModel(mc, VAEOptions(size=32, latent=4, width=4)).eval()
    record = select_reduction(model, cfg, hold, torch.device("cpu"))
    chosen = record["chosen"]["reduction"]
    assert record["enabled"] and [r["reduction"] for r in record["candidates"]] == list(cfg.select_reductions)
    assert model.head.reduction == model.config.reduction == cfg.model.reduction == chosen
