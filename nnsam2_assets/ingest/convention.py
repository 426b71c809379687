"""The on-disk dataset convention, its validation, and label mapping.

One folder per dataset under a data root; the folder name is the Dagster partition key::

    <data_root>/<dataset>/
      dataset.yaml            modality, sequence, reference scan, label map
      scans/<id>.nii.gz       one scan (or scans/<id>/ = a DICOM series, or <id>_water/<id>_fat for Dixon)
      annotation.nii.gz       one annotated axial slice on the reference scan's grid (or a Slicer
                              annotation.seg.nrrd, ``ingest.slicer``; or click points on one slice,
                              annotation.mrk.json / annotation.csv, ``ingest.clicks``)
      experts/<id>.nii.gz     optional expert labels (or <id>.seg.nrrd)
      corrections/<id>.nii.gz optional: the scan's final mask as the user corrected it (or .seg.nrrd)
      regions.csv             optional per-scan regions: scan,first_slice,last_slice[,l4_l5] (``ingest.regions``)

The region is the L3/L4 to L5/S1 stretch: ``first_slice`` and ``last_slice`` are the axial slices of those
two discs (inclusive, either order, indices in the file's own slice order) and the optional ``l4_l5`` the
slice of the disc between them, which splits the region into two level segments. The user marks it once, on
the reference, as dataset.yaml's ``region`` (the same three keys); every other scan's region is found from
it (``ingest.region_finding``), unless regions.csv has a row for the scan, which wins. Without either, a
scan is used whole.

A problem with the dataset as a whole (its description, annotation or region table) raises
:class:`DatasetError`; a problem with one scan's files excludes that scan only (``DatasetSpec.excluded``,
reported in the manifest), so one bad file never refuses the cohort. Every message names the file.

Every file is read through its resolved path, which must lie under the data root or under one of the
``NNSAM2_ALLOWED_ROOTS`` (``core.layout.allowed_roots``). Symlinks are followed and allowed as long as their
target stays inside those roots; a link to ``/etc/passwd`` or another user's folder is refused.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from nnsam2_assets.core.imaging import NIFTI_SUFFIXES, ScanError
from nnsam2_assets.core.labels import CLASSES_2, CLASSES_4, class_names
from nnsam2_assets.core.layout import allowed_roots
from nnsam2_assets.ingest.errors import DatasetError
from nnsam2_assets.ingest.regions import Region, RegionTable, parse_region, read_regions
from nnsam2_assets.ingest.slicer import SEG_SUFFIX

MODALITIES = ("mri", "ct")
SEQUENCES = ("dixon", "t1", "t2", "ct", "other")

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # fullmatch: "$" would let a final newline through
_SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_dataset_key(name: str) -> str:
    """Partition keys are slugs: Dagster keys with ``,`` or ``|`` break backfills; ``/`` or ``..`` escape the root.
    No ``__`` either: it joins a dataset and a scan into one training case of the pooled models, and with it in
    a dataset's name two cases could share an id (dataset ``a`` scan ``b__c``, dataset ``a__b`` scan ``c``)."""
    if not _SLUG.fullmatch(name or "") or "__" in name:
        raise DatasetError(
            f"invalid dataset name {name!r}: use 1-64 characters of lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit (no '/', '..', ',', '|', '__' or spaces)"
        )
    return name


def is_valid_scan_id(scan_id: str) -> bool:
    return bool(_SCAN_ID.fullmatch(scan_id)) and ".." not in scan_id


def owns_outputs(scan_id: str, dixon: bool) -> bool:
    """Whether ``scan_id`` names stored files of its own: a valid id, and in a Dixon dataset not one ending in
    ``_fat`` in any case (those are the stored fat images of the scan before it: removing an excluded
    ``x_fat``'s outputs had deleted scan ``x``'s fat image)."""
    return is_valid_scan_id(scan_id) and not (dixon and scan_id.casefold().endswith("_fat"))


def validate_scan_id(scan_id: str, path: Path) -> str:
    if not is_valid_scan_id(scan_id):
        raise ScanError(path, f"invalid scan id {scan_id!r}: use letters, digits, '.', '-' or '_'")
    return scan_id


@dataclass(frozen=True)
class ScanSource:
    scan_id: str
    image: Path  # the segmented image (water for Dixon); a file or a DICOM folder
    fat: Path | None = None
    expert: Path | None = None
    correction: Path | None = None  # corrections/<id>.nii.gz or .seg.nrrd: the user's corrected final mask


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: Path
    modality: str
    sequence: str
    reference: str
    label_map: dict[int, int]  # user's label id -> our class id
    n_classes: int
    annotation: Path
    scans: dict[str, ScanSource]
    regions: dict[str, Region] = field(default_factory=dict)  # given regions: regions.csv, dataset.yaml
    description: str = ""
    # scans that cannot be ingested (bad name, bad region row, file outside the roots): name -> reason
    excluded: dict[str, str] = field(default_factory=dict)
    # dataset-level problems that exclude nothing (e.g. a regions.csv row for a scan that does not exist)
    warnings: tuple[str, ...] = ()
    region_rows: dict[str, int] = field(default_factory=dict)  # scan -> its regions.csv line
    # the reference's region (its regions.csv row, else dataset.yaml's): the one other scans' are found from
    reference_region: Region | None = None
    segment_names: dict[str, int] = field(default_factory=dict)  # a .seg.nrrd segment's name -> class id

    def confined(self, path: Path) -> Path:
        """``path`` resolved, if it lies under the data root or an allowed root (else a ScanError naming it):
        for the files read after the description, an expert's labels or a user's correction."""
        return confine(path, readable_roots(self.folder.parent))

    def region_file(self, scan: str) -> str:
        """The file a given region comes from: its regions.csv row wins over dataset.yaml's region."""
        return "regions.csv" if scan in self.region_rows else "dataset.yaml"

    def region_origin(self, scan: str) -> str:
        """Where a given region comes from, for messages: the regions.csv row or dataset.yaml's key."""
        where = "row " + str(self.region_rows[scan]) if scan in self.region_rows else "key region"
        return f"{self.folder / self.region_file(scan)} {where}"

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.n_classes)

    @property
    def is_dixon(self) -> bool:
        return self.sequence == "dixon"


def list_dataset_folders(data_root: Path) -> list[Path]:
    """Folders under the data root that carry a dataset.yaml (valid names or not: the caller reports)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        return []
    return sorted(p for p in data_root.iterdir() if p.is_dir() and (p / "dataset.yaml").is_file())


def dataset_folder(data_root: Path, name: str) -> Path:
    validate_dataset_key(name)
    folder = (Path(data_root) / name).resolve()
    if folder.parent != Path(data_root).resolve():
        raise DatasetError(f"dataset {name!r} resolves outside the data root {data_root}")
    return folder


MAX_YAML_BYTES = 1 << 16  # a dataset.yaml is a few hundred bytes; the sensor reads every one on every tick


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without anchors and aliases: nested aliases let a 500-byte file expand to gigabytes
    when read (a "billion laughs"), and a dataset description never needs them."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted here", mark)
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        # YAML 1.1 reads 010 as 8, 0x1A as 26 and 1:20 as 80: a slice index, label id or scan id written so
        # would be silently another one. Only plain decimals are numbers; the rest stay the text written,
        # which the region and label-map parsers read as decimal and scan ids keep as they are ("007").
        text = self.construct_scalar(node)
        return int(text) if _PLAIN_DECIMAL.fullmatch(text) else text


_PLAIN_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_NoAliasLoader.add_constructor("tag:yaml.org,2002:int", _NoAliasLoader.construct_yaml_int)


def read_dataset_yaml(path: Path) -> dict:
    """dataset.yaml as a mapping, refused when too large, malformed or using aliases."""
    if not path.is_file():  # a pipe would block every sensor tick's read
        raise DatasetError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise DatasetError(
            f"{path}: {size:,} bytes, more than a dataset description needs ({MAX_YAML_BYTES:,})"
        )
    try:
        cfg = yaml.load(path.read_text(), Loader=_NoAliasLoader) or {}  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc})") from exc
    except RecursionError as exc:
        # thousands of nested brackets: it had escaped every caller and stopped every dataset's tick
        raise DatasetError(f"{path}: nested too deeply to be a dataset description") from exc
    except ValueError as exc:  # a date that does not exist, an integer of thousands of digits
        raise DatasetError(f"{path}: a value cannot be read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise DatasetError(f"{path}: expected a mapping of keys")
    return cfg


def load_dataset(data_root: Path, name: str, require_annotation: bool = True) -> DatasetSpec:
    """The dataset's description; ``require_annotation=False`` reads one that is not annotated yet
    (``nnsam2 propose`` helps make the annotation). A file or folder of it the process may not read is the
    dataset's error, so a sensor, the sweep or ``nnsam2 run`` refuses this dataset alone and goes on."""
    try:
        return _read_dataset(data_root, name, require_annotation)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else Path(data_root) / name
        raise DatasetError(f"{os.fsdecode(where)}: cannot be read ({exc.strerror or exc})") from exc


def _read_dataset(data_root: Path, name: str, require_annotation: bool) -> DatasetSpec:
    folder = dataset_folder(data_root, name)
    cfg_path = folder / "dataset.yaml"
    if not cfg_path.is_file():
        raise DatasetError(f"{cfg_path}: missing dataset description")
    roots = readable_roots(data_root)
    confine_dataset_file(cfg_path, roots)
    cfg = read_dataset_yaml(cfg_path)

    modality = str(cfg.get("modality", "")).lower()
    if modality not in MODALITIES:
        raise DatasetError(f"{cfg_path}: modality must be one of {MODALITIES}, got {cfg.get('modality')!r}")
    sequence = str(cfg.get("sequence", "ct" if modality == "ct" else "other")).lower()
    if sequence not in SEQUENCES:
        raise DatasetError(f"{cfg_path}: sequence must be one of {SEQUENCES}, got {sequence!r}")
    if (sequence == "ct") != (modality == "ct"):
        raise DatasetError(f"{cfg_path}: sequence {sequence!r} does not fit modality {modality!r}")

    label_map, segment_names, n_classes = parse_label_map(cfg.get("label_map"), cfg_path)
    scans, excluded = discover_scans(folder, is_dixon=sequence == "dixon", roots=roots)
    regions_path = folder / "regions.csv"
    regions, warnings, table = {}, [], RegionTable({}, {}, {})
    if regions_path.exists() or regions_path.is_symlink():  # a broken link is refused, not taken as no table
        confine_dataset_file(regions_path, roots)
        table = read_regions(regions_path)
        regions = {scan: region for scan, region in table.regions.items() if scan in scans}
        excluded.update({scan: why for scan, why in table.errors.items() if scan in scans})
        warnings += [why for scan, why in table.errors.items() if scan not in scans and scan not in excluded]
        warnings += [
            f"{regions_path} row {table.rows[scan]}: no scan named {scan!r} in {folder / 'scans'}; row ignored"
            for scan in table.regions
            if scan not in scans and scan not in excluded
        ]
    scans = {scan_id: source for scan_id, source in scans.items() if scan_id not in excluded}
    read = [p for source in scans.values() for p in (source.expert, source.correction) if p is not None]
    warnings += _unmatched_files(folder, set(scans) | set(excluded), read)
    reference = str(cfg.get("reference", ""))
    reference_region = None
    if cfg.get("region") is not None:
        if not isinstance(cfg["region"], dict):
            raise DatasetError(
                f"{cfg_path} key region: expected first_slice, last_slice and optionally l4_l5 (slice indices)"
            )
        # a regions.csv row for the reference wins, for its own crop and for the region the others are found
        # from: the two had differed, and every found region was placed from discs the user had corrected
        reference_region = regions.setdefault(
            reference, parse_region(cfg["region"], f"{cfg_path} key region")
        )
    else:  # the reference's row alone is its region too: without it the other scans had stayed whole, unsaid
        reference_region = regions.get(reference)
    if reference in excluded:
        raise DatasetError(f"{cfg_path}: reference scan {reference!r} is excluded: {excluded[reference]}")
    if reference not in scans:
        raise DatasetError(f"{cfg_path}: reference scan {reference!r} not found among scans {sorted(scans)}")
    annotation = folder / str(cfg.get("annotation", _default_annotation(folder)))
    if not annotation.exists() and require_annotation:
        raise DatasetError(f"{annotation}: missing the reference annotation (one annotated axial slice)")
    if annotation.exists():
        confine_dataset_file(annotation, roots)
    return DatasetSpec(
        name=name,
        folder=folder,
        modality=modality,
        sequence=sequence,
        reference=reference,
        label_map=label_map,
        segment_names=segment_names,
        n_classes=n_classes,
        annotation=annotation,
        scans=scans,
        regions=regions,
        description=str(cfg.get("description", "")),
        excluded=excluded,
        warnings=tuple(warnings),
        region_rows={scan: table.rows[scan] for scan in regions if scan in table.rows},
        reference_region=reference_region,
    )


def _default_annotation(folder: Path) -> str:
    """annotation.nii.gz, else the first of annotation.seg.nrrd, annotation.mrk.json (Slicer click points)
    and annotation.csv (click points) that is there."""
    for name in ("annotation.nii.gz", f"annotation{SEG_SUFFIX}", "annotation.mrk.json", "annotation.csv"):
        if (folder / name).exists():
            return name
    return "annotation.nii.gz"


def parse_label_map(raw: object, cfg_path: Path) -> tuple[dict[int, int], dict[str, int], int]:
    """Label ids (integer keys) and 3D Slicer segment names (any other key) -> our class ids, and the
    number of classes."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{cfg_path}: label_map must map label ids in your files to class names")
    names = {str(v) for v in raw.values()}
    if names <= set(CLASSES_4):
        classes = CLASSES_4
    elif names <= set(CLASSES_2):
        classes = CLASSES_2
    else:
        raise DatasetError(
            f"{cfg_path}: label_map names {sorted(names)} must all be 2-class {CLASSES_2} or all 4-class {CLASSES_4}"
        )
    if set(names) != set(classes):
        raise DatasetError(f"{cfg_path}: label_map lacks classes {sorted(set(classes) - names)}")
    mapping: dict[int, int] = {}
    segment_names: dict[str, int] = {}
    for key, value in raw.items():
        target = classes.index(str(value)) + 1
        if isinstance(key, str) and not re.fullmatch(r"\s*[+-]?[0-9]+\s*", key):
            segment_names[key] = target  # a .seg.nrrd segment's name
            continue
        if not isinstance(key, (int, str)) or isinstance(key, bool):  # YAML reads 1.5 as a float, yes as True
            raise DatasetError(f"{cfg_path}: label_map key {key!r} must be a whole-number label id")
        user_id = int(key)
        if user_id <= 0:
            raise DatasetError(f"{cfg_path}: label id {user_id} must be positive (0 is background)")
        if user_id in mapping:  # "1" and 1 are one id: the first class would be left without one
            raise DatasetError(f"{cfg_path}: label id {user_id} appears twice in label_map")
        mapping[user_id] = target
    return mapping, segment_names, len(classes)


def readable_roots(data_root: Path) -> tuple[Path, ...]:
    """The folders files may resolve into: the data root and the configured allowed roots."""
    return (Path(data_root).resolve(), *allowed_roots())


def confine(path: Path, roots: tuple[Path, ...]) -> Path:
    """The resolved path of ``path`` (every file inside, for a DICOM folder), if it lies under ``roots``."""
    path = Path(path)
    # the path itself first, lazily after it: a link to / was refused only after a walk of the whole file
    # system, on every sensor tick
    for target in itertools.chain([path], _files_below(path)):
        resolved = target.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ScanError(
                target,
                f"resolves to {resolved}, outside the data root {roots[0]}"
                + (f" and the allowed roots {', '.join(map(str, roots[1:]))}" if len(roots) > 1 else "")
                + "; copy the file in, or list its folder in NNSAM2_ALLOWED_ROOTS",
            )
    return path.resolve()


def _files_below(path: Path) -> Iterator[Path]:
    """Every file and link under a folder, listed only when asked for."""
    if path.is_dir():
        yield from (p for p in path.rglob("*") if p.is_file() or p.is_symlink())


def confine_dataset_file(path: Path, roots: tuple[Path, ...]) -> Path:
    try:
        return confine(path, roots)
    except ScanError as exc:
        raise DatasetError(str(exc)) from exc


def _dixon_stem(stem: str) -> str:
    """The scan id part of a Dixon file name: one ``_water`` or ``_fat`` suffix off, never both."""
    for suffix in ("_water", "_fat"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _dixon_scan_id(scan_id: str, entry: Path) -> str:
    """A Dixon scan's id, which may not end in ``_fat``: scan ``x``'s fat image is stored as ``x_fat``, and
    a scan ``x_fat`` would overwrite it (each then measured the other's image)."""
    scan_id = validate_scan_id(scan_id, entry)
    if scan_id.casefold().endswith("_fat"):
        raise ScanError(
            entry,
            f"a Dixon scan id may not end in '_fat' ({scan_id!r}): rename the pair, e.g. {scan_id[:-4]}-fat",
        )
    return scan_id


def discover_scans(
    folder: Path, is_dixon: bool, roots: tuple[Path, ...]
) -> tuple[dict[str, ScanSource], dict[str, str]]:
    """The dataset's scans, and the entries of ``scans/`` that cannot be scans (name -> reason).

    A badly named or escaping file excludes itself only; the dataset fails only when no scan is left."""
    scan_dir = folder / "scans"
    if not scan_dir.is_dir():
        raise DatasetError(f"{scan_dir}: missing scans folder")
    experts, corrections = folder / "experts", folder / "corrections"
    found: dict[str, Path] = {}
    fats: dict[str, Path] = {}
    excluded: dict[str, str] = {}
    for entry in sorted(scan_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            stem = entry.name
        elif entry.name.endswith(NIFTI_SUFFIXES):
            stem = _strip_nifti(entry.name)
        elif entry.is_symlink() and not entry.exists():
            excluded[entry.name] = f"{entry}: broken symbolic link"
            continue
        else:
            continue
        try:
            confine(entry, roots)
            if not is_dixon:
                _claim(found, validate_scan_id(stem, entry), entry)
            elif stem.endswith("_water"):
                _claim(found, _dixon_scan_id(_dixon_stem(stem), entry), entry)
            elif stem.endswith("_fat"):
                _claim(fats, _dixon_scan_id(_dixon_stem(stem), entry), entry)
            else:
                raise ScanError(entry, "Dixon scans must be named <id>_water / <id>_fat")
        except ScanError as exc:
            name = _dixon_stem(stem) if is_dixon else stem
            excluded[name] = str(exc)
    for scan_id in sorted(set(fats) - set(found) - set(excluded)):
        excluded[scan_id] = f"{fats[scan_id]}: fat image without a matching {scan_id}_water image"
    for name, why in _case_clashes({**fats, **found}, set(excluded)).items():
        excluded.setdefault(name, why)
    for scan_id in set(found) & set(excluded):
        del found[scan_id]  # its fat image is bad: the pair is excluded together
    if not found:
        detail = f" ({'; '.join(excluded.values())})" if excluded else ""
        raise DatasetError(f"{scan_dir}: no usable scans found{detail}")
    sources: dict[str, ScanSource] = {}
    for scan_id, image in found.items():
        expert = _find_nifti(experts, scan_id) or _find_slicer(experts, scan_id)
        corrected = _find_nifti(corrections, scan_id) or _find_slicer(corrections, scan_id)
        sources[scan_id] = ScanSource(scan_id, image, fats.get(scan_id), expert, corrected)
    return sources, excluded


def _case_clashes(files: dict[str, Path], excluded: set[str]) -> dict[str, str]:
    """Scans whose ids differ only in case (``S1`` beside ``s1``), each excluded: on a case-insensitive file
    system (macOS, Windows, Docker Desktop) their stored files are one file, and one scan's image and metrics
    had overwritten the other's."""
    groups: dict[str, list[str]] = {}
    for scan_id in sorted(set(files) | excluded):
        groups.setdefault(scan_id.casefold(), []).append(scan_id)
    out = {}
    for names in (g for g in groups.values() if len(g) > 1):
        for name in names:
            where = files.get(name, name)
            out[name] = (
                f"{where}: scans {', '.join(names)} differ only in case (one stored file where case is not "
                "told apart): rename all but one"
            )
    return out


def _claim(taken: dict[str, Path], scan_id: str, entry: Path) -> None:
    """``entry`` as ``scan_id``'s file, unless another file already is (``a.nii`` beside ``a.nii.gz``, a
    DICOM folder beside a NIfTI file): which one the user means is theirs to say, so the scan is excluded."""
    if scan_id in taken:
        raise ScanError(entry, f"{taken[scan_id].name} is the same scan {scan_id!r}: keep one of the two")
    taken[scan_id] = entry


def _strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unmatched_files(folder: Path, scan_ids: set[str], read: list[Path]) -> list[str]:
    """Files of ``experts/`` and ``corrections/`` that name no scan: Slicer's default ``Segmentation.seg.nrrd``,
    a labelmap saved as ``.nrrd``, ``S1.nii.gz`` for scan ``s1``. They were skipped without a word, and a
    user waited for a correction that was never read. ``read``: the files the scans do read (on a file
    system that does not tell case apart, ``S1.nii.gz`` is scan s1's, and is not reported)."""
    out = []
    read_ids = {_identity(path) for path in read}
    for sub in ("experts", "corrections"):
        place = folder / sub
        if not place.is_dir():
            continue
        for entry in sorted(place.iterdir()):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stem = next(
                (entry.name[: -len(s)] for s in (*NIFTI_SUFFIXES, SEG_SUFFIX) if entry.name.endswith(s)), ""
            )
            if stem not in scan_ids and _identity(entry) not in read_ids:
                out.append(
                    f"{entry}: names no scan (expected <scan id>.nii.gz, .nii or {SEG_SUFFIX} for one of "
                    f"{sorted(scan_ids)[:5]}{' ...' if len(scan_ids) > 5 else ''}); not read"
                )
    return out


def _identity(path: Path) -> tuple[int, int]:
    """The file itself (device and inode), whatever name reaches it."""
    st = path.stat()
    return st.st_dev, st.st_ino


def _find_slicer(folder: Path, stem: str) -> Path | None:
    path = folder / f"{stem}{SEG_SUFFIX}"
    return path if path.is_file() else None


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def map_labels(arr: np.ndarray, label_map: dict[int, int], path: Path | str) -> np.ndarray:
    """User label ids -> our class ids. Unmapped non-zero values are an error, never silently dropped."""
    values = np.unique(arr)
    check_whole_labels(values, path)
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in label_map)
    if unknown:
        raise ScanError(
            path, f"label values {unknown[:10]} are not in the dataset's label_map {sorted(label_map)}"
        )
    return map_labels_keep(arr, label_map)


def check_whole_labels(values: np.ndarray, path: Path | str) -> None:
    """A float label file (an interpolating resampler's output) is refused: a cast or int() turns 1.5 into 1
    and 0.6 into 0, and those voxels land in another class or none without a word."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):  # an integer volume holds no fraction: no pass over it
        return
    fractions = [float(v) for v in np.unique(values) if v != int(v)]
    if fractions:
        raise ScanError(
            path, f"label values {fractions[:10]} are not whole numbers: save the labels as integers"
        )


def map_labels_keep(arr: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Like :func:`map_labels` but ignores ids outside the map (multi-structure files such as TotalSegmentator's)."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    for src, dst in label_map.items():
        out[arr == src] = dst
    return out


def folder_fingerprint(folder: Path) -> str:
    """Cheap change detector for a dataset folder: names, sizes and mtimes of every file (DICOM folders too).

    Content hashes are computed later, per scan, by ingest; this only decides whether to look at all.
    """
    import hashlib

    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        st = p.stat()
        h.update(f"{p.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]
