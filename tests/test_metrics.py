"""Metric functions against hand-computed values; bootstrap CIs; Dice / HD95."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from medmim.eval.metrics import (binary_auroc, bootstrap_ci, bootstrap_cis, classification_metrics,
                                 segmentation_case_metrics, summarize_segmentation)


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert m["auroc"] == pytest.approx(0.75)
    # ranked: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): precision 1 at recall 1/2, 2/3 at recall 1
    assert m["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # argmax predictions 0, 0, 0, 1: three of four right; recalls 1 (class 0) and 1/2 (class 1)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["auroc_class1"] == pytest.approx(0.75) and m["auroc_class0"] == pytest.approx(0.75)


def test_multiclass_macro_and_per_class():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.array([[.7, .2, .1], [.2, .5, .3], [.1, .2, .7], [.3, .4, .3], [.1, .8, .1], [.5, .1, .4]])
    m = classification_metrics(y, p)
    per = [skm.roc_auc_score((y == c).astype(int), p[:, c]) for c in range(3)]
    assert [m[f"auroc_class{c}"] for c in range(3)] == pytest.approx(per)
    assert m["auroc"] == pytest.approx(np.mean(per))
    assert m["accuracy"] == pytest.approx(5 / 6)  # sample 3 (class 2) is predicted 1
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_multilabel_and_absent_class_is_nan():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])  # label 1 never present
    p = np.array([[.9, .2], [.2, .1], [.6, .7], [.4, .3]])
    m = classification_metrics(y, p, multilabel=True)
    assert m["auroc_class0"] == pytest.approx(1.0)
    assert math.isnan(m["auroc_class1"])
    assert m["auroc"] == pytest.approx(1.0)  # macro over the defined classes
    assert m["accuracy"] == pytest.approx(7 / 8)
    one_class = classification_metrics(np.array([1, 1]), np.array([[.2, .8], [.6, .4]]))
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["balanced_accuracy"])


def test_fast_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: many ties
    assert binary_auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    probs = np.stack([1 - s, s], 1)
    ci = bootstrap_ci(y, probs, "auroc", n=300, seed=0)
    assert ci["value"] == pytest.approx(skm.roc_auc_score(y, s))
    assert ci["low"] < ci["value"] < ci["high"]
    assert 0.03 < ci["high"] - ci["low"] < 0.3
    assert bootstrap_ci(y, probs, "auroc", n=300, seed=0) == ci  # seeded: repeatable
    # a callable metric; perfectly separated data -> a degenerate interval at 1
    sep = np.stack([1 - y, y], 1).astype(float)
    acc = bootstrap_ci(y, sep, lambda a, b: float((b.argmax(1) == a).mean()), n=50, seed=3)
    assert acc["low"] == acc["high"] == 1.0
    many = bootstrap_cis(y, probs, ["auroc", "ap", "accuracy", "balanced_accuracy"], n=100, seed=0)
    assert set(many) == {"auroc", "ap", "accuracy", "balanced_accuracy"}
    assert all(v["low"] <= v["value"] <= v["high"] for v in many.values())


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0, 0, 0, 0, 0, 1])
    s = np.array([.1, .2, .3, .4, .5, .9])
    ci = bootstrap_ci(y, np.stack([1 - s, s], 1), "auroc", n=200, seed=0)
    assert 0 < ci["n_valid"] < 200  # resamples without the positive are dropped, not NaN
    assert ci["low"] == ci["high"] == 1.0


def test_dice_and_hd95_hand_computed():
    target = np.zeros((1, 10, 10), int)
    pred = np.zeros((1, 10, 10), int)
    target[0, 2:4, 2:5] = 1  # 6 pixels
    pred[0, 2:4, 2:4] = 1  # 4 pixels, all inside
    m = segmentation_case_metrics(pred, target, num_classes=2)
    assert m["dice"][0][0] == pytest.approx(2 * 4 / (4 + 6))
    # a square shifted by 3 pixels along one axis: every surface distance is at most 3
    t2 = np.zeros((1, 12, 12), int)
    p2 = np.zeros((1, 12, 12), int)
    t2[0, 2:6, 2:6] = 1
    p2[0, 5:9, 2:6] = 1
    hd = segmentation_case_metrics(p2, t2, num_classes=2)["hd95"][0][0]
    assert hd == pytest.approx(3.0)
    # a class absent from both prediction and target: NaN, not counted in the mean
    m3 = segmentation_case_metrics(pred, target, num_classes=3)
    assert math.isnan(m3["dice"][0][1])
    s = summarize_segmentation(np.array(m3["dice"]), np.array(m3["hd95"]), n_boot=20)
    assert s["dice"] == pytest.approx(0.8) and s["dice_class1"] == pytest.approx(0.8)
    assert s["dice_ci_low"] == pytest.approx(0.8) and s["dice_ci_high"] == pytest.approx(0.8)
