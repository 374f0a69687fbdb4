import pytest
import torch

from raugment.core import schema as S
from raugment.lib.evaluate import evaluate, overall, per_class_improvement, results_table, score_batch


def test_score_batch_counts_top1_and_top5_per_class():
    logits = torch.tensor([
        [9.0, 1, 0, 0, 0, 0, 0],   # label 0, top1 hit
        [9.0, 8, 7, 6, 5, 4, 0],   # label 6, lowest score: miss in top1 and top5
        [1.0, 9, 8, 7, 6, 5, 0],   # label 5: top5 hit only
        [0.0, 0, 9, 0, 0, 0, 0],   # label 2: hit
    ])
    labels = torch.tensor([0, 6, 5, 2])
    c = score_batch(logits, labels, num_classes=7)
    assert c[0].tolist() == [1, 1, 1]
    assert c[6].tolist() == [1, 0, 0]
    assert c[5].tolist() == [1, 0, 1]
    assert c[2].tolist() == [1, 1, 1]
    assert c[1].tolist() == [0, 0, 0]
    assert overall(c.tolist()) == {"n": 4, "top1": 0.5, "top5": 0.75}


def test_top5_with_fewer_than_five_classes_is_always_a_hit():
    c = score_batch(torch.tensor([[0.0, 1, 2]]), torch.tensor([0]), num_classes=3)
    assert c[0].tolist() == [1, 0, 1]


def test_evaluate_sums_batches_like_one_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6)
    x, y = torch.randn(20, 4), torch.randint(0, 6, (20,))
    split = evaluate(model, [(x[:7], y[:7]), (x[7:], y[7:])], 6)
    whole = score_batch(model(x).detach(), y, 6)
    assert torch.equal(split, whole)


def test_evaluate_competes_only_over_the_classes_given():
    # a model that always prefers class 2, scored where class 2 was left out of the study
    model = torch.nn.Linear(2, 3, bias=True)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 1.0, 5.0]))
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])
    assert evaluate(model, [(x, y)], 3)[:, 1].sum().item() == 0  # all go to class 2
    kept = evaluate(model, [(x, y)], 3, classes=[0, 1])
    assert kept[:, 1].tolist() == [0, 2, 0]  # class 1 is now the top among 0 and 1


def _results(accs):
    return results_table([[10, round(a * 10), 10] for a in accs], [f"c{i}" for i in range(len(accs))])


def test_results_table_schema_and_empty_class():
    t = results_table([[4, 2, 3], [0, 0, 0]], ["a", "b"])
    assert t.schema == S.RESULTS_PER_CLASS
    assert t.column(S.ACC_TOP1).to_pylist() == [0.5, 0.0]
    assert t.column(S.ACC_TOP5).to_pylist() == [0.75, 0.0]


def test_per_class_improvement_averages_repeats_and_subtracts_baseline():
    aug = [_results([0.6, 0.2]), _results([0.8, 0.4])]   # means 0.7, 0.3
    base = _results([0.5, 0.5])
    t = per_class_improvement(aug, base)
    assert t.column(S.IMPROVEMENT).to_pylist() == pytest.approx([0.2, -0.2])
    assert t.column(S.BASELINE_TOP1).to_pylist() == pytest.approx([0.5, 0.5])
    assert t.column(S.CLASS_NAME).to_pylist() == ["c0", "c1"]


def test_per_class_improvement_refuses_different_class_sets():
    with pytest.raises(ValueError, match="different classes"):
        per_class_improvement(_results([0.5, 0.5, 0.1]), _results([0.5, 0.5]))
