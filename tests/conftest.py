"""Shared fixtures: the tiny omni model, its processor, and real media decoded from data/assets/."""
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "data" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    return Image.open(ASSETS / "coco_000000039769.png").convert("RGB")


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """LDC93S1.wav: 16 kHz mono TIMIT sentence, 2.9 s."""
    wav, rate = sf.read(ASSETS / "LDC93S1.wav", dtype="float32")
    assert rate == 16000 and wav.ndim == 1
    return wav


@pytest.fixture(scope="session")
def video_frames() -> np.ndarray:
    """8 frames of the arm-wrestling clip, decoded with PyAV."""
    with av.open(str(ASSETS / "mmaction2_demo_arm_wrestling.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(video=0))]
    return np.stack(frames[::5])


@pytest.fixture(scope="session")
def tiny_omni():
    import models  # noqa: F401
    from models.build import build_model, load_model_config
    config = load_model_config("configs/models/tiny-omni.yaml")
    torch.manual_seed(0)
    return build_model(config).eval(), config


@pytest.fixture(scope="session")
def processor(tiny_omni):
    from data.processor import OmniProcessor
    model, config = tiny_omni
    return OmniProcessor.for_model(model, config.tokenizer, config.max_length)
