"""Intensities on a common scale: an MRI stored shifted or z-scored is scaled as its magnitude image is."""

from __future__ import annotations

import numpy as np

from nnsam2_assets.core.intensities import registration_intensities


def _magnitude() -> np.ndarray:
    """Noise background from 0, muscle about 400, fat about 1000, as a magnitude MRI is."""
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 40, (4, 48, 48))
    volume[:, 10:38, 8:24] = rng.normal(400, 20, (4, 28, 16))
    volume[:, 10:38, 24:40] = rng.normal(1000, 30, (4, 28, 16))
    volume[0, 0, 0] = 0.0
    return volume


def test_a_shifted_or_z_scored_mri_is_scaled_as_its_magnitude_image():
    """Only values above 0 were the foreground: shifted by -2000 the whole volume came out 0, and z-scored
    the muscle fell to the background's 0."""
    volume = _magnitude()
    scaled = registration_intensities(volume, "mri")
    muscle, fat = scaled[:, 10:38, 8:24].mean(), scaled[:, 10:38, 24:40].mean()
    assert 0.2 < muscle < 0.5 and fat > 0.9
    for stored in (volume - 2000.0, (volume - volume.mean()) / volume.std()):
        np.testing.assert_allclose(registration_intensities(stored, "mri"), scaled, atol=1e-5)


def test_a_magnitude_image_is_scaled_as_before():
    """The floor of a magnitude image is 0 whatever its minimum: the foreground is every value above 0."""
    volume = _magnitude() + 5.0  # a noise floor above 0
    fg = volume[volume > 0]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    expected = np.clip((volume - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(registration_intensities(volume, "mri"), expected, atol=1e-5)
