"""The pool the stages train on: every ingested dataset's passing scans, in the classes all of them have.

Datasets may differ in modality and class count, so the pool trains on the classes every dataset has: 4-class
only when every dataset that brings scans is 4-class, otherwise the 2-class side merge (``final_masks`` splits a 4-class
dataset's sides again). MRI and CT share one input channel normalised per case (the wrapper's channel name is
not "CT").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnsam2_assets.core import Log
from nnsam2_assets.core.labels import to_class_space
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans


@dataclass
class Pool:
    layouts: dict[str, DatasetLayout]
    n_classes: dict[str, int]
    scans: dict[str, list[str]]
    modality: dict[str, str] = field(default_factory=dict)  # how a later stage finishes its labels
    # the datasets whose scans have pseudo-labels to train on; None: every dataset that brings scans
    labelled: frozenset[str] | None = None

    @property
    def classes(self) -> int:
        # only datasets that bring labels: one whose every scan failed ingest, or whose annotation was refused
        # or never propagated, trains nothing, and must not take the 4-class datasets' muscle split from
        # the models
        bringing = [
            self.n_classes[d]
            for d, scans in self.scans.items()
            if scans and (self.labelled is None or d in self.labelled)
        ]
        return 4 if bringing and all(k == 4 for k in bringing) else 2

    def holds(self, dataset: str) -> bool:
        """Whether the dataset's labels can be put in the pool's classes: a 2-class dataset that brought no
        labels to choose them (never propagated) cannot be in a 4-class pool, and trains nothing there."""
        return self.n_classes[dataset] >= self.classes

    def items(self) -> Iterator[tuple[str, str, DatasetLayout]]:
        for dataset, scans in self.scans.items():
            for scan in scans:
                yield dataset, scan, self.layouts[dataset]

    def to_pool(self, dataset: str, labels: np.ndarray, ignore: bool = False) -> np.ndarray:
        return to_class_space(labels, self.n_classes[dataset], self.classes, ignore=ignore)


def build_pool(root: Path, datasets: list[str], spec_of: Callable[[str], DatasetSpec], log: Log) -> Pool:
    """The pool of every ingested dataset among ``datasets`` (its scans that passed ingest).

    ``spec_of`` reads a dataset's description (its class count and modality); a dataset whose folder was
    removed or broke since ingest, or whose reference scan no longer passes ingest (its annotation and held-out
    slab are on a scan that is gone), is left out, and ``log`` says so: it never stops the others' models.
    """
    layouts = {k: DatasetLayout(root, k) for k in sorted(datasets)}
    layouts = {k: v for k, v in layouts.items() if v.manifest.exists()}
    specs, scans = {}, {}
    for name in layouts:
        try:
            spec = spec_of(name)
        except Exception as exc:  # any failure to read the description leaves only this dataset out
            log(f"dataset {name} left out of the pool: {exc}")
            continue
        passing = ok_scans(layouts[name])
        if spec.reference not in passing:
            log(
                f"dataset {name} left out of the pool: its reference scan {spec.reference} did not pass ingest"
            )
            continue
        specs[name], scans[name] = spec, passing
    return Pool(
        layouts={k: v for k, v in layouts.items() if k in specs},
        n_classes={k: spec.n_classes for k, spec in specs.items()},
        scans=scans,
        modality={k: spec.modality for k, spec in specs.items()},
        labelled=frozenset(k for k in specs if any(layouts[k].pseudo_label(s).exists() for s in scans[k])),
    )
