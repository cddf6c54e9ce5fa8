"""3-D RoPE position ids and rotary embedding (models/rope.py) against ids worked out on paper from the official
`get_rope_index` (inclusionAI/Ming d97e2f3, modeling_bailingmm.py) and `apply_multimodal_rotary_pos_emb`."""
import pytest
import torch

from models.ling_lite import LingLiteConfig
from models.rope import MultimodalRope, VisionSpans, mrope_section, rope_index, split_position_ids

# Token ids of this test; as in the Ming release, image and video spans share one patch token.
T, IMG, PATCH, IMG_END, VID, VID_END, AUD, AUD_PATCH, AUD_END = 5, 100, 101, 102, 103, 104, 105, 106, 107
SPANS = VisionSpans(image_start=IMG, image_patch=PATCH, video_start=VID, video_patch=PATCH)

# text, a video (merged grid t=2, h=2, w=2), text, two images (1x2x3 and 1x3x1), audio (3 patches), text
PROMPT = ([T, T, VID] + [PATCH] * 8 + [VID_END, T, IMG] + [PATCH] * 6 + [IMG_END, IMG] + [PATCH] * 3
          + [IMG_END, AUD] + [AUD_PATCH] * 3 + [AUD_END, T, T])
IMAGE_GRIDS = torch.tensor([[1, 2, 3], [1, 3, 1]])
VIDEO_GRIDS = torch.tensor([[2, 2, 2]])
# On paper, following get_rope_index: text counts on; a span's patches get start + (t, h, w) with start the
# position after the text before it; text after a span continues at the span's maximum + 1; audio is text.
EXPECTED = torch.tensor([
    # T  T <v> | video t,h,w + 3          |</v> T <i>| image 1 + 8      |</i><i>|image 2 + 13|</i><a> 3 x audio </a> T  T
    [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 11, 12, 13, 13, 13, 16, 17, 18, 19, 20, 21, 22, 23],
    [0, 1, 2, 3, 3, 4, 4, 3, 3, 4, 4, 5, 6, 7, 8, 8, 8, 9, 9, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 8, 9, 10, 11, 12, 13, 13, 13, 16, 17, 18, 19, 20, 21, 22, 23],
])
SHORT = [T, IMG] + [PATCH] * 4 + [IMG_END, T]  # one image, merged grid 1x2x2
SHORT_EXPECTED = torch.tensor([[0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]])


def test_positions_of_text_video_two_images_and_audio_are_the_official_ones():
    positions, deltas = rope_index(torch.tensor([PROMPT]), SPANS, IMAGE_GRIDS, VIDEO_GRIDS)
    assert positions.shape == (3, 1, len(PROMPT))
    assert positions[:, 0].tolist() == EXPECTED.tolist()
    assert deltas.tolist() == [[24 - len(PROMPT)]]  # max + 1 - length: generation continues at 24


def test_video_time_steps_follow_seconds_per_grid_and_tokens_per_second():
    positions, _ = rope_index(torch.tensor([PROMPT]), SPANS, IMAGE_GRIDS, VIDEO_GRIDS, video_second_per_grid=[1.0],
                              tokens_per_second=2)
    video = positions[:, 0, 3:11]
    assert video[0].tolist() == [3, 3, 3, 3, 5, 5, 5, 5]  # t: int(step * 1.0 s * 2 tokens/s) + 3
    assert torch.equal(video[1:], EXPECTED[1:, 3:11])
    assert torch.equal(positions[:, 0, 11:], EXPECTED[:, 11:] + 1)  # everything after starts one later


def test_batched_left_padded_and_right_padded_rows_equal_each_prompt_alone():
    alone_long, _ = rope_index(torch.tensor([PROMPT]), SPANS, IMAGE_GRIDS, VIDEO_GRIDS)
    alone_short, _ = rope_index(torch.tensor([SHORT]), SPANS, torch.tensor([[1, 2, 2]]))
    assert alone_short[:, 0].tolist() == SHORT_EXPECTED.tolist()
    pad = len(PROMPT) - len(SHORT)
    for side in ("left", "right"):
        short_row = [0] * pad + SHORT if side == "left" else SHORT + [0] * pad
        mask = torch.tensor([[1] * len(PROMPT), [0] * pad + [1] * len(SHORT) if side == "left"
                             else [1] * len(SHORT) + [0] * pad])
        # media in batch order: the short row's image comes after the long row's two images
        positions, deltas = rope_index(torch.tensor([PROMPT, short_row]), SPANS,
                                       torch.cat([IMAGE_GRIDS, torch.tensor([[1, 2, 2]])]), VIDEO_GRIDS,
                                       attention_mask=mask)
        assert torch.equal(positions[:, 0], alone_long[:, 0])
        assert torch.equal(positions[:, 1][:, mask[1].bool()], alone_short[:, 0])
        assert (positions[:, 1][:, ~mask[1].bool()] == 1).all()  # get_rope_index's padding value
        assert deltas.tolist() == [[24 - len(PROMPT)], [6 - len(PROMPT)]]


def test_packed_samples_keep_their_own_positions():
    row = SHORT + PROMPT + [0, 0]
    segments = torch.tensor([list(range(len(SHORT))) + list(range(len(PROMPT))) + [0, 1]])
    positions, _ = rope_index(torch.tensor([row]), SPANS, torch.cat([torch.tensor([[1, 2, 2]]), IMAGE_GRIDS]),
                              VIDEO_GRIDS, segment_positions=segments)
    assert torch.equal(positions[:, 0, :len(SHORT)], SHORT_EXPECTED)
    assert torch.equal(positions[:, 0, len(SHORT):len(SHORT) + len(PROMPT)], EXPECTED)
    assert positions[:, 0, -2:].tolist() == [[0, 1]] * 3  # the padding segment counts from 0 as text


def test_an_image_before_a_video_gets_its_own_grid():
    """Our one departure from get_rope_index (module docstring): the span's start token says image or video."""
    ids = [IMG] + [PATCH] * 2 + [IMG_END, VID] + [PATCH] * 4 + [VID_END]
    positions, _ = rope_index(torch.tensor([ids]), SPANS, torch.tensor([[1, 1, 2]]), torch.tensor([[2, 1, 2]]))
    assert positions[:, 0].tolist() == [[0, 1, 1, 3, 4, 5, 5, 6, 6, 7],
                                        [0, 1, 1, 3, 4, 5, 5, 5, 5, 7],
                                        [0, 1, 2, 3, 4, 5, 6, 5, 6, 7]]


def test_spans_that_do_not_match_their_grids_fail_naming_the_row_and_the_span():
    with pytest.raises(ValueError, match=r"batch row 0: the image span at token 3 does not hold exactly 6 patch"):
        rope_index(torch.tensor([SHORT[:1] + SHORT]), SPANS, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="batch row 0: more <image> spans than image grids"):
        rope_index(torch.tensor([SHORT]), SPANS, None)
    with pytest.raises(ValueError, match="1 image grid.* left over"):
        rope_index(torch.tensor([SHORT]), SPANS, torch.tensor([[1, 2, 2], [1, 1, 1]]))


def test_rotary_sections_rotate_by_t_h_and_w():
    config = LingLiteConfig(head_dim=16, hidden_size=64, num_attention_heads=4, rope_theta=10000,
                            rope_scaling={"type": "3D"}, pad_token_id=0)
    assert mrope_section(128) == (16, 24, 24)  # the official split; 16-dim heads: (2, 3, 3)
    rope = MultimodalRope(config)
    positions = torch.tensor([[[7]], [[11]], [[13]]])  # one token at t=7, h=11, w=13
    cos, sin = rope(torch.zeros(1), positions)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    angle = torch.cat([7 * inv_freq[:2], 11 * inv_freq[2:5], 13 * inv_freq[5:]])  # pairs [0,2) t, [2,5) h, [5,8) w
    torch.testing.assert_close(cos[0, 0], torch.cat([angle, angle]).cos())
    torch.testing.assert_close(sin[0, 0], torch.cat([angle, angle]).sin())
    text = torch.tensor([[3, 4]])  # equal rows: exactly 1-D RoPE
    cos1, _ = rope(torch.zeros(1), text)
    torch.testing.assert_close(cos1[0], torch.cat([text[0, :, None] * inv_freq] * 2, dim=-1).cos())


def test_sections_must_fit_the_head_and_layouts_are_checked():
    with pytest.raises(ValueError, match="rotary_dim 24 .* must be a multiple of 16"):
        MultimodalRope(LingLiteConfig(head_dim=24, rope_scaling={"type": "3D"}, pad_token_id=0))
    with pytest.raises(ValueError, match=r"must be \[4, batch, length\]"):
        split_position_ids(torch.zeros(3, 1, 5, dtype=torch.long))
