"""Pure parts of the fine-tuning stage: LR scaling, early stop, checkpoint policy, splits, clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raugment.lib.finetuned.artifact import BEST_TRAIN, BEST_VAL
from raugment.stages.finetune.kmeans import cluster_within_classes
from raugment.stages.finetune.policy import (
    EarlyStopper,
    EpochRecord,
    checkpoint_tags,
    epoch_order,
    scaled_lr,
    split_train_val,
)
from raugment.stages.finetune.stage import plan_rows


def test_learning_rate_scales_with_the_square_root_of_the_global_batch():
    assert scaled_lr(1e-3, 8, 8) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 32, 8) == pytest.approx(2e-3)       # 4x batch -> 2x LR
    assert scaled_lr(5e-3, 2, 8) == pytest.approx(2.5e-3)      # 1/4 batch -> 1/2 LR
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 0, 8)


def test_early_stopper_waits_patience_epochs_without_improvement():
    stop = EarlyStopper(patience=2)
    assert [stop.update(v) for v in (1.0, 0.9, 0.95, 0.91)] == [False, False, False, True]
    again = EarlyStopper(patience=2)
    again.load(stop.state())
    assert again.best == 0.9 and again.bad_epochs == 2
    assert EarlyStopper(patience=1, min_delta=0.1).update(math.inf) is True  # no improvement at all


def test_checkpoint_policy_keeps_best_losses_and_listed_epochs():
    hist = [EpochRecord(1, 1.0, 1.0), EpochRecord(2, 0.8, 0.7), EpochRecord(3, 0.6, 0.9),
            EpochRecord(4, 0.7, 0.7), EpochRecord(5, 0.9, 1.2)]
    tags = checkpoint_tags(hist, keep_epochs=[1, 2, 3])
    assert tags == {1: ["epoch_001"], 2: [BEST_VAL, "epoch_002"], 3: [BEST_TRAIN, "epoch_003"]}
    assert 4 not in tags and 5 not in tags  # val tie at epoch 4 keeps the earlier epoch 2
    assert checkpoint_tags([], [1]) == {}


def test_validation_split_is_stratified_complete_and_reproducible():
    groups = [0] * 10 + [1] * 3 + [2]
    a = split_train_val(groups, 0.2, seed=3)
    assert sorted(a.train + a.val) == list(range(len(groups)))
    assert not set(a.train) & set(a.val)
    val_groups = [groups[i] for i in a.val]
    assert val_groups.count(0) == 2 and val_groups.count(1) == 1 and 2 not in val_groups
    assert split_train_val(groups, 0.2, seed=3) == a
    assert split_train_val(groups, 0.2, seed=4).val != a.val
    assert split_train_val(groups, 0.0, seed=0).val == []


def test_epoch_order_gives_every_rank_the_same_number_of_full_batches():
    order = epoch_order(n_items=11, world_size=2, batch_size=3, epoch=1, seed=0)
    assert order.shape == (2, 2, 3)
    assert set(order.ravel()) == set(range(11))
    assert not np.array_equal(order, epoch_order(11, 2, 3, epoch=2, seed=0))  # reshuffled per epoch


def test_plan_rows_indexes_classes_and_clusters():
    labels = [0, 0, 0, 1, 1, 2]
    clusters = [0, 1, 1, 0, 0, 0]
    names = {0: "tiger shark, Galeocerdo cuvieri", 1: "tench", 2: "goldfish"}
    rows, per_image = plan_rows(labels, names, clusters, pseudowords=True)
    assert [(r.label, r.cluster, r.n_images) for r in rows] == [(0, 0, 1), (0, 1, 2), (1, 0, 2), (2, 0, 1)]
    assert per_image.tolist() == [0, 1, 1, 2, 2, 3]
    assert [r.token for r in rows] == ["<raug-0>", "<raug-0>", "<raug-1>", "<raug-2>"]
    rows, _ = plan_rows(labels, names, [0] * 6, pseudowords=False)
    assert len(rows) == 3 and {r.token for r in rows} == {""}


def test_kmeans_gives_k_clusters_per_class_and_assigns_every_image():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    feats, labels, truth = [], [], []
    for label in (0, 1):
        for c in range(3):
            feats.append(centres[c] + rng.normal(size=(6, 8)) * 0.1)
            labels += [label] * 6
            truth += [c] * 6
    labels.append(2)  # a class with a single image: one cluster
    feats.append(rng.normal(size=(1, 8)))
    feats = np.concatenate(feats)
    clusters = cluster_within_classes(np.array(labels), feats, k=3, seed=0)
    labels = np.array(labels)
    for label in (0, 1):
        got = clusters[labels == label]
        assert sorted(set(got)) == [0, 1, 2]
        # the clustering recovers the planted groups (same partition, any numbering)
        pairs = set(zip(got, np.array(truth)[labels[:-1] == label]))
        assert len(pairs) == 3
    assert clusters[labels == 2].tolist() == [0]
    assert (cluster_within_classes(labels, feats, k=1) == 0).all()
    with pytest.raises(ValueError):
        cluster_within_classes(labels, feats, k=0)
