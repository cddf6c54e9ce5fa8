"""DiDeMo scoring: inclusive-segment IoU, the top-3 annotator agreement, seconds vs segments."""
import pytest

from evaluation.moment_scoring import iou, parse_moment, query_scores, score_moments, seconds_to_moment


def test_iou_counts_inclusive_segments():
    assert iou((1, 3), (1, 3)) == 1.0
    assert iou((2, 2), (2, 2)) == 1.0  # a single segment is one unit long, not zero
    assert iou((0, 1), (1, 2)) == pytest.approx(1 / 3)
    assert iou((0, 0), (5, 5)) == 0.0


@pytest.mark.parametrize("seconds, moment", [
    ((5, 20), (1, 3)),       # the README's example: (1, 3) is seconds 5-20
    ((0, 5), (0, 0)),        # an end on a boundary closes the segment before it
    ((3.2, 12.7), (0, 2)),   # the segments that hold the start and the end
    ((25, 40), (5, 5)),      # clipped to the video's 6 segments
    ((15, 10), (2, 2)),      # reversed order
])
def test_seconds_become_the_segments_an_annotator_marks(seconds, moment):
    assert seconds_to_moment(*seconds) == moment


def test_spans_in_seconds_and_in_segments():
    assert parse_moment("The moment happens from 5 to 20 seconds.") == (1, 3)
    assert parse_moment("5.0s - 20.0s") == (1, 3)
    assert parse_moment("(1, 3)", unit="segments") == (1, 3)
    assert parse_moment("segments 1 to 3") == (1, 3)  # the answer's own unit beats the prompt's
    assert parse_moment("between 10s and 15s", unit="segments") == (2, 2)
    assert parse_moment("I cannot tell.") is None
    assert parse_moment("segment 2 - 9", num_segments=5) == (2, 4)


def test_agreement_is_the_mean_of_the_three_best_annotators():
    truths = [(1, 3), (1, 3), (1, 2), (5, 5)]  # 4 annotators, one outlier
    value, rank = query_scores((1, 3), truths)
    assert value == pytest.approx((1 + 1 + 2 / 3) / 3)  # the outlier (IoU 0) is dropped
    assert rank == float("inf")  # only two annotators name exactly (1, 3): official rank@1 needs three
    value, rank = query_scores((1, 3), [(1, 3)] * 3 + [(0, 0)])
    assert (value, rank) == (1.0, 1.0)


def test_scores_at_the_iou_thresholds():
    truths = [
        [(0, 0)] * 4,                     # pred (0, 0): IoU 1
        [(0, 1)] * 4,                     # pred (0, 0): IoU 0.5 -> counts at 0.5, not at 0.7
        [(0, 2), (0, 2), (0, 3), (0, 3)], # pred (0, 1): best three 2/3, 2/3, 1/2 -> 0.6111 (0.5 yes, 0.7 no)
        [(1, 3)] * 3 + [(1, 2)],          # pred (1, 2): best three 1, 2/3, 2/3 -> 0.7778 (both)
        [(2, 4)] * 4,                     # unparsed answer: IoU 0
    ]
    predictions = [(0, 0), (0, 0), (0, 1), (1, 2), None]
    scores = score_moments(predictions, truths)
    assert scores["R@1,IoU=0.5"] == pytest.approx(4 / 5)
    assert scores["R@1,IoU=0.7"] == pytest.approx(2 / 5)
    assert scores["mIoU"] == pytest.approx((1 + 0.5 + (2 / 3 + 2 / 3 + 0.5) / 3 + (1 + 2 / 3 + 2 / 3) / 3 + 0) / 5)
    assert scores["rank@1"] == pytest.approx(1 / 5)  # only in query 1 do three annotators name the predicted moment
    assert scores["unparsed"] == 1


def test_an_iou_of_exactly_the_threshold_counts():
    scores = score_moments([(0, 2)], [[(0, 2), (0, 5), (0, 4)]])  # IoU 1, 0.5, 0.6: 0.7 up to rounding
    assert scores["R@1,IoU=0.7"] == 1.0
