"""The flow is an ensemble (ModelConfig.members): flows trained independently from different
initialisations, their maps averaged in the graph; old bundles load with one flow."""

from __future__ import annotations

import pytest
import torch

from inspectd.engines.backbone import EfficientNetFeatures
from inspectd.engines.methods.flow import FlowModel, fit_statistics, train_flows
from inspectd.engines.model_config import ModelConfig
from inspectd.engines.train import TrainConfig


def _model(members: int, seed: int = 0) -> FlowModel:
    torch.manual_seed(seed)  # as `inspectd train` seeds the subnets' initial weights
    config = ModelConfig(image_height=64, image_width=64, taps=[4], components=8, steps=2, members=members)
    return FlowModel(config, EfficientNetFeatures(config.backbone, config.taps))  # 40 channels at tap 4


def _cache() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 40, 2, 2, generator=g) * torch.linspace(0.2, 3.0, 40).view(1, 40, 1, 1)).half()]


def _trained(members: int) -> FlowModel:
    model, cache = _model(members), _cache()
    fit_statistics(model, cache, 32)
    train_flows(model, cache, 32, TrainConfig(model=model.config, epochs=3, batch_size=8, seed=0), torch.device("cpu"))
    return model


@pytest.mark.usefixtures("one_torch_thread")
def test_the_map_is_the_mean_of_the_members_maps() -> None:
    model = _trained(3)
    x = _cache()[0][:4].float()
    maps = model.nll_maps([x])[0]
    flow_in = model.flow_input(0, x)
    singles = [model.member_flows(m)[0].transform(flow_in)[0] for m in range(3)]
    torch.testing.assert_close(maps, torch.stack(singles).mean(0))
    # The members differ (their own initial weights and batch orders), so averaging does something.
    assert min((singles[a] - singles[b]).abs().max() for a, b in ((0, 1), (1, 2), (0, 2))) > 1e-3


@pytest.mark.usefixtures("one_torch_thread")
def test_members_train_independently_member_0_is_the_single_flow() -> None:
    """Member 0 of an ensemble is exactly the flow a one-member training makes: the other members
    neither share its optimiser nor its batch order."""
    single, ensemble = _trained(1), _trained(2)
    for (name, a), (_, b) in zip(single.flows[0].state_dict().items(), ensemble.member_flows(0)[0].state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(ensemble.member_flows(1)[0].steps[0].subnet.conv2.weight,
                           ensemble.member_flows(0)[0].steps[0].subnet.conv2.weight)


def test_one_member_keeps_the_names_of_bundles_before_ensembles() -> None:
    names = set(_model(1).state_dict())
    assert "flows.0.steps.0.subnet.conv1.weight" in names and not any(n.startswith("flows.1.") for n in names)
    assert any(n.startswith("flows.2.") for n in _model(3).state_dict())


def test_bundles_from_before_ensembles_load_with_one_member() -> None:
    assert ModelConfig.from_dict({"image_height": 64, "image_width": 64}).members == 1
    assert ModelConfig.from_dict(ModelConfig().to_dict()).members == ModelConfig().members == 3


@pytest.mark.parametrize("members", [0, 9])
def test_bad_member_counts_are_refused(members: int) -> None:
    with pytest.raises(ValueError, match=f"members {members}"):
        ModelConfig(members=members).check()


def test_a_trained_bundle_records_its_members_and_its_graph_runs_them(tiny_bundle) -> None:
    import onnx

    from inspectd.engines.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest.flow.members == ModelConfig().members == 3
    scopes = {n.name.split("/")[1] for n in onnx.load(str(bundle.model_path)).graph.node if n.name.count("/") > 1}
    # The exporter names each member's first coupling step steps.0, steps.0_1, steps.0_2.
    assert len({s for s in scopes if s.split("_")[0] == "steps.0"}) == 3, sorted(scopes)
