import numpy as np
import pytest

from scfmbench.evaluation.metrics import classification_metrics, delta


def test_hand_made_example():
    truth = ["A", "A", "A", "B", "B", "C"]
    pred = ["A", "A", "B", "B", "B", "A"]
    m = classification_metrics(np.array(truth), np.array(pred), classes=["A", "B", "C"])
    assert m.accuracy == pytest.approx(4 / 6)
    # A: P=2/3 R=2/3 F1=2/3; B: P=2/3 R=1 F1=0.8; C: 0
    assert m.per_class["A"]["f1"] == pytest.approx(2 / 3)
    assert m.per_class["B"]["precision"] == pytest.approx(2 / 3)
    assert m.per_class["B"]["recall"] == pytest.approx(1.0)
    assert m.per_class["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m.weighted_f1 == pytest.approx((3 * 2 / 3 + 2 * 0.8) / 6)
    assert m.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_delta():
    assert delta(0.978, 0.613)["abs"] == pytest.approx(0.365)
    assert delta(0.978, 0.613)["rel"] == pytest.approx(0.365 / 0.613)
    assert delta(0.5, 0.0)["rel"] is None


def test_macro_f1_averages_every_training_class_like_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    truth = np.array(["A", "A", "A", "B", "B", "B"])  # D is a training class with no test cell
    pred = np.array(["A", "A", "B", "B", "B", "<unassigned>"])
    classes = ["A", "B", "C", "D"]
    m = classification_metrics(truth, pred, classes=classes)
    expected = f1_score(truth, pred, labels=classes, average="macro", zero_division=0)
    assert m.macro_f1 == pytest.approx(expected)
    # A: 0.8, B: 2/3, C and D never predicted and absent: 0 each
    assert m.macro_f1 == pytest.approx((0.8 + 2 / 3) / 4)
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 2 / 3) / 2)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, pred))
    assert m.to_dict()["balanced_accuracy"] == m.balanced_accuracy
