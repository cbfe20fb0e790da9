"""Shared preprocessing and the backbone's weights handling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from inspectd.engines.backbone import EfficientNetFeatures, block_specs, default_weights_path, load_backbone
from inspectd.engines.preprocess import InputSpec, convert_color, prepare, read_image
from inspectd.errors import DataError


def test_colour_frames_become_grey_for_a_grey_bundle_and_mono_frames_are_refused_by_a_colour_one():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    assert np.array_equal(convert_color(rgb, "rgb"), rgb)
    back = convert_color(rgb, "gray")
    assert back.shape == (3, 4, 1) and np.array_equal(back[..., 0], grey)
    assert np.array_equal(convert_color(grey, "gray")[..., 0], grey)
    for mono in (grey, grey[:, :, None]):  # a colour bundle never saw a grey part: not replicated
        with pytest.raises(DataError, match="a mono frame .* trained on colour frames"):
            convert_color(mono, "rgb")


def test_read_image_is_rgb_order_and_handles_unicode_paths(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR
    path = tmp_path / "prüfteil.png"
    ok, data = cv2.imencode(".png", bgr)
    path.write_bytes(data.tobytes())
    img = read_image(path, "rgb")
    assert img[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("kind", ["rgb8", "rgba8", "rgb16", "grey8"])
def test_a_file_read_grey_is_the_frame_the_daemon_makes_grey(tmp_path, kind):
    """Training, eval and calibrate read files with read_image; the daemon converts camera and replay
    frames with convert_color. A grey bundle must see the same pixels both ways: libpng's own
    colour-to-grey decode truncates where cv2.cvtColor rounds (one grey level on about half the pixels)."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    pixels = {"rgb8": bgr, "rgba8": np.dstack([bgr, np.full(rgb.shape[:2], 200, np.uint8)]),
              "rgb16": bgr.astype(np.uint16) * 257, "grey8": rgb[:, :, 0]}[kind]
    path = tmp_path / f"{kind}.png"
    assert cv2.imwrite(str(path), pixels)
    as_camera_frame = read_image(path, "rgb") if kind != "grey8" else rgb[:, :, :1]
    np.testing.assert_array_equal(read_image(path, "gray"), convert_color(as_camera_frame, "gray"))


def test_prepare_crops_converts_and_resizes():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[10:60, 20:120] = 255
    out = prepare(frame, InputSpec(32, 32, "gray", roi=(20, 10, 100, 50)))
    assert out.shape == (32, 32, 1) and out.min() == 255
    with pytest.raises(DataError, match="ROI .* lies outside the 200x100 frame"):
        prepare(frame, InputSpec(32, 32, "gray", roi=(150, 0, 100, 50)))
    with pytest.raises(DataError, match="not uint8"):
        prepare(frame.astype(np.float32), InputSpec(32, 32, "gray"))


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.png: not a readable image"):
        read_image(bad, "gray")
    with pytest.raises(DataError, match="cannot read"):
        read_image(tmp_path / "missing.png", "gray")


def test_variant_tables():
    assert len(block_specs("efficientnet-lite0")) == 16
    assert len(block_specs("efficientnet-b0")) == 16
    assert len(block_specs("efficientnet-b5")) == 39
    assert len(block_specs("efficientnet-b7")) == 55
    net = EfficientNetFeatures("efficientnet-b3", taps=[5, 17])
    feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == net.tap_channels and net.tap_strides == [8, 16]


def test_packaged_weights_load_and_give_features():
    net = load_backbone("efficientnet-lite0", [4, 10, 15])
    feats = net(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert all(not p.requires_grad for p in net.parameters())


def test_missing_and_mismatching_weights_name_the_file_and_keys(tmp_path):
    with pytest.raises(DataError, match=r"weights .*none\.pth: file not found"):
        load_backbone("efficientnet-lite0", [4], tmp_path / "none.pth")
    # Lite2 is wider than Lite0: its weights must be refused with the offending key and shapes.
    with pytest.raises(DataError, match=r"do not fit efficientnet-lite0: shape mismatch at _conv_stem|"
                                        r"do not fit efficientnet-lite0: shape mismatch at _blocks"):
        load_backbone("efficientnet-lite0", [15], default_weights_path("efficientnet-lite2"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"missing keys \['_conv_stem.weight'"):
        load_backbone("efficientnet-lite0", [4], tmp_path / "other.pth")
    with pytest.raises(DataError, match="no packaged ImageNet weights for efficientnet-b5"):
        default_weights_path("efficientnet-b5")


def test_a_pickled_model_as_weights_is_one_plain_line_naming_the_file(tmp_path):
    """torch.save(model) instead of torch.save(model.state_dict()): PyTorch's weights-only refusal is
    many lines with ANSI escapes; the CLI prints the message as it is, so it must be one plain line."""
    path = tmp_path / "whole_model.pth"
    torch.save(EfficientNetFeatures("efficientnet-lite0", taps=[4]), path)
    with pytest.raises(DataError) as info:
        load_backbone("efficientnet-lite0", [4], path)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg, msg
    assert str(path) in msg and "state_dict()" in msg, msg
    # a file that is no checkpoint at all: one line too, still naming the file
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint\n\x1b[1mat all\x1b[0m")
    with pytest.raises(DataError) as info:
        load_backbone("efficientnet-lite0", [4], junk)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and str(junk) in msg, msg
    # a bare tensor is no state dict either: a one-line refusal, not a RuntimeError traceback
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(DataError, match=r"tensor\.pth: holds a Tensor, not a state dict"):
        load_backbone("efficientnet-lite0", [4], tmp_path / "tensor.pth")
