"""Region finding on cases with known answers: a real scan shifted by known offsets, and long phantoms
(T12/L1 to below L5/S1) whose disc slices the generator knows."""

import pytest
import SimpleITK as sitk

from nnsam2_assets.ingest.region_finding import find_region
from nnsam2_assets.ingest.regions import Region
from nnsam2_assets.testing.realdata import TUM
from nnsam2_assets.testing.region_cases import long_phantom_cases, shifted_tum_cases, summary


def test_the_region_found_on_a_shifted_real_scan_moves_by_the_shift():
    cases = shifted_tum_cases(tuple(range(-8, 9, 2)))  # every shift of -8..+8: bench/region_bench.py
    assert len(cases) == 9
    for case in cases:
        assert case.found.region == case.truth, (case.name, case.found.detail)
        assert not case.found.uncertain, (case.name, case.found.detail)


@pytest.mark.parametrize("kind", ["water", "ct"])
def test_long_phantoms_find_every_disc_within_the_target_or_warn(kind):
    cases = long_phantom_cases(kind=kind)
    stats = summary(cases)
    assert stats["cases"] == 10
    assert stats["median_error"] <= 1, stats
    # beyond two slices the WARN must fire: no silent miss
    assert stats["beyond_2_unwarned"] == 0, [(c.name, c.errors, c.found.detail) for c in cases]
    assert all(case.found.region.l4_l5 is not None for case in cases)


def test_a_region_running_off_the_scan_is_clamped_and_uncertain():
    # shift by 11: the lower disc (slice 9 of the reference) sits at slice -2
    (case,) = shifted_tum_cases((11,))
    assert case.found.off_scan and case.found.uncertain
    assert min(case.found.region.bounds) == 0 and "runs off the scan" in case.found.detail


def test_a_scan_too_short_to_hold_the_reference_is_uncertain():
    (case,) = shifted_tum_cases((14,))  # 15 slices left of 29: no position overlaps enough
    assert case.found.uncertain and case.found.confidence == 0.0


def test_an_l4_l5_disc_that_rounds_onto_a_bounding_one_is_left_out_with_a_note():
    """On 12 mm slices the reference's L4/L5, one slice above its lower disc, lands on that disc's slice:
    it was dropped without a word, and the scan's level-wise numbers went missing unexplained."""
    reference = sitk.ReadImage(str(TUM / "TUM02_water.nii.gz"), sitk.sitkFloat32)
    size, spacing = list(reference.GetSize()), list(reference.GetSpacing())
    size[2], spacing[2] = size[2] * 4 // 12, 12.0
    thick = sitk.Resample(
        reference, size, sitk.Transform(), sitk.sitkLinear, reference.GetOrigin(), spacing,
        reference.GetDirection(),
    )  # fmt: skip
    found = find_region(reference, Region(9, 19, 10), thick)
    assert found.region.l4_l5 is None and not found.uncertain
    lo, hi = found.region.bounds
    assert f"L4/L5 falls on slice {lo}, not strictly between {lo} and {hi}: left out" in found.detail
