import numpy as np

from nnsam2_assets.core.labels import to_class_space
from nnsam2_assets.core.masks import clean_labels, fragment_fraction


def _labels(n: int = 4) -> np.ndarray:
    a = np.zeros((n, 8, 8), np.uint8)
    a[:, 1:4, 1:3] = 1
    a[:, 1:4, 5:7] = 2
    return a


def test_class_space_and_cleanup():
    four = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    assert to_class_space(four, 4, 2).tolist() == [0, 1, 1, 2, 2, 0]
    assert to_class_space(four, 4, 2, ignore=True).tolist() == [0, 1, 1, 2, 2, 3]
    labels = _labels()
    labels[0, 7, 7] = 1  # a stray fragment
    assert fragment_fraction(labels, 2) > 0
    cleaned = clean_labels(labels, 2)
    assert cleaned[0, 7, 7] == 0 and fragment_fraction(cleaned, 2) == 0
