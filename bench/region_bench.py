"""Region finding, measured: slice error per disc (L5/S1, L3/L4, L4/L5) on cases with known answers.

    python -m bench.region_bench

* TUM02 shifted by -8..+8 slices (cut off or padded at its lower end, stored with its own origin);
* long phantoms (T12/L1 to below L5/S1), 10 per cohort seed, Dixon water, CT and T2 renderings.

Target: median error <= 1 slice, max <= 2; beyond that the scan's WARN must fire ("beyond_2_unwarned" 0).
"""

from __future__ import annotations

import time

from bench._common import cpu_model
from nnsam2_assets.testing.region_cases import long_phantom_cases, shifted_tum_cases, summary


def main() -> None:
    print(f"CPU: {cpu_model()}")
    rows = []
    t0 = time.perf_counter()
    cases = shifted_tum_cases()
    rows.append(("TUM02 shifted -8..+8", summary(cases), (time.perf_counter() - t0) / len(cases)))
    for seed in (7, 11, 23):
        for kind in ("water", "ct", "t2"):
            t0 = time.perf_counter()
            cases = long_phantom_cases(seed=seed, kind=kind)
            rows.append(
                (f"long phantoms seed {seed} {kind}", summary(cases), (time.perf_counter() - t0) / len(cases))
            )
    print(
        f"{'cases':32s} {'n':>3s} {'median':>6s} {'max':>4s} {'warned':>6s} {'>2 unwarned':>11s} {'s/scan':>6s}"
    )
    for name, s, per_scan in rows:
        print(
            f"{name:32s} {s['cases']:3d} {s['median_error']:6.1f} {s['max_error']:4.0f} {s['warned']:6d} "
            f"{s['beyond_2_unwarned']:11d} {per_scan:6.2f}"
        )


if __name__ == "__main__":
    main()
