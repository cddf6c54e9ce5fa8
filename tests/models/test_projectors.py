import pytest
import torch

from models.projectors import PROJECTORS, build_projector, conv_output_frames


@pytest.mark.parametrize("name, depth", [("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)])
def test_mlp_gelu_any_depth(name, depth):
    projector = build_projector(name, 24, 16)
    linears = [m for m in projector if isinstance(m, torch.nn.Linear)]
    gelus = [m for m in projector if isinstance(m, torch.nn.GELU)]
    assert len(linears) == depth and len(gelus) == depth - 1
    assert linears[0].in_features == 24 and linears[-1].out_features == 16
    assert projector(torch.randn(5, 24)).shape == (5, 16) and projector.num_tokens(5) == 5


def test_ming_layouts_are_kept_key_for_key():
    assert sorted(build_projector("mlp2x_gelu", 8192, 64).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    conv = build_projector("conv_audio", 1280, 64)
    assert sorted(conv.state_dict()) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    assert conv[0].weight.shape == (64, 1280, 3) and conv[0].stride == (2,) and conv[0].padding == (1,)


@pytest.mark.parametrize("kernel_size, stride", [(3, 2), (5, 4), (1, 1)])
def test_conv_audio_downsamples_frames_as_predicted(kernel_size, stride):
    projector = build_projector("conv_audio", 32, 16, depth=2, kernel_size=kernel_size, stride=stride)
    for frames in (1, 2, 145, 1500):
        out = projector(torch.randn(1, 32, frames))  # Ming's layout: channels first
        assert out.shape == (1, 16, projector.num_tokens(frames)) == (1, 16, conv_output_frames(frames, kernel_size, stride))


def test_project_is_layout_independent():
    clip = torch.randn(145, 32)
    conv = build_projector("conv_audio", 32, 16)
    torch.testing.assert_close(conv.project(clip), conv(clip.T.unsqueeze(0))[0].T)
    assert conv.project(clip).shape == (73, 16)
    mlp = build_projector("mlp2x_gelu", 32, 16)
    torch.testing.assert_close(mlp.project(clip), mlp(clip))


def test_linear_unknown_and_contradictory_names():
    assert build_projector("linear", 4, 3)(torch.randn(2, 4)).shape == (2, 3)
    assert PROJECTORS.names() == ["conv_audio", "linear", "mlp_gelu"]
    with pytest.raises(KeyError, match="Known projectors: conv_audio, linear, mlp_gelu"):
        build_projector("qformer", 4, 3)
    with pytest.raises(ValueError, match="already says its depth"):
        build_projector("mlp2x_gelu", 4, 3, depth=3)
    with pytest.raises(ValueError, match="depth >= 1"):
        build_projector("mlp0x_gelu", 4, 3)
