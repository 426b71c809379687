"""Advisory reference ranking: the medoid ranks first, an outlying scan last, and the standing rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.demo.phantom import generate_phantom
from nnsam2_assets.ingest.ranking import rank_references, reference_standing


def _cohort() -> dict[str, np.ndarray]:
    def t2(seed: int) -> np.ndarray:
        img = generate_phantom(seed=seed, shape_yx=(64, 64), spacing=(3.2, 3.2, 6.0)).images["t2"]
        return sitk.GetArrayFromImage(img)

    vols = {f"s{i}": t2(i) for i in range(4)}
    vols["outlier"] = vols["s0"].max() - vols["s0"]  # inverted contrast: nothing like the others
    return vols


def test_an_inverted_scan_ranks_last_and_ranks_are_ordered_by_mean_distance():
    ranking = rank_references(_cohort(), "t2")
    assert list(ranking["rank"]) == [1, 2, 3, 4, 5]
    assert ranking.iloc[-1]["scan"] == "outlier"
    assert ranking["mean_distance"].is_monotonic_increasing


def test_reference_standing_is_representative_in_the_better_half_only():
    ranking = pd.DataFrame({"scan": ["a", "b", "c", "d", "e"], "rank": range(1, 6)})
    assert reference_standing(ranking, "a") == (1, True)
    assert reference_standing(ranking, "c") == (3, True)  # ceil(5 / 2) = 3
    assert reference_standing(ranking, "d") == (4, False)
    assert reference_standing(ranking, "missing") == (-1, False)
    assert reference_standing(ranking.iloc[:1], "a") == (1, True)
