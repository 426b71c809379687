"""Fault injection on the storage and metrics layers.

* kill -9 of the process materializing a partition (per-dataset chain through Dagster + a DuckDB metrics
  write), at seeded points in the middle of an atomic write and inside the metrics transaction; then a rerun.
* full disk (a small tmpfs when it can be mounted, else an injected ENOSPC): a StorageError naming the file,
  nothing half-written that reads as valid.
* a corrupt scan in the middle of a dataset: reported, the other scans' files and rows intact.
* two partitions writing metrics at once (and a reader): no lock error reaches anyone, no rows lost.

Children are forked from a forkserver that preloads this module (imports once, no threads inherited).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import tempfile
import traceback
import uuid
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from PIL import Image

from nnsam2_assets.core import storage
from nnsam2_assets.defs.resources import build_resources
from nnsam2_assets.demo.datasets import write_demo_dataset
from nnsam2_assets.metrics import store as metrics_db
from nnsam2_assets.pipeline import PER_DATASET

SMALL = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}

LINEAGE = ["run_id", "computed_at"]
NAME = "faulty"
KILLED = -signal.SIGKILL


def _ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


# --------------------------------------------------------------------------------------------- child side
def metrics_tables(data_root: Path, storage_root: Path, name: str) -> dict[str, pd.DataFrame]:
    """Realistic metrics frames from the chain's outputs: per-label volume/fat ratio of the propagated masks
    and the per-slice confidence, with lineage columns."""
    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.ingest.convention import class_names, load_dataset
    from nnsam2_assets.ingest.scans import ok_scans
    from nnsam2_assets.metrics import quant

    spec = load_dataset(data_root, name)
    layout = DatasetLayout(storage_root, name)
    names = {i + 1: c for i, c in enumerate(class_names(spec.n_classes))}
    labels, conf = [], []
    for scan in ok_scans(layout):
        mask = sitk.ReadImage(str(layout.masks(scan)))
        water = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_image(scan))))
        fat = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_fat(scan))))
        arr = sitk.GetArrayFromImage(mask)
        labels.append(quant.quantify(arr, names, scan, water=water, fat=fat, spacing=mask.GetSpacing()))
        conf.append(pd.read_parquet(layout.confidence(scan)).assign(scan=scan))
    lineage = {"dataset": name, "run_id": uuid.uuid4().hex, "computed_at": pd.Timestamp.now(tz="UTC")}
    return {
        "scan_metrics": pd.concat(labels, ignore_index=True).assign(**lineage),
        "slice_confidence": pd.concat(conf, ignore_index=True).assign(**lineage),
    }


def _install_kill_at_write(k: int, log: Path | None) -> None:
    """SIGKILL this process in the middle of the k-th atomic write: the temp file holds half its bytes."""
    real = storage._atomic_write
    count = {"n": 0}

    def killing(path, write, **kwargs):
        count["n"] += 1
        if log is not None:
            with open(log, "a") as fh:
                fh.write(f"{path}\n")
        if count["n"] != k:
            return real(path, write, **kwargs)

        def half_then_die(tmp: Path) -> None:
            write(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        return real(path, half_then_die, **kwargs)

    storage._atomic_write = killing


class _KillingConnection:
    """A DuckDB connection that SIGKILLs the process on the k-th INSERT (inside the open transaction)."""

    def __init__(self, con, k: int):
        self._con, self._k, self._n = con, k, 0

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith("INSERT"):
            self._n += 1
            if self._n == self._k:
                os.kill(os.getpid(), signal.SIGKILL)
        return self._con.execute(sql, *args)

    def __getattr__(self, item):
        return getattr(self._con, item)


def _install_kill_in_db(k: int) -> None:
    real = metrics_db.connect

    def connect(*args, **kwargs):
        return _KillingConnection(real(*args, **kwargs), k)

    metrics_db.connect = connect


def materialize_and_write(
    data_root: str, storage_root: str, kill_at_write: int = 0, kill_in_db: int = 0, log: str = ""
) -> None:
    """Child: the per-dataset chain through Dagster (in-process executor), then the metrics write."""
    try:
        from nnsam2_assets.definitions import all_assets

        if kill_at_write or log:
            _install_kill_at_write(kill_at_write, Path(log) if log else None)
        if kill_in_db:
            _install_kill_in_db(kill_in_db)
        data, store = Path(data_root), Path(storage_root)
        # the instance's home beside the storage, under the test's own folder: a child killed mid-run never
        # cleans up after itself, and a temporary folder of the system's would outlive the test
        home = tempfile.mkdtemp(prefix="dagster-home-", dir=store.parent)
        with dg.instance_for_test(temp_dir=home) as instance:
            instance.add_dynamic_partitions("datasets", [NAME])
            res = dg.materialize(
                all_assets(),
                selection=PER_DATASET,
                partition_key=NAME,
                instance=instance,
                resources=build_resources(data, store),
                raise_on_error=False,
            )
        if not res.success:
            os._exit(3)
        metrics_db.replace_dataset(store / "nnsam2.duckdb", NAME, metrics_tables(data, store, NAME))
    except BaseException:
        traceback.print_exc()
        os._exit(4)
    os._exit(0)


def _run_child(*args, **kwargs) -> int:
    proc = _ctx().Process(target=materialize_and_write, args=args, kwargs=kwargs)
    proc.start()
    proc.join()
    return proc.exitcode


# ------------------------------------------------------------------------------------------- invariants
def _is_tmp(p: Path) -> bool:
    return p.name.startswith(storage.TMP_PREFIX)


def assert_storage_consistent(root: Path) -> None:
    """What a reader sees under ``root`` is complete: every published NIfTI decompresses fully and reads,
    every table and JPEG parses, every cache key has its outputs, and temp files never look like outputs."""
    problems = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or _is_tmp(p) or p.suffix == ".duckdb" or p.name.endswith(".wal"):
            continue
        try:
            if p.name.endswith(".nii.gz"):
                with gzip.open(p, "rb") as fh:  # SimpleITK reads some truncated .gz files without error
                    while fh.read(1 << 20):
                        pass
                sitk.ReadImage(str(p))
            elif p.suffix == ".parquet":
                pd.read_parquet(p)
            elif p.suffix == ".csv":
                pd.read_csv(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jpg":
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".key":
                assert len(p.read_text().strip()) == 32, "short key"
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{p.relative_to(root)}: {type(exc).__name__}: {exc}")
    for key in root.rglob("_keys/*.key"):
        if _is_tmp(key):
            continue
        asset_dir, scan = key.parent.parent, key.stem
        partners = {
            "scans": [asset_dir / f"{scan}.nii.gz"],
            "propagated_masks": [asset_dir / f"{scan}.nii.gz", asset_dir / f"{scan}_confidence.parquet"],
        }.get(asset_dir.name, [])
        problems += [f"{key.relative_to(root)} without {p.name}" for p in partners if not p.is_file()]
    for fm in root.rglob("frame_map.parquet"):
        if fm.parent.name in ("superior", "inferior"):
            listed = pd.read_parquet(fm)
            jpgs = sorted(p.name for p in fm.parent.glob("*.jpg"))
            # SAM2's loader lists every *.jpg and sorts by int(stem): a leftover temp file breaks it
            bad = [j for j in jpgs if not Path(j).stem.isdigit()]
            problems += [f"{fm.parent.relative_to(root)}: non-frame jpg {b}" for b in bad]
            if len(jpgs) - len(bad) < len(listed):
                problems.append(f"{fm.parent.relative_to(root)}: frame map lists missing frames")
    assert not problems, "inconsistent storage:\n" + "\n".join(problems)


def db_rows(db: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for table in ("scan_metrics", "slice_confidence"):
        df = metrics_db.query(db, f"SELECT * FROM metrics.{table}", wait_s=30).drop(columns=LINEAGE)
        out[table] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def assert_rows_equal(got: dict, want: dict) -> None:
    for table in want:
        pd.testing.assert_frame_equal(got[table], want[table], check_exact=False, rtol=1e-9)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 2-scan Dixon dataset, one clean run's DB rows, and the ordered list of that run's atomic writes."""
    base = tmp_path_factory.mktemp("faults")
    data = base / "data"
    write_demo_dataset(data, NAME, "dixon", 2, seed=5, reference_index=0, **SMALL)
    clean = base / "clean"
    log = base / "writes.log"
    assert _run_child(str(data), str(clean), log=str(log)) == 0
    writes = log.read_text().splitlines()
    assert_storage_consistent(clean)
    return {"base": base, "data": data, "rows": db_rows(clean / "nnsam2.duckdb"), "writes": writes}


def _kill_points(writes: list[str], seed: int = 20260) -> list[int]:
    """Seeded write indices (1-based): a propagated-mask NIfTI, a pseudo-label, and a frame JPEG or other file."""
    rng = random.Random(seed)
    masks = [i for i, w in enumerate(writes, 1) if w.endswith(".nii.gz") and "/propagated_masks/" in w]
    pseudo = [i for i, w in enumerate(writes, 1) if "/pseudo_labels/" in w]
    frames = [i for i, w in enumerate(writes, 1) if w.endswith(".jpg")]
    rest = [i for i in range(1, len(writes) + 1) if i not in set(masks + pseudo + frames)]
    return [rng.choice(masks), rng.choice(pseudo), rng.choice(frames + rest)]


# -------------------------------------------------------------------------------------------------- tests
def test_kill9_mid_write_then_rerun(cohort):
    """kill -9 in the middle of seeded atomic writes: readers never see a partial file, the rerun completes
    and its metrics rows equal a clean run's (lineage columns aside)."""
    points = _kill_points(cohort["writes"])
    for k in points:
        store = cohort["base"] / f"kill-{k}"
        code = _run_child(str(cohort["data"]), str(store), kill_at_write=k)
        where = cohort["writes"][k - 1]
        assert code == KILLED, f"child not killed at write {k} ({where}): exit {code}"
        assert_storage_consistent(store)  # right after the kill, before any rerun
        assert (
            not (store / "nnsam2.duckdb").exists() or db_rows(store / "nnsam2.duckdb")["scan_metrics"].empty
        )
        assert _run_child(str(cohort["data"]), str(store)) == 0, f"rerun after kill at {where} failed"
        assert_storage_consistent(store)
        assert_rows_equal(db_rows(store / "nnsam2.duckdb"), cohort["rows"])


def test_kill9_inside_metrics_transaction(cohort):
    """kill -9 between DELETE and the INSERTs of replace_dataset_rows: the previous rows survive intact
    (the transaction never commits), and a rerun writes the same rows as a clean run."""
    store = cohort["base"] / "kill-db"
    assert _run_child(str(cohort["data"]), str(store)) == 0
    before = db_rows(store / "nnsam2.duckdb")
    assert_rows_equal(before, cohort["rows"])
    k = random.Random(7).choice((1, 2))  # during the first table's INSERT or the second's (DELETEs done)
    assert _run_child(str(cohort["data"]), str(store), kill_in_db=k) == KILLED
    assert_rows_equal(db_rows(store / "nnsam2.duckdb"), cohort["rows"])
    assert_storage_consistent(store)
    assert _run_child(str(cohort["data"]), str(store)) == 0
    assert_rows_equal(db_rows(store / "nnsam2.duckdb"), cohort["rows"])


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` when this process may mount one; yields whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 64, 64)).astype(np.float32))
    table = pd.DataFrame({"a": np.arange(20000), "b": np.random.default_rng(1).random(20000)})
    disk = tmp_path / "disk"
    with _small_filesystem(disk, "64k") as mounted:
        if not mounted:  # no tmpfs here: the kernel's answer to a full disk, injected at the write
            real_write = Path.write_bytes

            def enospc_after_half(self, data):
                real_write(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

            def sitk_enospc(image, name, *args, **kwargs):
                Path(name).write_bytes(b"\x1f\x8b" + b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

            monkeypatch.setattr(Path, "write_bytes", enospc_after_half)
            monkeypatch.setattr(storage.sitk, "WriteImage", sitk_enospc)
        existing = storage.atomic_write_bytes(b"old", disk / "keep.bin") if mounted else None
        attempts = {
            disk / "masks" / "subj00.nii.gz": lambda p: storage.atomic_write_image(img, p),
            disk / "tables" / "metrics.parquet": lambda p: storage.atomic_write_dataframe(table, p),
            disk / "frames" / "0.jpg": lambda p: storage.atomic_write_bytes(os.urandom(200_000), p),
        }
        for target, write in attempts.items():
            with pytest.raises(storage.StorageError) as info:
                write(target)
            msg = str(info.value)
            assert str(target) in msg and "No space left on device" in msg, msg
            assert not target.exists(), f"{target} published although the write failed"
        left = [p for p in disk.rglob("*") if p.is_file() and p != existing]
        assert not left, f"half-written files left behind: {left}"
        if existing is not None:
            assert existing.read_bytes() == b"old"


def test_full_disk_during_a_partition_run(tmp_path):
    """The per-dataset chain with its storage on a nearly full disk fails with the file named, and nothing
    published under the storage root is half-written."""
    data = tmp_path / "data"
    write_demo_dataset(data, NAME, "dixon", 2, seed=5, reference_index=0, **SMALL)
    store = tmp_path / "store"
    with _small_filesystem(store, "300k") as mounted:
        resources = build_resources(data, store)
        if not mounted:
            calls = {"n": 0}
            real = storage.os.replace

            def replace(src, dst):
                calls["n"] += 1
                if calls["n"] == 12:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(src, dst)

            storage.os.replace = replace
        try:
            from nnsam2_assets.definitions import all_assets
            from nnsam2_assets.runner import failure_message

            with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
                instance.add_dynamic_partitions("datasets", [NAME])
                res = dg.materialize(
                    all_assets(),
                    selection=PER_DATASET,
                    partition_key=NAME,
                    instance=instance,
                    resources=resources,
                    raise_on_error=False,
                )
        finally:
            if not mounted:
                storage.os.replace = real
        assert not res.success
        why = failure_message(res)
        assert "No space left on device" in why and str(store) in why, why
        assert_storage_consistent(store)
        assert not [p for p in store.rglob("*") if p.is_file() and _is_tmp(p)]


def test_corrupt_scan_mid_cohort_is_reported_others_intact(tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data, NAME, "dixon", 3, seed=7, reference_index=0, **SMALL)
    store = tmp_path / "store"
    assert _run_child(str(data), str(store)) == 0
    before_rows = db_rows(store / "nnsam2.duckdb")
    layout_files = {
        p.relative_to(store): storage.sha256_file(p)
        for p in (store / "datasets" / NAME).rglob("*")
        if p.is_file()
        and ("/scans/" in str(p) or "/propagated_masks/" in str(p))
        and p.name.startswith(("subj00", "subj02"))  # the other scans' own files (not the manifest)
    }
    bad = data / NAME / "scans" / "subj01_water.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-cohort (not the reference)
    assert _run_child(str(data), str(store)) == 0
    manifest = pd.read_parquet(store / "datasets" / NAME / "scans" / "manifest.parquet").set_index("scan")
    assert manifest.loc["subj01", "status"] == "error"
    assert str(bad) in manifest.loc["subj01", "error"] and "corrupt" in manifest.loc["subj01", "error"]
    assert set(manifest.index[manifest.status == "ok"]) == {"subj00", "subj02"}
    for rel, digest in layout_files.items():
        assert storage.sha256_file(store / rel) == digest, f"{rel} changed although its scan is fine"
    after = db_rows(store / "nnsam2.duckdb")
    for table, want in before_rows.items():
        keep = want[want.scan != "subj01"].reset_index(drop=True)
        assert set(after[table].scan) == {"subj00", "subj02"}
        pd.testing.assert_frame_equal(after[table], keep, check_exact=False, rtol=1e-9)
    assert_storage_consistent(store)


def _writer(db: str, dataset: str, iterations: int, out: str) -> None:
    errors = []
    for i in range(iterations):
        n = 3 + (i % 5)
        df = pd.DataFrame(
            {
                "dataset": dataset,
                "scan": [f"s{j}" for j in range(n)],
                "volume_ml": np.arange(n) * 1.5 + i,
                "iteration": i,
                "run_id": f"{dataset}-{i}",
                "computed_at": pd.Timestamp.now(tz="UTC"),
            }
        )
        try:
            # no lock deadline: DuckDB's lock is not fair, and a busy machine must not turn waiting into an error
            metrics_db.replace_dataset(
                Path(db), dataset, {"scan_metrics": df, "qc_flags": df[["dataset"]]}, wait_s=math.inf
            )
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"{dataset} iteration {i}: {type(exc).__name__}: {exc}")
    Path(out).write_text(json.dumps(errors))


def _reader(db: str, iterations: int, out: str) -> None:
    errors = []
    for i in range(iterations):
        try:
            df = metrics_db.query(
                Path(db),
                "SELECT dataset, count(*) AS n FROM metrics.scan_metrics GROUP BY 1",
                wait_s=math.inf,
            )
            assert df.n.between(3, 7).all(), f"partial dataset visible: {df.to_dict('records')}"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reader {i}: {type(exc).__name__}: {exc}")
    Path(out).write_text(json.dumps(errors))


def test_two_partitions_write_metrics_at_once(tmp_path):
    db = tmp_path / "nnsam2.duckdb"
    iterations = 40
    ctx = _ctx()
    metrics_db.replace_dataset(db, "seed", {"scan_metrics": pd.DataFrame()})  # file exists for the reader
    _writer(str(db), "a", 1, str(tmp_path / "warm.json"))
    procs = [
        ctx.Process(target=_writer, args=(str(db), ds, iterations, str(tmp_path / f"{ds}.json")))
        for ds in ("a", "b")
    ]
    procs.append(ctx.Process(target=_reader, args=(str(db), iterations, str(tmp_path / "reader.json"))))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"{p.name} exit {p.exitcode}"
    for name in ("a", "b", "reader"):
        errors = json.loads((tmp_path / f"{name}.json").read_text())
        assert not errors, errors
    last = iterations - 1
    df = metrics_db.query(db, "SELECT * FROM metrics.scan_metrics ORDER BY dataset, scan")
    for ds in ("a", "b"):
        rows = df[df.dataset == ds]
        assert len(rows) == 3 + (last % 5), rows
        assert (rows.iteration == last).all() and (rows.run_id == f"{ds}-{last}").all()
        assert rows.volume_ml.tolist() == [j * 1.5 + last for j in range(len(rows))]
