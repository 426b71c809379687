"""Every path of the platform: the roots (from the environment, with defaults) and each artefact under them.

Everything lives under one home folder (``NNSAM2_HOME``, default ``./.nnsam2`` in the working directory):
the data root users drop datasets into, the storage root for artefacts, and the DuckDB file::

    <data root>/<dataset>/...                        the user's dataset folders (``ingest.convention``)
    <storage root>/datasets/<dataset>/<asset>/...    per-dataset, per-scan artefacts
    <storage root>/models/<stage>/<version>/         nnU-Net models, never overwritten in place
    <storage root>/nnunet/                           nnU-Net raw/preprocessed working dirs
    <storage root>/nnsam2.duckdb                     metrics
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "NNSAM2_HOME"
DATA_ROOT_ENV = "NNSAM2_DATA_ROOT"
STORAGE_ROOT_ENV = "NNSAM2_STORAGE_ROOT"
DUCKDB_ENV = "NNSAM2_DUCKDB"
# folders outside the data root that dataset files may point into (symlinks), os.pathsep-separated
ALLOWED_ROOTS_ENV = "NNSAM2_ALLOWED_ROOTS"
METRICS_SCHEMA = "metrics"  # the metrics tables' schema in the DuckDB file
# never name the file like its schema: DuckDB names a database after its file, and "metrics.<table>" is then
# an ambiguous catalog (``check_duckdb_name``)
DUCKDB_FILE = "nnsam2.duckdb"


def env_whole_number(name: str, default: int, what: str = "a whole number") -> int:
    """A setting of 1 or more from the environment, ``default`` when unset; anything else is refused naming the
    variable (a typo must not quietly become the default)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{name}={raw!r}: {what}, 1 or more")
    return int(raw)


def _env_path(name: str, default: Path) -> Path:
    """A path setting, ``default`` when unset or empty: an empty value (a compose file passing on an unset host
    variable) had meant the current directory, and the storage landed wherever the process started."""
    return Path(os.environ.get(name, "").strip() or default).resolve()


def home() -> Path:
    return _env_path(HOME_ENV, Path.cwd() / ".nnsam2")


def data_root() -> Path:
    return _env_path(DATA_ROOT_ENV, home() / "data")


def storage_root() -> Path:
    return _env_path(STORAGE_ROOT_ENV, home() / "storage")


def allowed_roots() -> tuple[Path, ...]:
    """Extra roots a dataset's files may resolve into besides the data root (``NNSAM2_ALLOWED_ROOTS``)."""
    raw = os.environ.get(ALLOWED_ROOTS_ENV, "")
    return tuple(Path(part).resolve() for part in raw.split(os.pathsep) if part.strip())


def duckdb_path(storage: Path | None = None) -> Path:
    """The metrics database: ``NNSAM2_DUCKDB``, else ``nnsam2.duckdb`` in the (given) storage root."""
    if storage is not None:
        return Path(storage) / DUCKDB_FILE
    path = _env_path(DUCKDB_ENV, storage_root() / DUCKDB_FILE)
    check_duckdb_name(path, DUCKDB_ENV)
    return path


def check_duckdb_name(path: Path, setting: str = "the metrics database") -> None:
    """Refuse a database file named like the metrics schema (``metrics.duckdb``, any case): every statement on
    ``metrics.<table>`` would fail as an ambiguous catalog, after the whole pipeline had run."""
    if Path(path).name.split(".")[0].casefold() == METRICS_SCHEMA:
        raise ValueError(
            f"{setting}={path}: a database file named {METRICS_SCHEMA!r} clashes with the {METRICS_SCHEMA} "
            f"schema of its tables; name it otherwise (the default is {DUCKDB_FILE})"
        )


def dagster_home() -> Path:
    return _env_path("DAGSTER_HOME", home() / "dagster_home")


SCAN_METRIC_TABLES = ("labels", "slices", "levels")


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    dataset: str

    @property
    def base(self) -> Path:
        return Path(self.root) / "datasets" / self.dataset

    def dir(self, asset: str) -> Path:
        return self.base / asset

    # ingest
    @property
    def manifest(self) -> Path:
        return self.dir("scans") / "manifest.parquet"

    def scan_image(self, scan: str) -> Path:
        return self.dir("scans") / f"{scan}.nii.gz"

    def scan_region_preview(self, scan: str) -> Path:
        return self.dir("scans") / f"{scan}_region.png"

    def scan_fat(self, scan: str) -> Path:
        return self.dir("scans") / f"{scan}_fat.nii.gz"

    def scan_expert(self, scan: str) -> Path:
        return self.dir("scans") / "experts" / f"{scan}.nii.gz"

    def scan_outputs(self, scan: str, dixon: bool) -> list[Path]:
        """Every per-scan artefact of every stage, cache entries included (to remove a scan's results). Only a
        Dixon dataset stores fat images: elsewhere ``<scan>_fat`` may be another scan's own image."""
        outputs = [
            self.scan_image(scan),
            self.scan_region_preview(scan),
            *([self.scan_fat(scan)] if dixon else []),
            self.scan_expert(scan),
        ]
        outputs += self._cache_entries(scan, ("scans", "reference_ranking"))
        return outputs + self.propagation_outputs(scan)

    def propagation_outputs(self, scan: str) -> list[Path]:
        """Every per-scan artefact from propagation on, cache entries included (to remove them when the scan's
        propagation fails: no earlier result may stand for it downstream)."""
        outputs = [
            self.frames(scan),
            self.masks(scan),
            self.confidence(scan),
            self.pseudo_label(scan),
            self.final_mask(scan),
            self.final_mask_dicom_seg(scan),
            self.final_mask_dicom_seg_refusal(scan),
            self.final_mask_canonical(scan),
        ]
        outputs += [self.scan_metric_rows(scan, table) for table in SCAN_METRIC_TABLES]
        outputs += self._cache_entries(
            scan, ("propagated_masks", "pseudo_labels", "final_masks", "scan_metrics")
        )
        return outputs + [self.slice_tables / "_keys" / f"{scan}{suffix}" for suffix in (".key", ".json")]

    def _cache_entries(self, scan: str, folders: tuple[str, ...]) -> list[Path]:
        return [
            self.dir(folder) / "_keys" / f"{scan}{suffix}"
            for folder in folders
            for suffix in (".key", ".json")
        ]

    @property
    def annotation(self) -> Path:
        return self.dir("reference_annotation") / "annotation.nii.gz"

    @property
    def annotation_meta(self) -> Path:
        return self.dir("reference_annotation") / "annotation.json"

    @property
    def annotation_clicks(self) -> Path:
        """The click prompts (pixels of the annotated slice), when the annotation was given as clicks."""
        return self.dir("reference_annotation") / "clicks.json"

    @property
    def ranking(self) -> Path:
        return self.dir("reference_ranking") / "ranking.csv"

    # propagation
    def frames(self, scan: str) -> Path:
        """SAM2's input frames of one target scan (written by the SAM2 backend only)."""
        return self.dir("propagated_masks") / "frames" / scan

    def masks(self, scan: str) -> Path:
        return self.dir("propagated_masks") / f"{scan}.nii.gz"

    def confidence(self, scan: str) -> Path:
        return self.dir("propagated_masks") / f"{scan}_confidence.parquet"

    def pseudo_label(self, scan: str) -> Path:
        return self.dir("pseudo_labels") / f"{scan}.nii.gz"

    @property
    def slice_tables(self) -> Path:
        """Cache folder of the per-scan slice tables the selection is made from."""
        return self.dir("pseudo_labels") / "slice_tables"

    @property
    def pseudo_selection(self) -> Path:
        return self.dir("pseudo_labels") / "selection.parquet"

    # supervoxels
    def supervoxels(self, scan: str) -> Path:
        """The scan's supervoxels: one slice's segments carried through the scan (uint16 labels)."""
        return self.dir("supervoxels") / f"{scan}.nii.gz"

    @property
    def supervoxel_summary(self) -> Path:
        return self.dir("supervoxels") / "summary.parquet"

    def proposal(self, scan: str, z: int) -> Path:
        """``nnsam2 propose``'s candidate segments of one slice, on the scan's original grid."""
        return self.dir("proposals") / f"{scan}_slice{z:03d}.nii.gz"

    # refinement
    def final_mask(self, scan: str) -> Path:
        return self.dir("final_masks") / f"{scan}.nii.gz"

    # corrections: the user's corrected final masks as recorded (``refinement.corrections``)
    def correction_record(self, scan: str) -> Path:
        return self.dir("corrections") / f"{scan}.json"

    def correction_labels(self, scan: str) -> Path:
        """The correction on the scan's canonical crop (our class ids)."""
        return self.dir("corrections") / f"{scan}.nii.gz"

    def final_mask_dicom_seg(self, scan: str) -> Path:
        """The final mask as a DICOM Segmentation object (scans ingested from a DICOM series only)."""
        return self.dir("final_masks") / f"{scan}.seg.dcm"

    def final_mask_dicom_seg_refusal(self, scan: str) -> Path:
        """Why a DICOM-sourced scan's final mask has no Segmentation object (an empty mask, a series no SEG can
        be made of): it stands in for the SEG while the final mask is current."""
        return self.dir("final_masks") / f"{scan}.seg.refused.txt"

    def final_mask_canonical(self, scan: str) -> Path:
        return self.dir("final_masks") / "canonical" / f"{scan}.nii.gz"

    @property
    def stage_agreement(self) -> Path:
        return self.dir("final_masks") / "stage_agreement.parquet"

    # metrics
    def scan_metric_rows(self, scan: str, table: str) -> Path:
        """One scan's cached metric rows (``labels``, ``slices`` or ``levels``), reused while its inputs hold."""
        return self.dir("scan_metrics") / f"{scan}_{table}.parquet"

    @property
    def final_summary(self) -> Path:
        """The models the final masks came from, their class count and per-scan fragmentation."""
        return self.dir("final_masks") / "summary.json"


def model_root(root: Path, stage: str) -> Path:
    return Path(root) / "models" / stage


def model_version_dir(root: Path, stage: str, version: str) -> Path:
    """One trained model of a stage; a new training-input hash is a new folder, never an overwrite."""
    return model_root(root, stage) / version


def model_pointer(root: Path, stage: str) -> Path:
    """The stage's ``current.json``: which trained model folder is current."""
    return model_root(root, stage) / "current.json"


def model_staging(root: Path, stage: str) -> Path:
    """Where a stage's training labels (and cropped images) are written before nnU-Net reads them."""
    return model_root(root, stage) / "staging"


def staged_label(root: Path, stage: str, dataset: str, scan: str) -> Path:
    return model_staging(root, stage) / dataset / f"{scan}.nii.gz"


def staged_image(root: Path, stage: str, dataset: str, scan: str) -> Path:
    """A training image cropped to its muscle box."""
    return model_staging(root, stage) / dataset / "images" / f"{scan}.nii.gz"


def nnunet_work_root(root: Path) -> Path:
    """nnU-Net's raw and preprocessed working folders."""
    return Path(root) / "nnunet"


def stage_prediction(model_dir: Path, dataset: str, scan: str) -> Path:
    return Path(model_dir) / "predictions" / dataset / f"{scan}.nii.gz"
