"""Image I/O and geometry: reading NIfTI/DICOM, canonical orientation, region crop and its undo.

Everything downstream works on *canonical* images: ``sitk.DICOMOrient(img, "LPS")``, whose arrays are
``[z, y, x]`` with x towards the patient's left, y posterior and z superior. Canonicalisation replaces the
reference notebooks' per-pid ``rot90`` string hacks with one geometric rule that works for any scanner.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.storage import GZIP_ERRORS, verify_gzip_stream

CANONICAL = "LPS"
GRID_TOLERANCE = 1e-3
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Acquisition rules: the pipeline segments axial slices, so a scan must have been acquired close to axial
# (an oblique slab is resampled nowhere) and, after reorientation, show a whole axial cross-section.
MAX_OBLIQUE_DEG = 30.0
NOTE_OBLIQUE_DEG = 10.0
MIN_INPLANE_VOXELS = 64
MIN_INPLANE_MM = 100.0
# A DICOM series' slices must lie where its grid puts them, within a tenth of the slice spacing (floating
# point in the exported positions stays far below that; a missing slice, or a tilt over a few slices, does not)
PIXEL_SPACING_TAG = "0028|0030"
POSITION_TAG = "0020|0032"  # Image Position (Patient)
POSITION_TOLERANCE_SPACING = 0.1
MIN_POSITION_TOLERANCE_MM = 0.05


class ScanError(ValueError):
    """A scan or label file cannot be used. The message always names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple:  # crosses process boundaries (worker pools) with both of its arguments
        return type(self), (self.path, self.reason)


def read_image(path: Path | str) -> sitk.Image:
    """Read a NIfTI file or a DICOM series folder as a 3-D image, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise ScanError(path, "file not found")
    try:
        if path.is_dir():
            img = _read_dicom_series(path)
        else:
            img = _without_singleton_fourth_axis(sitk.ReadImage(str(path)))
    except ScanError:
        raise
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ScanError(path, f"unreadable or corrupt image ({first_line[:200]})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(
            path, f"expected a single-channel image, got {img.GetNumberOfComponentsPerPixel()} channels"
        )
    if img.GetDimension() != 3:
        raise ScanError(path, f"expected a 3-D volume, got {img.GetDimension()}-D of size {img.GetSize()}")
    if min(img.GetSize()) < 1:
        raise ScanError(path, f"empty volume of size {img.GetSize()}")
    return img


def read_source_image(path: Path | str) -> sitk.Image:
    """``read_image`` for a file from outside the pipeline (a user's scan, fat image or label file).

    Adds what the reader hides: a truncated gzip stream (read as zero-padded slices) and NaN or infinite
    voxels (read as 0). Both refuse the file rather than repair it, because a silently zeroed slice becomes
    an empty mask and a wrong volume; only the user knows what the missing values were.
    """
    path = Path(path)
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        _check_nifti_size(path)
        _check_nifti_pixdim(path)
    img = read_image(path)
    _check_spacing(img, path)
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        bad = nonfinite_voxels_in_nifti(path)
        if bad:
            raise ScanError(
                path, f"{bad} NaN or infinite voxels in the file's data (the reader would turn them into 0)"
            )
    arr = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ScanError(path, "image holds NaN or infinite values")
    return img


# a voxel side beyond this is no scan's (thick CT slabs are 10 mm): a header's nonsense, not a voxel size
MAX_SPACING_MM = 50.0


def _check_spacing(img: sitk.Image, path: Path) -> None:
    """Refuse a voxel size that cannot be one: every volume and HU mean would be computed on it."""
    spacing = img.GetSpacing()
    if not all(0.0 < s <= MAX_SPACING_MM for s in spacing):  # NaN fails every comparison
        raise ScanError(
            path, f"voxel spacing {tuple(spacing)} mm: each must be above 0 and at most {MAX_SPACING_MM:g}"
        )


def _check_nifti_pixdim(path: Path) -> None:
    """The header's own voxel sizes, read raw: nibabel's loader and SimpleITK both take 1 mm for a zero one,
    SimpleITK for a NaN or infinite one too, without a word."""
    import gzip

    import nibabel as nib

    opener = gzip.open if path.name.endswith(".gz") else open
    try:  # NIfTI-1: the SimpleITK reader takes no NIfTI-2 file
        with opener(path, "rb") as fh:
            header = nib.Nifti1Header.from_fileobj(fh, check=False)
        pixdim = np.asarray(header["pixdim"][1 : 1 + min(3, int(header["dim"][0]))], dtype=float)
    except Exception:  # noqa: BLE001 - nibabel raises many types; read_image names the file if it is bad
        return
    if not (np.isfinite(pixdim).all() and (pixdim != 0).all()):  # negative: its absolute value, as readers do
        raise ScanError(
            path, f"header voxel sizes (pixdim) {tuple(pixdim.tolist())}: each must be a size in mm"
        )


# 512 x 512 x 2048 voxels: far above a lumbar scan, and what one ingest worker can hold several copies of
MAX_VOXELS = 1 << 29


def read_header(path: Path | str) -> sitk.ImageFileReader:
    """A file's header (size, spacing, components) without its voxel data."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def check_claimed_voxels(path: Path | str, files: int = 1) -> None:
    """Refuse a file (or ``files`` files of a DICOM series, each like this one) whose header claims more than
    ``MAX_VOXELS`` voxels, before its data is read: an 862-byte DICOM file claimed 24000 x 24000 pixels, a
    560 KB compressed .seg.nrrd 576 million voxels (1.8 GB)."""
    try:
        reader = read_header(path)
    except RuntimeError:
        return  # unreadable: the read that follows names the file and the reason
    size = reader.GetSize()
    # every value the file claims: components too (a layered segmentation is refused once read, anyway)
    claimed = int(np.prod(size, dtype=np.int64)) * reader.GetNumberOfComponents() * files
    if claimed > MAX_VOXELS:
        shown = "x".join(map(str, size)) + (f" in each of {files} files" if files > 1 else "")
        raise ScanError(path, f"its header claims {shown} voxels, more than {MAX_VOXELS:,}")


def _check_nifti_size(path: Path) -> None:
    """Refuse a NIfTI file whose header claims more voxels than ``MAX_VOXELS`` (a few hundred bytes can claim
    terabytes), or whose data is shorter than its header says: a truncated or corrupt gzip stream, or a
    complete one holding too little (the reader pads both with zeros, which become an empty mask)."""
    import nibabel as nib

    try:
        proxy = nib.load(str(path)).dataobj  # its offset is where the data starts (the header may say 0)
        shape = tuple(int(n) for n in proxy.shape)
        needed = int(proxy.offset) + int(np.prod(shape, dtype=np.int64)) * np.dtype(proxy.dtype).itemsize
    except Exception:  # noqa: BLE001 - nibabel raises many types; the stream check and read_image name it
        shape, needed = (), None
    if shape and int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(
            path, f"its header claims {'x'.join(map(str, shape))} voxels, more than {MAX_VOXELS:,}"
        )
    if path.name.endswith(".gz"):
        try:
            stored = verify_gzip_stream(path, limit=None if needed is None else needed + (1 << 20))
        except GZIP_ERRORS as exc:
            raise ScanError(
                path, f"truncated or corrupt gzip stream ({exc}); the file is incomplete"
            ) from exc
    else:
        stored = path.stat().st_size
    if needed is not None and stored < needed:
        raise ScanError(
            path, f"holds {stored:,} bytes where its header needs {needed:,}: the file is incomplete"
        )


def nonfinite_voxels_in_nifti(path: Path) -> int:
    """NaN/inf count in a NIfTI file's own stored data, plus a non-finite scale counted as every voxel."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        if not (np.isfinite(slope) and np.isfinite(inter)):
            return int(np.prod(img.shape))
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return 0  # integer storage cannot hold NaN
        raw = np.asanyarray(proxy.get_unscaled())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for files SimpleITK accepted
        raise ScanError(path, f"unreadable NIfTI data ({exc})") from exc
    return int(raw.size - np.count_nonzero(np.isfinite(raw)))


def check_acquisition(img: sitk.Image, path: Path | str) -> list[str]:
    """Refuse scans that are not axial enough to segment slice by slice; note moderately oblique ones.

    Reorientation to LPS makes every scan *look* axial, so the rule reads the acquisition geometry: the
    angle between the patient's S axis and the index axis that becomes z, and the in-plane extent that
    remains (a 2-D sagittal stack becomes a few voxels wide)."""
    direction = np.array(img.GetDirection()).reshape(3, 3)
    axis = axial_axis(img)
    angle = float(np.degrees(np.arccos(np.clip(abs(direction[2, axis]), 0.0, 1.0))))
    orientation = Geometry.of(img).orientation()
    if angle > MAX_OBLIQUE_DEG:
        raise ScanError(
            path,
            f"slice normal is {angle:.0f} degrees from the patient's S axis (direction {orientation}, "
            f"cosines {tuple(round(d, 3) for d in img.GetDirection())}); axial slices within "
            f"{MAX_OBLIQUE_DEG:.0f} degrees are required",
        )
    in_plane = [i for i in range(3) if i != axis]
    sizes = [img.GetSize()[i] for i in in_plane]
    extents = [img.GetSize()[i] * img.GetSpacing()[i] for i in in_plane]
    if min(sizes) < MIN_INPLANE_VOXELS or min(extents) < MIN_INPLANE_MM:
        raise ScanError(
            path,
            f"the axial plane is only {sizes[0]}x{sizes[1]} voxels ({extents[0]:.0f}x{extents[1]:.0f} mm) "
            f"after reorientation (direction {orientation}); at least {MIN_INPLANE_VOXELS} voxels and "
            f"{MIN_INPLANE_MM:.0f} mm per in-plane axis are required (a 2-D sagittal or coronal stack "
            "cannot be segmented axially)",
        )
    if angle > NOTE_OBLIQUE_DEG:
        return [
            f"oblique acquisition: slice normal {angle:.0f} degrees from the S axis (direction {orientation})"
        ]
    return []


def read_array(path: Path | str) -> np.ndarray:
    """``read_image`` as a numpy array [z, y, x]."""
    return sitk.GetArrayFromImage(read_image(path))


def dicom_series_files(folder: Path) -> list[str]:
    """The files of the folder's one DICOM series, in the order they stack into the volume's slices."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ScanError(folder, "folder holds no DICOM series")
    if len(series_ids) > 1:
        raise ScanError(folder, f"folder holds {len(series_ids)} DICOM series; put one series per folder")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    _check_no_file_left_out(folder, files)
    return files


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # a media directory: an index, never a slice


def _check_no_file_left_out(folder: Path, files: list[str]) -> None:
    """Refuse a series whose folder holds a DICOM file the series reader passed over.

    GDCM's scanner drops a file it cannot parse (a truncated copy, a cut-off transfer) without a word: the
    volume is then a slice short at its end, or has a gap, and every volume measured on it is wrong."""
    import pydicom  # 0.3 s: only where the folder holds a file outside the series

    in_series = {os.path.realpath(f) for f in files}
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or os.path.realpath(entry) in in_series:
            continue
        if not pydicom.misc.is_dicom(entry):  # a note, a thumbnail, a spreadsheet beside the slices
            continue
        try:
            meta = pydicom.filereader.read_file_meta_info(entry)
        except Exception:  # noqa: BLE001 - pydicom's errors on a malformed file are many types; each is this
            meta = None  # file's, and a DICOM file with an unreadable header is no index either
        if meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
            continue
        raise ScanError(
            entry,
            f"a DICOM file the series reader could not read as part of {folder.name}'s series (truncated or "
            "corrupt?): the volume would silently lack its slice; replace the file or move it out of the folder",
        )


def _read_dicom_series(folder: Path) -> sitk.Image:
    files = dicom_series_files(folder)
    check_claimed_voxels(files[0], len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's own position, for the grid check
    img = _without_singleton_fourth_axis(reader.Execute())  # one multi-frame file reads as [x, y, frame, 1]
    _check_slice_positions(img, reader, files, folder)
    # without the tag the reader takes 1 x 1 mm; an enhanced file keeps it in functional groups, which GDCM reads
    if not reader.HasMetaDataKey(0, PIXEL_SPACING_TAG) and not _uses_functional_groups(files[0]):
        raise ScanError(
            files[0],
            "no Pixel Spacing (0028,0030): the reader would take 1 x 1 mm, and every volume would be a guess",
        )
    return img


def _without_singleton_fourth_axis(img: sitk.Image) -> sitk.Image:
    """A 3-D volume stored with a 4th axis of size 1 (some NIfTI writers, a multi-frame DICOM file) as 3-D."""
    return img[:, :, :, 0] if img.GetDimension() == 4 and img.GetSize()[3] == 1 else img


def _check_slice_positions(
    img: sitk.Image, reader: sitk.ImageSeriesReader, files: list[str], folder: Path
) -> None:
    """Refuse a series whose slices do not lie on the grid it was read onto.

    SimpleITK stacks a series on a right-angled grid with one mean slice spacing. A gantry-tilted CT, or a
    series with a missing or unevenly spaced slice, is not such a grid: its slices would be measured and
    masked mm away from where they were acquired, and the NIfTI mask would disagree with the DICOM SEG,
    which places each frame at its own position."""
    n = img.GetSize()[2]
    # the reader keeps one dictionary per file: a multi-frame file's frames have none of their own
    if len(files) == n and all(reader.HasMetaDataKey(k, POSITION_TAG) for k in range(n)):
        positions = [
            _position(reader.GetMetaData(k, POSITION_TAG).strip().split("\\"), Path(files[k]))
            for k in range(n)
        ]
        names = [Path(f).name for f in files]
    elif len(files) == 1:
        positions = _frame_positions(Path(files[0]), n)
        names = [f"{Path(files[0]).name} frame {k + 1}" for k in range(n)]
    elif len(files) == n:
        # a classic slice without a position had switched the check off for the whole series; enhanced files
        # (one frame each) keep theirs in functional groups, which GDCM reads and this check does not
        missing = [k for k in range(n) if not reader.HasMetaDataKey(k, POSITION_TAG)]
        classic = next((k for k in missing if not _uses_functional_groups(files[k])), None)
        if classic is not None:
            raise ScanError(
                files[classic],
                "no Image Position (Patient) (0020,0032): the slice cannot be placed, so neither can the "
                "series' grid be checked (a missing slice would go unseen)",
            )
        return
    else:
        return  # no positions to hold the grid against
    worst, at = 0.0, 0
    for k, position in enumerate(positions):
        off = float(
            np.linalg.norm(np.array(position) - np.array(img.TransformIndexToPhysicalPoint((0, 0, k))))
        )
        if off > worst:
            worst, at = off, k
    if worst > max(MIN_POSITION_TOLERANCE_MM, POSITION_TOLERANCE_SPACING * img.GetSpacing()[2]):
        raise ScanError(
            folder,
            f"slice {at} ({names[at]}) lies {worst:.2f} mm from where an evenly spaced grid normal to the "
            "slices puts it: a gantry-tilted series, one with missing or unevenly spaced slices, or a "
            "multi-frame file holding frames out of order or several per position; resample it onto a "
            "regular grid first",
        )


def _position(parts: Sequence[object], path: Path) -> list[float]:
    """An Image Position (Patient) value's parts: three numbers, or the file is refused naming what it holds."""
    parts = [str(v).strip() for v in parts]
    try:
        numbers = [float(v) for v in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not np.isfinite(numbers).all():
        raise ScanError(
            path, f"Image Position (Patient) holds {', '.join(map(repr, parts))}, not three numbers"
        )
    return numbers


def _uses_functional_groups(path: str | Path) -> bool:
    """Whether a DICOM file keeps its geometry in functional groups (an enhanced file), not at the top level."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - pydicom's errors are many types; unreadable means no groups to trust
        return False
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _frame_positions(path: Path, n: int) -> list[list[float]]:
    """Each frame's Image Position (Patient) of a multi-frame (enhanced) file, which keeps them per frame,
    not at the top level where the series reader looks; refused when they cannot be read, because the
    reader stacks the frames as stored on an evenly spaced grid whatever their positions."""
    import pydicom  # 0.3 s: only for a series in one multi-frame file

    positions = []
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        # an empty shared group is legal (type 2): everything is then per frame
        shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
        for group in ds.get("PerFrameFunctionalGroupsSequence") or []:
            plane = group.get("PlanePositionSequence") or (
                shared.get("PlanePositionSequence") if shared else None
            )
            if not plane or "ImagePositionPatient" not in plane[0]:
                break
            value = plane[0].ImagePositionPatient  # one number is stored as a number, not a list
            positions.append(_position(list(value) if isinstance(value, Sequence) else [value], path))
    except ScanError:
        raise
    except Exception as exc:  # pydicom's errors on a malformed file are many types: each is this file's
        raise ScanError(path, f"its frames' positions cannot be read ({type(exc).__name__}: {exc})") from exc
    if len(positions) != n:
        raise ScanError(
            path,
            f"a multi-frame file whose {n} frames' positions cannot be read ({len(positions)} found): its "
            "slices cannot be placed; export the series one file per slice",
        )
    return positions


def axial_axis(img: sitk.Image) -> int:
    """Index axis (0=i, 1=j, 2=k) whose direction is most aligned with the patient's S-I axis."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(d[2, :])))


def crop_region(img: sitk.Image, first: int, last: int, path: Path | str = "<image>") -> sitk.Image:
    """Crop to axial slices ``first..last`` (inclusive, either order) along the axial index axis.

    The two indices may come in either order because scanners store z head-to-feet or feet-to-head (the
    reference's ``arr[L3_L4:L5_S1]`` was empty for WORD for exactly that reason). SimpleITK's slicing
    shifts the origin, so the crop keeps its true physical position (the reference kept the old origin).
    """
    axis = axial_axis(img)
    n = img.GetSize()[axis]
    lo, hi = sorted((int(first), int(last)))
    if lo < 0 or hi >= n:
        raise ScanError(
            path, f"region slices {first}..{last} outside the volume's {n} axial slices (0..{n - 1})"
        )
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi + 1)
    return img[tuple(index)]


def to_canonical(img: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(img, CANONICAL)


def same_grid(
    a: sitk.Image | sitk.ImageFileReader, b: sitk.Image | sitk.ImageFileReader, tol: float = GRID_TOLERANCE
) -> bool:
    """Whether two images, or their headers (``read_header``), lie on one voxel grid."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 100)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def resample_labels_to(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resample of a label image onto ``reference``'s grid through physical space."""
    out = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return out


def align_labels(label: sitk.Image, image: sitk.Image, label_path: Path | str) -> sitk.Image:
    """Put a label volume on the image's grid.

    Identical grids pass through. Otherwise the label is resampled through physical space, which handles
    files whose axes are flipped relative to the image (e.g. a LAS label over an LPS DICOM series). A label
    that does not overlap the image in physical space is refused rather than silently emptied.
    """
    if same_grid(label, image):
        return label
    if label.GetSize() == image.GetSize() and not _physical_overlap(label, image):
        raise ScanError(label_path, "label volume does not overlap the scan in physical space")
    out = resample_labels_to(label, image)
    if np.count_nonzero(sitk.GetArrayViewFromImage(label)) and not np.count_nonzero(
        sitk.GetArrayViewFromImage(out)
    ):
        raise ScanError(label_path, "label volume does not overlap the scan in physical space")
    return out


def _physical_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    def bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        pts = np.array([img.TransformContinuousIndexToPhysicalPoint(c) for c in _corner_indices(img)])
        return pts.min(0), pts.max(0)

    amin, amax = bounds(a)
    bmin, bmax = bounds(b)
    return bool(np.all(amin <= bmax + 1) and np.all(bmin <= amax + 1))


def _corner_indices(img: sitk.Image) -> list[tuple[float, float, float]]:
    sx, sy, sz = (float(s - 1) for s in img.GetSize())
    return [(x, y, z) for x in (0.0, sx) for y in (0.0, sy) for z in (0.0, sz)]


def pair_dixon(
    water: sitk.Image, fat: sitk.Image, water_path: Path | str, fat_path: Path | str
) -> sitk.Image:
    """Return the fat image on the water image's geometry, paired by array index.

    Real Dixon exports (MyoSegmenTUM) write the water image with an affine that lacks the true origin while
    the fat image carries it; the voxel grids are identical. So pairing is by array: shape and spacing must
    match, and the fat image then adopts the water geometry. A fat file whose axes are stored flipped or
    permuted against the water's (converters differ in row and slice order) is first put in the water's axis
    order, or its voxels would pair with the mirrored anatomy: each side would get the other's fat. A fat
    image at another angle than the water's is refused.
    """
    if not np.allclose(water.GetDirection(), fat.GetDirection(), atol=GRID_TOLERANCE):
        axes = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(water.GetDirection())
        fat = sitk.DICOMOrient(fat, axes)
        if not np.allclose(water.GetDirection(), fat.GetDirection(), atol=GRID_TOLERANCE):
            raise ScanError(
                fat_path,
                f"Dixon fat direction {_rounded(fat.GetDirection())} is not the water's "
                f"{_rounded(water.GetDirection())} up to flipped or swapped axes ({water_path})",
            )
    if water.GetSize() != fat.GetSize():
        raise ScanError(
            fat_path, f"Dixon fat shape {fat.GetSize()} differs from water {water.GetSize()} ({water_path})"
        )
    if not np.allclose(water.GetSpacing(), fat.GetSpacing(), atol=1e-3):
        raise ScanError(
            fat_path,
            f"Dixon fat spacing {tuple(round(s, 4) for s in fat.GetSpacing())} differs from water "
            f"{tuple(round(s, 4) for s in water.GetSpacing())} ({water_path})",
        )
    paired = sitk.Cast(fat, sitk.sitkFloat32)
    paired.CopyInformation(water)
    return paired


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 3) + 0.0 for v in values)  # + 0.0: no "-0.0" in a message


def to_original_grid(canonical_mask: sitk.Image, original: sitk.Image) -> sitk.Image:
    """Undo canonical reorientation and region crop: the mask on the uncropped original scan's grid.

    The canonical crop is a permutation/flip of a subset of the original voxels, so nearest-neighbour
    resampling through physical space is exact, and voxels outside the region become background.
    """
    out = sitk.Resample(
        canonical_mask, original, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return out


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image) -> Geometry:
        return cls(
            tuple(int(s) for s in img.GetSize()),
            tuple(float(s) for s in img.GetSpacing()),
            tuple(float(o) for o in img.GetOrigin()),
            tuple(float(d) for d in img.GetDirection()),
        )

    def orientation(self) -> str:
        return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(self.direction)


def as_float32(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img, sitk.sitkFloat32)
