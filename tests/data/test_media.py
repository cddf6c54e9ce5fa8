"""Decoding real media from data/assets/ and the ways it can go wrong."""
import io
import sys

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data import media
from data.media import MediaError, load_audio, load_image, load_video, sample_indices


def test_images_from_paths_and_bytes(assets):
    path = assets / "coco_000000039769.png"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (640, 480)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(image))


def test_exif_orientation_is_applied():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("L", (40, 20), 128).save(buffer, "JPEG", exif=exif)
    image = load_image(buffer.getvalue())
    assert image.size == (20, 40) and image.mode == "RGB"


def test_bad_images_name_the_file(assets, tmp_path):
    with pytest.raises(MediaError, match=r"missing\.png: file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.png: empty file"):
        load_image(tmp_path / "empty.png")
    truncated = (assets / "coco_000000039769.png").read_bytes()[:5000]
    with pytest.raises(MediaError, match=r"shard-7/cat\.png: not a decodable image"):
        load_image(truncated, name="shard-7/cat.png")
    with pytest.raises(MediaError, match=r"<9 bytes>: not a decodable image"):
        load_image(b"not a png")


def test_speech_44k_stereo_is_resampled_to_16k_mono(assets):
    info = sf.info(str(assets / "jfk.flac"))
    assert (info.samplerate, info.channels) == (44100, 2)
    wave = load_audio(assets / "jfk.flac")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == pytest.approx(info.frames * 16000 / 44100, abs=1)
    assert 0.01 < np.abs(wave).max() <= 1.0


@pytest.mark.parametrize("rate, channels", [(44100, 2), (8000, 1), (48000, 3)])
def test_any_rate_and_channel_count_becomes_16k_mono_with_the_pitch_kept(rate, channels):
    t = np.arange(rate) / rate  # 1 s of a 440 Hz tone on every channel
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone] * channels, axis=1), rate, format="WAV")
    wave = load_audio(buffer.getvalue())
    assert len(wave) == 16000
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)  # 1-Hz bins


def test_bad_audio_names_the_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.wav: empty file"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "silent.wav", np.zeros((0, 2)), 16000)
    with pytest.raises(MediaError, match=r"silent\.wav: audio has no samples"):
        load_audio(tmp_path / "silent.wav")
    (tmp_path / "noise.flac").write_bytes(b"\x00\x01" * 500)
    with pytest.raises(MediaError, match=r"noise\.flac: not decodable audio"):
        load_audio(tmp_path / "noise.flac")


def test_uniform_sampling_indices():
    assert sample_indices(310, 8) == [19, 58, 96, 135, 174, 213, 251, 290]  # centres of 8 equal segments
    assert sample_indices(3, 8) == [0, 1, 2]
    assert sample_indices(3, 8, "repeat") == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("name, size, total", [("mmaction2_demo_arm_wrestling.mp4", (256, 340), 280),
                                               ("flipping_a_pancake.mkv", (240, 426), 310)])
def test_real_videos_decode_identically_with_decord_and_pyav(assets, name, size, total):
    decord_clip = load_video(assets / name, num_frames=8, backend="decord")
    pyav_clip = load_video((assets / name).read_bytes(), num_frames=8, backend="pyav")
    assert decord_clip.frames.shape == (8, *size, 3) and decord_clip.frames.dtype == np.uint8
    assert decord_clip.total_frames == pyav_clip.total_frames == total
    assert decord_clip.indices == pyav_clip.indices == sample_indices(total, 8)
    assert np.array_equal(decord_clip.frames, pyav_clip.frames)


def test_pyav_takes_over_when_decord_fails_or_is_missing(assets, monkeypatch):
    reference = load_video(assets / "mmaction2_demo_arm_wrestling.mp4", num_frames=4, backend="pyav")

    def broken(*args):
        raise RuntimeError("decord could not open it")

    monkeypatch.setattr(media, "_frames_decord", broken)
    assert np.array_equal(load_video(assets / "mmaction2_demo_arm_wrestling.mp4", 4).frames, reference.frames)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    assert np.array_equal(load_video(assets / "mmaction2_demo_arm_wrestling.mp4", 4).frames, reference.frames)


def write_video(path, frames: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_video_shorter_than_requested(tmp_path):
    write_video(tmp_path / "short.mp4", 3)
    for backend in ("decord", "pyav"):
        every = load_video(tmp_path / "short.mp4", num_frames=8, backend=backend)
        assert every.frames.shape[0] == 3 and every.indices == [0, 1, 2] and every.total_frames == 3
        repeated = load_video(tmp_path / "short.mp4", num_frames=8, short_video="repeat", backend=backend)
        assert repeated.frames.shape[0] == 8 and repeated.indices == [0, 0, 0, 1, 1, 1, 2, 2]
        assert np.array_equal(repeated.frames[3], every.frames[1])


def test_video_audio_track(assets):
    clip = load_video(assets / "flipping_a_pancake.mkv", num_frames=2, with_audio=True)
    assert clip.audio.dtype == np.float32 and len(clip.audio) / 16000 == pytest.approx(10.4, abs=0.1)
    assert load_video(assets / "mmaction2_demo_arm_wrestling.mp4", num_frames=2, with_audio=True).audio is None


def test_bad_videos_name_the_file(assets, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4: empty file"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 200)
    with pytest.raises(MediaError, match=r"junk\.mp4: not a decodable video \(decord: .*; pyav: .*\)"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match=r"LDC93S1\.wav: not a decodable video"):  # audio only: no video stream
        load_video(assets / "LDC93S1.wav")
    with pytest.raises(MediaError, match=r"nothing\.mkv: file not found"):
        load_video(tmp_path / "nothing.mkv")
