"""Benchmarks of the rsna_spine pipeline (targets of the issue; numbers are measured, never asserted).

1. Decoding: series decoded per second, in-process and with 2 spawned workers (a warm pool; the pool's
   start-up, a fresh interpreter per worker, is reported apart), on the first benchmark.n_series series.
2. Sample throughput: stage-2 samples (N, 3, H, W) per second from the cache (a second, "cached" epoch:
   stacks already in memory) and from the npz files (a cold epoch), against the peer that reads DICOM every
   epoch the way the seed did (the N files around the slice of interest decoded in __getitem__; given the
   slice order and intensity percentiles for free, which favours the peer). Reports the ratios.
3. Real slice sizes (benchmark.real_size: 256-640 px, uncompressed and JPEG 2000 lossless): caching
   throughput (slices/s, MB/s), cache / DICOM size, samples/s from the disk cache, from memory and from DICOM
   with the same crops, and measured epochs through the training DataLoader (CropDataset from the disk cache
   vs the DICOM peer, benchmark.real_size.loader_workers workers), extrapolated to the competition set from
   the measured epoch rates (:func:`real_size_benchmark`; real_size.csv).
4. The official metric of the two-stage model vs the class-prior baseline, re-scored from the
   out-of-fold predictions of a validate_rsna.py run (paths.validate_dir or --validate-dir).

    python rsna_spine/benchmark_rsna.py --config configs/rsna_spine/smoke.yaml
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from torch.utils.data import DataLoader, Dataset

from common.cli import make_parser, start_run
from common.errors import InputError, run_cli
from common.dicom_series import pixel_data
from common.runtime import dataloader_kwargs
from rsna_spine.cache import decode_all, series_tasks
from rsna_spine.constants import GROUP_OF_CONDITION, LEVELS, SUBMISSION_COLUMNS
from rsna_spine.crops import crop_stack
from rsna_spine.data import Stack, StackStore, decode_series_task, load_series, stack_path
from rsna_spine.inference import find_run_dir
from rsna_spine.stage_datasets import CropDataset, crop_items
from rsna_spine.metric import score_details, solution_from_labels, submission_frame
from rsna_spine.phantom import sample_anatomy
from rsna_spine.settings import DEFAULTS
from rsna_spine.synthetic import SYNTHETIC_DEFAULTS, render_stack, sagittal_stack, sample_grades, write_stack

DOMAIN = "rsna_spine"


class DicomEveryEpoch(Dataset):
    """The peer: each sample decodes the N DICOM files around its slice (seed v9's __getitem__); the same
    sample dict as :class:`CropDataset` without augmentation ("image" (N, 3, H, W), "index"), so both run
    through the same DataLoader. Module level: picklable for spawned workers."""

    def __init__(self, items, store: StackStore, root: Path, crop_cfg, intensity):
        self.items, self.store, self.root = items, store, Path(root)
        self.crop_cfg, self.intensity = crop_cfg, intensity

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        geometry = self.store.get(item["study_id"], item["series_id"], item["stack_index"])
        n = int(self.crop_cfg["num_slices"])
        k0 = int(round(item["kji"][0]))
        ks = np.clip(k0 + np.arange(n) - n // 2, 0, geometry.shape[0] - 1)
        folder = self.root / "train_images" / str(item["study_id"]) / str(item["series_id"])
        planes = {}
        for k in sorted(set(ks.tolist())):
            path = folder / f"{int(geometry.instance_numbers[k])}.dcm"
            plane = pixel_data(pydicom.dcmread(str(path)), path)
            planes[k] = plane
        # same geometry, but pixels from the files just read (canonical flips re-applied)
        array = np.zeros_like(geometry.array)
        for k, plane in planes.items():
            array[k] = _to_canonical(plane, geometry)
        fresh = Stack(**{**geometry.__dict__, "array": array})
        group = GROUP_OF_CONDITION[item["condition"]]
        image = crop_stack(fresh, item["kji"], n, self.crop_cfg["crop_mm"][group], self.crop_cfg["img_size"],
                           self.intensity)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), "index": index}


def _to_canonical(plane: np.ndarray, stack: Stack) -> np.ndarray:
    """Apply the in-plane flips that canonicalization applied to this stack."""
    if float(stack.orig_col_dir @ stack.col_dir) < 0:
        plane = plane[::-1]
    if float(stack.orig_row_dir @ stack.row_dir) < 0:
        plane = plane[:, ::-1]
    return plane


def _warm(_: int) -> int:
    """Runs once per pool worker so its start-up is not timed as decoding."""
    time.sleep(0.2)
    return os.getpid()


def _rate(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


# the competition set (notes/rsna_spine.md): what the real-size numbers are extrapolated to
FULL_SET = {"studies": 1975, "slices": 147_000, "dicom_gb": 35.0, "samples_per_epoch": 1975 * 25}


def _epochs(dataset, workers: int, batch_size: int) -> tuple[float, float, int]:
    """Two epochs through the training DataLoader (same kwargs as train_rsna.py: spawned, persistent workers,
    shuffled): (first epoch s, including worker start-up and first loads; second epoch s; samples)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=False,
                        **dataloader_kwargs(torch.device("cpu"), workers, seed=0, start_method="spawn"))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        n = sum(len(batch["index"]) for batch in loader)
        times.append(time.perf_counter() - start)
    del loader  # stops the workers
    return times[0], times[1], n


def _real_size_case(work_dir: Path, size: int, syntax: str, n_slices: int, n_samples: int, crop_cfg: dict,
                    intensity: dict, loader_workers=(0,), batch_size: int = 12) -> dict:
    """One (size, syntax) case of :func:`real_size_benchmark`: its row of measurements."""
    rng = np.random.default_rng(size)
    synth = dict(SYNTHETIC_DEFAULTS, sag_size_px=size, sag_spacing_mm=230.0 / size, sag_slices=[n_slices, n_slices])
    anat = sample_anatomy(rng, sample_grades(rng, synth["class_priors"], 0.5))
    geom = sagittal_stack(anat, rng, synth)
    folder = Path(work_dir) / "train_images" / "1" / "2"
    write_stack(folder, render_stack(anat, geom, "t2", rng), geom, rng.permutation(n_slices) + 1,
                {"study_id": 1, "study_uid": "1.2", "series_uid": "1.2.3", "series_number": 1,
                 "description": "Sagittal T2/STIR", "syntax": syntax})
    dicom_bytes = sum(f.stat().st_size for f in folder.iterdir())
    start = time.perf_counter()
    (stack,) = load_series(folder, 1, 2, "sag_t2", logger=lambda m: None)
    cache_dir = Path(work_dir) / "cache"
    path = stack_path(cache_dir, 1, 2, stack.stack_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = stack.save(path)
    cache_s = time.perf_counter() - start
    centres = [(float(rng.integers(0, n_slices)), float(rng.uniform(0.3, 0.7) * size),
                float(rng.uniform(0.3, 0.7) * size)) for _ in range(n_samples)]
    args = (int(crop_cfg["num_slices"]), float(crop_cfg["crop_mm"]["spinal"]), int(crop_cfg["img_size"]), intensity)
    num = args[0]

    def from_disk(i):  # a cold store: the stack file read for every sample
        return crop_stack(Stack.load(path), centres[i], *args)

    def from_memory(i):
        return crop_stack(stack, centres[i], *args)

    def from_dicom(i):  # the N slices around the centre decoded per sample, geometry given
        ks = np.clip(int(round(centres[i][0])) + np.arange(num) - num // 2, 0, n_slices - 1)
        array = np.zeros_like(stack.array)
        for k in sorted(set(ks.tolist())):
            file = folder / f"{int(stack.instance_numbers[k])}.dcm"
            array[k] = _to_canonical(pixel_data(pydicom.dcmread(str(file)), file), stack)
        return crop_stack(Stack(**{**stack.__dict__, "array": array}), centres[i], *args)

    rates = {name: _rate(fn, n_samples) for name, fn in
             (("disk", from_disk), ("memory", from_memory), ("dicom", from_dicom))}
    # whole epochs through the training DataLoader: CropDataset over a store that keeps nothing (max_mb=0:
    # every sample reads and inflates its stack file) vs the DICOM peer (geometry kept per worker)
    items = [{"study_id": 1, "series_id": 2, "stack_index": stack.stack_index, "condition": "spinal_canal_stenosis",
              "level": LEVELS[0], "label": 0, "kji": centre} for centre in centres]
    index = pd.DataFrame(columns=["study_id", "series_id", "stack_index", "series_key", "status"])
    sets = {"disk": CropDataset(items, StackStore(cache_dir, index=index, max_mb=0), crop_cfg, intensity),
            "dicom": DicomEveryEpoch(items, StackStore(cache_dir, index=index), work_dir, crop_cfg, intensity)}
    diff = max(float(torch.as_tensor(sets["disk"][i]["image"] - sets["dicom"][i]["image"]).abs().max())
               for i in range(n_samples))
    epochs = {}
    for workers in loader_workers:
        for name, dataset in sets.items():
            first, second, n = _epochs(dataset, int(workers), batch_size)
            epochs.update({f"first_epoch_s_{name}_w{workers}": first, f"epoch_s_{name}_w{workers}": second,
                           f"epoch_samples_per_s_{name}_w{workers}": n / second,
                           f"full_set_epoch_min_{name}_w{workers}": FULL_SET["samples_per_epoch"] / (n / second) / 60})
        epochs[f"epoch_speedup_disk_vs_dicom_w{workers}"] = (epochs[f"epoch_s_dicom_w{workers}"]
                                                              / epochs[f"epoch_s_disk_w{workers}"])
    ratio = path.stat().st_size / dicom_bytes
    return {"size_px": size, "syntax": syntax, "slices": n_slices, "dicom_mb": dicom_bytes / 1e6,
            "cache_ratio": ratio, "cache_slices_per_s": n_slices / cache_s,
            "cache_dicom_mb_per_s": dicom_bytes / 1e6 / cache_s, "samples_per_s_disk": rates["disk"],
            "samples_per_s_memory": rates["memory"], "samples_per_s_dicom": rates["dicom"],
            "speedup_disk_vs_dicom": rates["disk"] / rates["dicom"],
            "speedup_memory_vs_dicom": rates["memory"] / rates["dicom"], "max_abs_difference": diff,
            "full_set_cache_hours_1_process": FULL_SET["slices"] / (n_slices / cache_s) / 3600,
            "full_set_cache_gb": FULL_SET["dicom_gb"] * ratio, "epoch_samples": n_samples, **epochs}


def real_size_benchmark(work_dir: Path, cfg: dict, logger=print) -> dict:
    """Caching and sampling at real slice sizes, the same crops on both sides (issue 14, item 4).

    For each size in ``benchmark.real_size.sizes`` (px) and transfer syntax (explicit VR = uncompressed,
    jpeg2000 lossless): a synthetic sagittal T2 series of ``n_slices`` slices (phantom + noise, 230 mm field)
    written as DICOM; then timed: decode + write the cache (slices/s, DICOM MB/s, cache / DICOM size);
    ``n_samples`` crops (crop.num_slices x crop.img_size, crop_mm of the spinal group, random centres) from
    (a) the disk cache, one stack file read per sample (a cold store), (b) the stack in memory, (c) the DICOM
    files (the N slices decoded per sample, as the seed's __getitem__, geometry given). The crops of (a) and
    (c) are compared pixel by pixel. Then whole epochs of those ``n_samples`` items through the DataLoader
    training uses (:func:`common.runtime.dataloader_kwargs`, spawned persistent workers, shuffled,
    train.batch_size) for each count in ``loader_workers`` ([] = runtime.num_workers): :class:`CropDataset`
    over a store that keeps no stack (every sample reads its stack file) vs :class:`DicomEveryEpoch`. The
    second epoch is timed (the first, with worker start-up, is reported apart); the full-set epoch time
    (FULL_SET samples_per_epoch) is extrapolated from these measured samples/s.
    """

    rcfg = cfg["benchmark"]["real_size"]
    workers = [int(w) for w in rcfg["loader_workers"]] or [int(cfg["runtime"]["num_workers"])]
    rows = []
    for size in rcfg["sizes"]:
        for syntax in rcfg["syntaxes"]:
            row = _real_size_case(Path(work_dir) / f"{size}_{syntax}", int(size), syntax, int(rcfg["n_slices"]),
                                  int(rcfg["n_samples"]), cfg["crop"], cfg["intensity"], workers,
                                  int(cfg["train"]["batch_size"]))
            rows.append(row)
            logger(f"real size {size} px {syntax}: cache {row['cache_slices_per_s']:.1f} slices/s "
                   f"({row['cache_dicom_mb_per_s']:.1f} MB/s), {row['cache_ratio']:.2f} x DICOM size; samples/s "
                   f"disk {row['samples_per_s_disk']:.1f}, memory {row['samples_per_s_memory']:.1f}, DICOM "
                   f"{row['samples_per_s_dicom']:.1f} -> x{row['speedup_disk_vs_dicom']:.2f} from disk; max "
                   f"|disk - DICOM| {row['max_abs_difference']:.1e}; full set ({FULL_SET['slices']} slices, "
                   f"{FULL_SET['samples_per_epoch']} samples/epoch, 1 process): cache "
                   f"{row['full_set_cache_hours_1_process']:.1f} h, {row['full_set_cache_gb']:.1f} GB")
            for w in workers:
                logger(f"  epoch of {row['epoch_samples']} samples, DataLoader with {w} worker(s) (second epoch; "
                       f"first incl. start-up disk {row[f'first_epoch_s_disk_w{w}']:.2f} s, DICOM "
                       f"{row[f'first_epoch_s_dicom_w{w}']:.2f} s): disk cache {row[f'epoch_s_disk_w{w}']:.2f} s "
                       f"= {row[f'epoch_samples_per_s_disk_w{w}']:.1f} samples/s, DICOM {row[f'epoch_s_dicom_w{w}']:.2f}"
                       f" s = {row[f'epoch_samples_per_s_dicom_w{w}']:.1f} samples/s -> "
                       f"x{row[f'epoch_speedup_disk_vs_dicom_w{w}']:.2f}; full-set epoch "
                       f"({FULL_SET['samples_per_epoch']} samples) {row[f'full_set_epoch_min_disk_w{w}']:.0f} min "
                       f"from disk vs {row[f'full_set_epoch_min_dicom_w{w}']:.0f} min DICOM")
    shutil.rmtree(work_dir, ignore_errors=True)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--validate-dir", type=Path, default=None, help="run folder of validate_rsna.py")
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    root, cache_dir = Path(cfg["paths"]["data_root"]), Path(cfg["paths"]["cache_dir"])
    bcfg = cfg["benchmark"]
    results: dict = {}

    # 1. decoding throughput
    tasks = series_tasks(root, "train", run.run_dir / "bench_cache", cfg["preprocess"]["percentiles"],
                         logger=lambda m: None)[: int(bcfg["n_series"])]
    for workers in bcfg["decode_workers"]:
        if workers <= 1:
            _, seconds = decode_all(tasks, 1, lambda m: None, desc="decode x1", reuse=False)
            startup = 0.0
        else:  # a warm pool: process start-up (a fresh interpreter importing torch) is reported apart
            start = time.perf_counter()
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                list(pool.map(_warm, range(2 * workers)))
                startup = time.perf_counter() - start
                start = time.perf_counter()
                list(pool.map(decode_series_task, tasks, chunksize=1))
                seconds = time.perf_counter() - start
        results[f"series_per_s_{workers}_worker"] = len(tasks) / seconds
        results[f"pool_startup_s_{workers}_worker"] = startup
        run.log(f"decode: {len(tasks)} series in {seconds:.2f} s with {workers} process(es) = "
                f"{len(tasks) / seconds:.2f} series/s" + (f" (+ {startup:.1f} s pool start-up)" if startup else ""))
    shutil.rmtree(run.run_dir / "bench_cache", ignore_errors=True)

    # 2. samples per second: cache vs DICOM every epoch
    store = StackStore(cache_dir)
    labels = pd.read_csv(cache_dir / "labels.csv")
    items = crop_items(labels, None, labels["study_id"].unique())
    items = [items[i] for i in np.random.default_rng(0).permutation(len(items))[: int(bcfg["n_samples"])]]
    cold_store = StackStore(cache_dir, index=store.index)
    cold = CropDataset(items, cold_store, cfg["crop"], cfg["intensity"])
    results["samples_per_s_cache_cold"] = _rate(lambda i: cold[i], len(items))
    results["samples_per_s_cache_warm"] = _rate(lambda i: cold[i], len(items))  # stacks now in memory
    peer = DicomEveryEpoch(items, store, root, cfg["crop"], cfg["intensity"])
    for i in range(len(items)):  # warm the peer's geometry lookups so only DICOM decoding is timed
        store.get(items[i]["study_id"], items[i]["series_id"], items[i]["stack_index"])
    results["samples_per_s_dicom"] = _rate(lambda i: peer[i], len(items))
    results["speedup_cached_vs_dicom"] = results["samples_per_s_cache_warm"] / results["samples_per_s_dicom"]
    results["speedup_npz_vs_dicom"] = results["samples_per_s_cache_cold"] / results["samples_per_s_dicom"]
    check = np.abs(cold[0]["image"].numpy() - peer[0]["image"].numpy()).max()
    run.log(f"samples/s: cached {results['samples_per_s_cache_warm']:.1f}, npz (cold) "
            f"{results['samples_per_s_cache_cold']:.1f}, DICOM every epoch {results['samples_per_s_dicom']:.1f} "
            f"-> x{results['speedup_cached_vs_dicom']:.1f} (cached) x{results['speedup_npz_vs_dicom']:.1f} (npz); "
            f"max |cache − DICOM| pixel difference {check:.2e}")
    results["max_abs_difference_cache_vs_dicom"] = float(check)

    # 3. real slice sizes, uncompressed and JPEG 2000, the same crops from the disk cache and from DICOM
    if cfg["benchmark"]["real_size"]["sizes"]:
        real = real_size_benchmark(run.run_dir / "real_size", cfg, logger=run.log)
        results["real_size"] = real["rows"]
        pd.DataFrame(real["rows"]).to_csv(run.run_dir / "real_size.csv", index=False)

    # 4. metric margin from a validation run
    try:
        validate_dir = find_run_dir(args.validate_dir, cfg["paths"]["validate_dir"], run.config_name,
                                    "oof_predictions.csv", "validate_rsna.py")
    except InputError as exc:
        validate_dir = None
        run.log(str(exc))
    if validate_dir is not None:
        oof = pd.read_csv(Path(validate_dir) / "oof_predictions.csv")
        base = pd.read_csv(Path(validate_dir) / "oof_prior_baseline.csv")
        cols = list(SUBMISSION_COLUMNS)
        model = score_details(solution_from_labels(oof), submission_frame(oof["row_id"], oof[cols].to_numpy()), "row_id", 1.0,
                             mode="normalized")
        prior = score_details(solution_from_labels(base), submission_frame(base["row_id"], base[cols].to_numpy()),
                              "row_id", 1.0, mode="normalized")
        results.update({"oof_official_score": model["score"], "class_prior_baseline": prior["score"],
                        "margin_vs_prior": prior["score"] - model["score"], "n_targets": model["n_rows"]})
        run.log(f"official metric (OOF, {model['n_rows']} targets): two-stage {model['score']:.4f} vs class prior "
                f"{prior['score']:.4f}: margin {prior['score'] - model['score']:+.4f} "
                f"({'beats' if model['score'] < prior['score'] else 'does NOT beat'} the baseline)")
    else:
        run.log("no validation run found: run validate_rsna.py first for the metric margin")
    headline = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()
                if k in ("series_per_s_1_worker", "series_per_s_2_worker", "samples_per_s_cache_warm",
                         "samples_per_s_dicom", "speedup_cached_vs_dicom", "margin_vs_prior")}
    return run.finish({**results, "headline": headline})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
