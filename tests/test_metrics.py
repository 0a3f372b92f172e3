"""The metric functions on small cases computed by hand."""
import math

import numpy as np
import pytest

from pipeline import metrics

LOG2_3 = math.log2(3)


def test_error_sums_and_rating_errors():
    # errors -0.5, 0, -2: sse = 0.25 + 0 + 4 = 4.25, sae = 0.5 + 0 + 2 = 2.5, n = 3
    sums = metrics.error_sums([1.0, 2.0, 3.0], np.array([1.5, 2.0, 5.0]))
    assert sums == {"sse": 4.25, "sae": 2.5, "n": 3.0}
    assert all(type(v) is float for v in sums.values())
    errors = metrics.rating_errors(sums)
    assert errors["rmse"] == pytest.approx(math.sqrt(4.25 / 3))
    assert errors["mae"] == pytest.approx(2.5 / 3)


def test_error_sums_add_up_across_parts_like_ranks_do():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(3, 1, 101), rng.normal(3, 1, 101)
    parts = [metrics.error_sums(pred[:40], true[:40]), metrics.error_sums(pred[40:], true[40:])]
    summed = {k: parts[0][k] + parts[1][k] for k in ("sse", "sae", "n")}
    whole = metrics.rating_errors(metrics.error_sums(pred, true))
    assert metrics.rating_errors(summed)["rmse"] == pytest.approx(whole["rmse"])
    assert whole["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))
    assert whole["mae"] == pytest.approx(np.mean(np.abs(pred - true)))


def test_no_ratings_give_nan_and_mismatches_raise():
    errors = metrics.rating_errors(metrics.error_sums([], []))
    assert math.isnan(errors["rmse"]) and math.isnan(errors["mae"])
    with pytest.raises(ValueError):
        metrics.error_sums([1.0, 2.0], [1.0])


def test_round_to_levels():
    # nearest of 1..5; out-of-range values go to the end levels; 1.5 is a tie and goes down
    assert metrics.round_to_levels([0.2, 1.49, 1.5, 1.51, 4.6, 7.0], [1, 2, 3, 4, 5]).tolist() == [1, 1, 1, 2, 5, 5]
    half = np.arange(1, 11) / 2
    assert metrics.round_to_levels(np.array([0.1, 2.6, 2.8, 4.9]), half).tolist() == [0.5, 2.5, 3.0, 5.0]


def test_ranking_metrics_by_hand():
    recommended = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [11], np.array([20, 21, 22, 23])]
    relevant = [{1, 3, 9}, {7}, set(), {11, 12}, {23}]
    m = metrics.ranking_metrics(recommended, relevant, k=3)
    # user 3 has nothing relevant and is left out; the others (A, B, D, E), at k = 3:
    # A: top 3 = 1,2,3, hits at ranks 1 and 3 of 3 relevant. P = 2/3, R = 2/3,
    #    DCG = 1 + 1/log2(4) = 1.5, IDCG = 1 + 1/log2(3) + 1/2, AP = (1/1 + 2/3) / 3 = 5/9
    # B: hit at rank 3 of 1 relevant. P = 1/3, R = 1, NDCG = (1/2) / 1, AP = (1/3) / 1
    # D: list shorter than k, hit at rank 1 of 2 relevant. P = 1/3 (over k, not the list), R = 1/2,
    #    NDCG = 1 / (1 + 1/log2(3)) (ideal over min(3, 2) = 2 ranks), AP = (1/1) / 2
    # E: its one relevant item is at rank 4, beyond k: all zero, no hit
    assert m["users"] == 4
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 0) / 4)  # 1/3
    assert m["recall@3"] == pytest.approx((2 / 3 + 1 + 1 / 2 + 0) / 4)  # 13/24
    ndcg_a = 1.5 / (1.5 + 1 / LOG2_3)  # 0.703918
    ndcg_d = 1 / (1 + 1 / LOG2_3)  # 0.613147
    assert m["ndcg@3"] == pytest.approx((ndcg_a + 0.5 + ndcg_d + 0) / 4)
    assert m["ndcg@3"] == pytest.approx(0.454266, abs=1e-6)
    assert m["map@3"] == pytest.approx((5 / 9 + 1 / 3 + 1 / 2 + 0) / 4)  # 25/72
    assert m["hit_rate@3"] == pytest.approx(3 / 4)
    assert set(m) == {"precision@3", "recall@3", "ndcg@3", "map@3", "hit_rate@3", "users"}


def test_ranking_metrics_edges():
    # a perfect list scores 1 everywhere except precision, which divides by k
    perfect = metrics.ranking_metrics([[4, 5]], [{4, 5}], k=5)
    assert perfect["ndcg@5"] == pytest.approx(1) and perfect["map@5"] == pytest.approx(1)
    assert perfect["recall@5"] == 1 and perfect["precision@5"] == pytest.approx(2 / 5)
    # more relevant items than k: AP divides by min(k, 5) = 2, recall by all 5
    many = metrics.ranking_metrics([[1, 2, 3]], [{1, 2, 3, 4, 5}], k=2)
    assert many["map@2"] == pytest.approx(1) and many["recall@2"] == pytest.approx(2 / 5)
    # a hit at rank 2 only: AP = (1/2) / 1, NDCG = 1/log2(3)
    second = metrics.ranking_metrics([[7, 8]], [{8}], k=10)
    assert second["map@10"] == pytest.approx(0.5) and second["ndcg@10"] == pytest.approx(1 / LOG2_3)
    # numpy ids on either side match
    assert metrics.ranking_metrics([np.array([3, 4])], [set(np.array([4]))], k=2)["hit_rate@2"] == 1
    assert metrics.ranking_metrics([np.array([3, 4])], [set(np.array([4]))], k=1)["hit_rate@1"] == 0
    nobody = metrics.ranking_metrics([[1, 2]], [set()], k=2)
    assert nobody["users"] == 0 and math.isnan(nobody["ndcg@2"])
    with pytest.raises(ValueError):
        metrics.ranking_metrics([[1]], [{1}], k=0)
    with pytest.raises(ValueError):
        metrics.ranking_metrics([[1], [2]], [{1}], k=1)


def test_coverage_and_popularity():
    recommended = [[1, 2], [2, 3], []]
    assert metrics.catalog_coverage(recommended, 10) == pytest.approx(3 / 10)  # items 1, 2, 3
    counts = np.array([10, 20, 30, 40])
    # items 0, 1, 1, 3: (10 + 20 + 20 + 40) / 4 = 22.5, every recommendation counted
    assert metrics.mean_popularity([[0, 1], [1, 3]], counts) == pytest.approx(22.5)
    assert math.isnan(metrics.mean_popularity([[], []], counts))
    with pytest.raises(ValueError):
        metrics.catalog_coverage(recommended, 0)
