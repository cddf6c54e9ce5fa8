import pytest
import torch

from models.projectors import build_projector, conv_output_frames


@pytest.mark.parametrize("name, depth", [("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)])
def test_mlp_gelu_any_depth(name, depth):
    projector = build_projector(name, 24, 16)
    linears = [m for m in projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth and linears[0].in_features == 24 and linears[-1].out_features == 16
    assert projector(torch.randn(5, 24)).shape == (5, 16)


def test_ming_layouts_are_kept_key_for_key():
    assert sorted(build_projector("mlp2x_gelu", 8192, 2048).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert sorted(build_projector("conv_audio", 1280, 2048).state_dict()) == ["0.bias", "0.weight", "3.bias", "3.weight"]


def test_conv_audio_downsamples_frames_as_predicted():
    projector = build_projector("conv_audio", 32, 16, depth=2, kernel_size=3, stride=2)
    for frames in (1, 2, 145, 1500):
        out = projector(torch.randn(1, 32, frames))
        assert out.shape == (1, 16, conv_output_frames(frames, 3, 2))


def test_linear_and_unknown():
    assert build_projector("linear", 4, 3)(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(KeyError, match="Known projectors: conv_audio, linear, mlp_gelu"):
        build_projector("qformer", 4, 3)
