"""Sanity baselines of anomaly evaluation: image statistics against scipy / numpy, the choice on val,
the paired bootstrap comparison against scikit-learn's AUROC, and the plain verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medmim.anomaly.baselines import (STATISTICS, compare_with_baselines, comparison_markdown, comparison_rows,
                                      image_statistics, laplacian, statistic_scores)

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(3, 1, 17, 13), (2, 1, 9, 8, 7)])
def test_laplacian_matches_scipy(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = laplacian(x).numpy()
    for b in range(shape[0]):
        ref = ndimage.laplace(x[b, 0].numpy(), mode="nearest")
        assert np.allclose(ours[b, 0], ref, atol=1e-5)


def test_image_statistics_match_numpy_and_scipy():
    rng = np.random.default_rng(1)
    imgs = rng.random((4, 1, 20, 24))
    stats = image_statistics(torch.tensor(imgs, dtype=torch.float32))
    assert set(stats) == set(STATISTICS)
    flat = imgs.reshape(4, -1)
    assert np.allclose(stats["mean"].numpy(), flat.mean(1), atol=1e-6)
    assert np.allclose(stats["variance"].numpy(), flat.var(1), atol=1e-6)
    lap = np.array([(ndimage.laplace(i[0], mode="nearest") ** 2).mean() for i in imgs])
    assert np.allclose(stats["laplacian"].numpy(), lap, rtol=1e-4)
    # high-frequency energy: image minus a Gaussian blur (torch's reflect = scipy's "mirror", truncate 3.5)
    for name, sigma in (("highfreq_s0.5", 0.5), ("highfreq_s1", 1.0)):
        hf = np.array([((i[0] - ndimage.gaussian_filter(i[0], sigma, mode="mirror", truncate=3.5)) ** 2).mean()
                       for i in imgs])
        assert np.allclose(stats[name].numpy(), hf, rtol=1e-4)


def test_statistic_scores_have_both_signs():
    items = [{"image": torch.full((1, 8, 8), v)} for v in (0.1, 0.5, 0.9)]
    items[1]["image"][0, 2, 2] = 1.0  # some texture in one image
    s = statistic_scores(items, batch_size=2)
    assert set(s) == {f"{sign}{n}" for n in STATISTICS for sign in "+-"}
    assert np.allclose(s["+mean"], -s["-mean"]) and s["+mean"][0] < s["+mean"][2]
    assert s["+laplacian"][1] > 0 and s["+laplacian"][0] == 0


def test_comparison_chooses_on_val_and_says_when_the_detector_loses():
    rng = np.random.default_rng(0)
    n = 300
    y_val, y_test = rng.random(n) < 0.5, rng.random(n) < 0.5
    # "stat_a" is the best baseline on val, "stat_b" would be the best on test: the choice is val's
    val = {"det": y_val + rng.normal(0, 1.5, n), "stat_a": y_val + rng.normal(0, 0.5, n),
           "stat_b": y_val + rng.normal(0, 3.0, n)}
    test = {"det": y_test + rng.normal(0, 1.5, n), "stat_a": y_test + rng.normal(0, 5.0, n),
            "stat_b": y_test + rng.normal(0, 0.4, n)}
    cmp = compare_with_baselines("det", y_val, val, y_test, test, n_boot=300, seed=0)
    assert cmp["best_baseline"] == "stat_a"
    assert cmp["best_baseline_on_eval"]["name"] == "stat_b"
    for k in test:
        assert cmp["candidates"][k]["auroc"] == pytest.approx(roc_auc_score(y_test, test[k]))
        assert cmp["candidates"][k]["val_auroc"] == pytest.approx(roc_auc_score(y_val, val[k]))
    d = cmp["difference"]
    assert d["value"] == pytest.approx(roc_auc_score(y_test, test["det"]) - roc_auc_score(y_test, test["stat_a"]))
    assert d["low"] <= d["value"] <= d["high"]
    assert cmp["detector"]["low"] <= cmp["detector"]["value"] <= cmp["detector"]["high"]
    # the detector (noise 1.5) beats stat_a on test (noise 5) but loses to stat_b: the margin says so
    assert cmp["beats_best_baseline"] and cmp["verdict"].startswith("detector BEATS")
    assert cmp["best_baseline_on_eval"]["margin"] < 0
    assert "does NOT beat stat_b" in cmp["verdict"]  # said plainly, though stat_b was not chosen on val
    md = comparison_markdown(cmp, "test")
    assert "stat_b 0." in md and "chosen on val" in md

    # a detector that is pure noise against a good baseline: the output says so plainly
    test_bad = {**test, "det": rng.normal(0, 1, n)}
    val_bad = {**val, "det": rng.normal(0, 1, n)}
    cmp2 = compare_with_baselines("det", y_val, val_bad, y_test, test_bad, n_boot=300, seed=0)
    assert not cmp2["beats_best_baseline"] and "does NOT" in cmp2["verdict"]
    rows = comparison_rows(cmp2)
    assert rows[0]["score"] == "det" and rows[0]["role"] == "detector"
    assert [r["role"] for r in rows].count("best baseline (val)") == 1


def test_comparison_needs_a_baseline():
    with pytest.raises(ValueError, match="baseline"):
        compare_with_baselines("det", [0, 1], {"det": np.array([0, 1])}, [0, 1], {"det": np.array([0, 1])})


def test_html_report_shows_detector_beside_best_baseline():
    from medmim.eval.report import _anomaly_html

    rng = np.random.default_rng(2)
    y = rng.random(200) < 0.5
    scores = {"det": y + rng.normal(0, 2.0, 200), "+mean": y + rng.normal(0, 0.5, 200)}
    cmp = compare_with_baselines("det", y, scores, y, scores, n_boot=200)
    metrics = {"primary_error": "texture", "texture": {"image_auroc": cmp["detector"]["value"]}, "baselines": cmp}
    html = _anomaly_html([("scores_test", metrics)])
    assert 'id="anomaly-baselines"' in html and "+mean" in html and "does NOT beat" in html
    assert f"{cmp['baseline']['value']:.3f} ({cmp['baseline']['low']:.3f}" in html
    assert "scores_test (primary)</td><td>texture" in html
