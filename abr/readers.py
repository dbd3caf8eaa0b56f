"""Readers for what ABR labs export, and the checks every reading gets (units, polarity, amplitude scale,
level reference). Each reader returns :class:`abr.data.Recordings`; every problem is a
:class:`abr.data.TableError` (an InputError) naming the file and the field.

Layouts (``data.format``; ``auto`` picks by suffix and header, and says which it picked):

- ``clinical``: the Interacoustics Eclipse table, one row per recording, numbered sample columns
  (abr/data.py).
- ``long``: CSV, one row per subject / ear / level; the waveform either in one cell (``data.columns.samples``,
  default ``Samples``: numbers separated by spaces or semicolons) or in a file named by
  ``data.columns.file`` (default ``File``: .npy, or a one-column .csv/.txt, relative to the table). An optional
  ``data.columns.sampling_rate`` column (default ``Sampling Rate``, Hz) overrides ``data.sampling_rate_hz``
  per row; rows at another rate are resampled to the first row's rate (noted).
- ``arrays``: NumPy ``.npz`` or MATLAB ``.mat`` (scipy.io.loadmat) with the arrays named by ``data.array_keys``
  (signals (N, S) and intensity_db (N,) required; sampling_rate_hz, pre_stimulus_ms, patient_id, ear,
  age_years, rate_per_s, hearing_loss, threshold_db optional); signals stored one recording per column
  (S, N), as MATLAB users often do, are transposed when the level count says so; a bare ``.npy`` (L, S) is one
  ear, its levels from ``data.array_levels_db``.
- ``abra``: the CSV the ABRA tool reads from Tucker-Davis BioSigRZ: columns ``Freq(Hz)`` and ``Level(dB)``,
  then the waveform samples ending each row; one file per subject (the file stem is the subject id),
  the stimulus frequency separates the series (0 or "click" = click). Sampling rate
  ``data.abra_sampling_rate_hz`` (default 24414.0625 Hz, a TDT RZ6: 244 samples ≈ 10 ms).

Applied to every layout, in this order (each visible in ``Recordings.notes``):

1. ``data.units`` (V, mV, uV, nV; default uV): samples and amplitude columns are converted to µV.
2. ``data.signal_polarity`` (vertex_positive, the default and the convention the classical wave V search,
   the figures and the denoised traces assume; vertex_negative = the lab displays vertex-negative up:
   samples are multiplied by −1). Nothing is detected: the option alone decides what the model sees. The
   model is trained with random inversion (``train.polarity_inversion_prob``), so a wrong setting moves its
   thresholds little (abr/README.md measures how little), but peaks drawn and the classical wave V are only
   right when it is declared. This is the display sign of the recording, not the click: the ``Stimulus
   Polarity`` column (Alternating, Rarefaction, Condensation) is read for ``data.keep_polarities`` only; a
   single-polarity average also holds the cochlear microphonic, which alternating averages cancel.
   ``unknown``: the traces are used as exported and the classical wave V search finds the sign of each ear
   (abr/classical.py:wave_v_sign); the model does not need it (predict.polarity_tta).
3. The amplitude-scale check (``data.amplitude_check``: error, the default | convert | off): the median
   RMS of the recordings must lie within ``AMPLITUDE_RANGE_UV`` (an averaged ABR, response or residual
   noise). Otherwise the samples are in another unit (a table in volts read as µV is ~1e-7 µV, one in nV
   ~100 µV): ``error`` refuses naming ``data.units`` and the unit that fits; ``convert`` converts to that
   unit with a warning.
4. ``data.level_reference`` (dB nHL, the default, dB SPL, peSPL, SL or HL; abr/levels.py) and
   ``data.level_offset_db`` (added to the input's levels to reach the model's reference, named by
   ``data.converted_level_reference``; default 0): outputs are given back in the input's reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from abr.data import (
    DEFAULT_COLUMNS,
    NO_RESPONSE_WORDS,
    Recordings,
    TableError,
    load_clinical,
    read_table,
)
from abr.dsp import resample
from abr.labels import UNKNOWN_CLASS, WAVES, class_index_or_unknown
from abr.levels import canonical_level_reference

UNITS_TO_UV = {"V": 1e6, "mV": 1e3, "uV": 1.0, "µV": 1.0, "nV": 1e-3}
AMPLITUDE_RANGE_UV = (0.003, 30.0)  # median RMS of averaged ABR recordings, µV (response or residual noise)
TYPICAL_RMS_UV = 0.2
FORMATS = ("auto", "clinical", "long", "arrays", "abra")
POLARITIES = ("vertex_positive", "vertex_negative", "unknown")
ARRAY_KEYS = {"signals": "signals", "intensity_db": "intensity_db", "sampling_rate_hz": "sampling_rate_hz",
              "pre_stimulus_ms": "pre_stimulus_ms", "patient_id": "patient_id", "ear": "ear",
              "age_years": "age_years", "rate_per_s": "rate_per_s", "hearing_loss": "hearing_loss",
              "threshold_db": "threshold_db"}
LONG_COLUMNS = {"samples": "Samples", "file": "File", "sampling_rate": "Sampling Rate"}
ABRA_COLUMNS = ("Freq(Hz)", "Level(dB)")


class AmplitudeScaleError(TableError):
    """Sample amplitudes that do not fit an averaged ABR in the configured unit."""


# ------------------------------------------------------------------------------------------- helpers
def _recordings(source: str, fs: float, pre_ms: float, signals: np.ndarray, intensity: np.ndarray, *,
                patient_id=None, ear=None, age=None, rate=None, class_idx=None, threshold=None,
                row_number=None, notes=None, stimulus=None) -> Recordings:
    """A Recordings of ``signals`` (N, S) with unknown metadata where not given."""
    n = signals.shape[0]
    unknown = np.full(n, np.nan)
    nw = len(WAVES)
    return Recordings(
        source=source, sampling_rate_hz=float(fs), pre_stimulus_ms=float(pre_ms),
        patient_id=np.asarray(patient_id if patient_id is not None else [Path(source).stem] * n).astype(str),
        ear=np.asarray(ear if ear is not None else [""] * n).astype(str),
        age_years=unknown.copy() if age is None else np.asarray(age, dtype=np.float64),
        intensity_db=np.asarray(intensity, dtype=np.float64),
        rate_per_s=unknown.copy() if rate is None else np.asarray(rate, dtype=np.float64),
        class_idx=np.full(n, UNKNOWN_CLASS, dtype=np.int64) if class_idx is None else np.asarray(class_idx, np.int64),
        threshold_db=unknown.copy() if threshold is None else np.asarray(threshold, dtype=np.float64),
        latency_ms=np.full((n, nw), np.nan), amplitude_uv=np.full((n, nw), np.nan),
        peaks_known=np.zeros((n, nw), dtype=bool), signals_uv=np.asarray(signals, dtype=np.float64),
        fmp=unknown.copy(), row_number=np.arange(n) + 2 if row_number is None else np.asarray(row_number),
        notes=list(notes or []), window_ms=signals.shape[1] / float(fs) * 1000.0, stimulus=stimulus)


def _threshold_value(value, where: str) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return math.nan
    text = "".join(ch for ch in str(value).upper() if ch.isalnum())
    if text in NO_RESPONSE_WORDS or str(value).strip().startswith(">"):
        return math.inf
    try:
        return float(value)
    except ValueError:
        raise TableError(f"{where}: threshold {value!r} is neither a number, 'NR' nor empty") from None


def _finite_rate(value, source: str, field: str) -> float:
    try:
        fs = float(np.asarray(value).squeeze())
    except (TypeError, ValueError):
        raise TableError(f"{source}: {field} = {value!r} is not a sampling rate in Hz") from None
    if not math.isfinite(fs) or fs <= 0:
        raise TableError(f"{source}: {field} = {fs!r} is not a positive sampling rate in Hz")
    return fs


# ------------------------------------------------------------------------------------------- layouts
def detect_format(path: Path, data_cfg: dict) -> str:
    """``data.format`` or, for ``auto``, the layout the file looks like."""
    fmt = data_cfg.get("format", "auto") or "auto"
    if fmt not in FORMATS:
        raise TableError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy", ".mat"):
        return "arrays"
    if suffix in (".csv", ".txt", ".tsv"):
        try:
            header = read_table_header(path)
        except (OSError, UnicodeDecodeError):
            return "clinical"
        cols = {**DEFAULT_COLUMNS, **LONG_COLUMNS, **(data_cfg.get("columns") or {})}
        if all(name in header for name in ABRA_COLUMNS):
            return "abra"
        if cols["samples"] in header or cols["file"] in header:
            return "long"
    return "clinical"


def read_table_header(path: Path) -> list[str]:
    for enc in ("utf-8-sig", "cp1254"):
        try:
            with path.open("r", encoding=enc) as handle:
                line = handle.readline()
            break
        except UnicodeDecodeError:
            continue
    sep = ";" if line.count(";") > line.count(",") else "\t" if "\t" in line else ","
    return [c.strip().strip('"') for c in line.strip().split(sep)]


def _parse_samples(text, where: str) -> np.ndarray:
    parts = str(text).replace(";", " ").replace(",", " ").split()
    try:
        values = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise TableError(f"{where}: the samples are not numbers separated by spaces or semicolons") from None
    if values.size < 8 or not np.all(np.isfinite(values)):
        raise TableError(f"{where}: {values.size} samples, or some empty/NaN: not a waveform")
    return values


def _trace_file(path: Path, where: str) -> np.ndarray:
    if not path.is_file():
        raise TableError(f"{where}: waveform file not found: {path}")
    if path.suffix.lower() == ".npy":
        from common.files import load_npy

        values = np.asarray(load_npy(path), dtype=np.float64).ravel()
    else:
        try:
            values = pd.read_csv(path, header=None, sep=None, engine="python").to_numpy(dtype=np.float64).ravel()
        except (ValueError, pd.errors.ParserError) as exc:
            raise TableError(f"{where}: {path} is not a one-column table of numbers ({exc})") from exc
    if values.size < 8 or not np.all(np.isfinite(values)):
        raise TableError(f"{where}: {path} holds {values.size} samples, or some empty/NaN: not a waveform")
    return values


def read_long(path: Path, data_cfg: dict) -> Recordings:
    """One row per subject / ear / level, samples in a cell or in a file named by the row."""
    source = str(path)
    table = read_table(path, data_cfg.get("encoding", "auto"), data_cfg.get("sheet"))
    cols = {**DEFAULT_COLUMNS, **LONG_COLUMNS, **(data_cfg.get("columns") or {})}
    for key in ("patient_id", "intensity"):
        if cols[key] not in table.columns:
            raise TableError(f"{source}: column '{cols[key]}' (data.columns.{key}) not found (required); "
                             f"columns are: {', '.join(table.columns[:16])}")
    in_cell = cols["samples"] in table.columns
    if not in_cell and cols["file"] not in table.columns:
        raise TableError(f"{source}: neither a '{cols['samples']}' (data.columns.samples) nor a '{cols['file']}' "
                         "(data.columns.file) column: where are the waveforms?")
    default_fs = _finite_rate(data_cfg.get("sampling_rate_hz"), source, "data.sampling_rate_hz")
    notes: list = []
    traces, rates = [], []
    for i, row in table.iterrows():
        where = f"{source}: row {i + 2}"
        if in_cell:
            traces.append(_parse_samples(row[cols["samples"]], f"{where} column '{cols['samples']}'"))
        else:
            traces.append(_trace_file(path.parent / str(row[cols["file"]]).strip(), f"{where} column '{cols['file']}'"))
        fs = default_fs
        if cols["sampling_rate"] in table.columns and pd.notna(row[cols["sampling_rate"]]):
            fs = _finite_rate(row[cols["sampling_rate"]], source, f"row {i + 2} column '{cols['sampling_rate']}'")
        rates.append(fs)
    fs0 = rates[0]
    if any(abs(r - fs0) > 1e-6 * fs0 for r in rates):
        notes.append(f"rows at other sampling rates resampled to {fs0:g} Hz")
        traces = [t if abs(r - fs0) <= 1e-6 * fs0 else resample(t, r, fs0) for t, r in zip(traces, rates)]
    lengths = {t.size for t in traces}
    n = max(lengths)
    if len(lengths) > 1:
        notes.append(f"waveforms of {min(lengths)}-{n} samples: shorter ones zero-padded at the end to {n}")
    signals = np.stack([np.pad(t, (0, n - t.size)) for t in traces])
    intensity = pd.to_numeric(table[cols["intensity"]], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(intensity)):
        first = int(np.flatnonzero(~np.isfinite(intensity))[0])
        raise TableError(f"{source}: column '{cols['intensity']}' row {first + 2}: "
                         f"{table[cols['intensity']].iloc[first]!r} is not a level in dB")

    def optional_numeric(key):
        name = cols.get(key)
        if name is None or name not in table.columns:
            return None
        return pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)

    classes = None
    if cols.get("hearing_loss") and cols["hearing_loss"] in table.columns:
        classes = [class_index_or_unknown(v, f"{source}: column '{cols['hearing_loss']}' row {i + 2}")
                   for i, v in enumerate(table[cols["hearing_loss"]].tolist())]
    threshold = None
    if cols.get("threshold") and cols["threshold"] in table.columns:
        threshold = [_threshold_value(v, f"{source}: column '{cols['threshold']}' row {i + 2}")
                     for i, v in enumerate(table[cols["threshold"]].tolist())]
    ear = table[cols["ear"]].astype(str).str.strip().to_numpy() if cols.get("ear") in table.columns else None
    age = optional_numeric("age")
    if age is not None:
        age = age * {"years": 1.0, "months": 1 / 12, "days": 1 / 365.25}[data_cfg.get("age_unit", "years")]
    pre = float(data_cfg.get("pre_stimulus_ms", 0.0) or 0.0)
    return _recordings(source, fs0, pre, signals, intensity,
                       patient_id=table[cols["patient_id"]].astype(str).str.strip().to_numpy(), ear=ear, age=age,
                       rate=optional_numeric("rate"), class_idx=classes, threshold=threshold, notes=notes)


def _load_arrays(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".mat":
        from scipy.io import loadmat

        try:
            raw = loadmat(path, squeeze_me=True)
        except (ValueError, OSError, NotImplementedError) as exc:  # truncated, or a v7.3 (HDF5) file
            raise TableError(f"{path}: not a readable MATLAB file (v7.3 files: save with -v7) ({exc})") from exc
        return {k: v for k, v in raw.items() if not k.startswith("__")}
    if suffix == ".npz":
        from common.files import load_npz

        return dict(load_npz(path))
    from common.files import load_npy

    return {"signals": load_npy(path)}


def _strings(values, n: int, source: str, field: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=object)).ravel()
    if arr.size == 1 and n > 1:
        arr = np.repeat(arr, n)
    if arr.size != n:
        raise TableError(f"{source}: array '{field}' has {arr.size} entries for {n} recordings")
    return np.array([str(np.asarray(v).squeeze()) if not isinstance(v, str) else v.strip() for v in arr])


def read_arrays(path: Path, data_cfg: dict) -> Recordings:
    """.npz / .mat (named arrays) or .npy (one ear, levels from data.array_levels_db)."""
    source = str(path)
    keys = {**ARRAY_KEYS, **(data_cfg.get("array_keys") or {})}
    data = _load_arrays(path)
    notes: list = []
    if keys["signals"] not in data:
        raise TableError(f"{source}: no array '{keys['signals']}' (data.array_keys.signals); arrays are: "
                         f"{', '.join(sorted(data)[:20])}")
    signals = np.asarray(data[keys["signals"]], dtype=np.float64)
    if signals.ndim == 1:
        signals = signals[None]
    if signals.ndim != 2:
        raise TableError(f"{source}: array '{keys['signals']}' has shape {signals.shape}; expected (recordings, samples)")
    if not np.all(np.isfinite(signals)):
        raise TableError(f"{source}: array '{keys['signals']}' holds NaN or infinite samples")
    if keys["intensity_db"] in data:
        intensity = np.atleast_1d(np.asarray(data[keys["intensity_db"]], dtype=np.float64)).ravel()
    elif data_cfg.get("array_levels_db"):
        intensity = np.asarray(data_cfg["array_levels_db"], dtype=np.float64)
    else:
        raise TableError(f"{source}: no array '{keys['intensity_db']}' (data.array_keys.intensity_db) and no "
                         "data.array_levels_db: the stimulus level of each recording is required")
    if signals.shape[0] != intensity.size and signals.shape[1] == intensity.size:  # one level per column
        notes.append(f"array '{keys['signals']}' {signals.shape} read as (samples, recordings) and transposed")
        signals = signals.T
    n = signals.shape[0]
    if intensity.size != n:
        raise TableError(f"{source}: {intensity.size} levels (intensity_db / data.array_levels_db) for {n} recordings")
    if keys["sampling_rate_hz"] in data:
        fs = _finite_rate(data[keys["sampling_rate_hz"]], source, f"array '{keys['sampling_rate_hz']}'")
    else:
        fs = _finite_rate(data_cfg.get("sampling_rate_hz"), source, "data.sampling_rate_hz")
        notes.append(f"sampling rate not in the file: data.sampling_rate_hz = {fs:g} Hz assumed")
    pre = float(np.asarray(data[keys["pre_stimulus_ms"]]).squeeze()) if keys["pre_stimulus_ms"] in data \
        else float(data_cfg.get("pre_stimulus_ms", 0.0) or 0.0)

    def numeric(key):
        if keys[key] not in data:
            return None
        values = np.atleast_1d(np.asarray(data[keys[key]], dtype=np.float64)).ravel()
        return np.repeat(values, n) if values.size == 1 else values

    classes = None
    if keys["hearing_loss"] in data:
        classes = [class_index_or_unknown(v, f"{source}: array '{keys['hearing_loss']}' entry {i}")
                   for i, v in enumerate(_strings(data[keys["hearing_loss"]], n, source, keys["hearing_loss"]))]
    threshold = None
    if keys["threshold_db"] in data:
        threshold = [_threshold_value(v, f"{source}: array '{keys['threshold_db']}' entry {i}")
                     for i, v in enumerate(_strings(data[keys["threshold_db"]], n, source, keys["threshold_db"]))]
    pid = _strings(data[keys["patient_id"]], n, source, keys["patient_id"]) if keys["patient_id"] in data else None
    ear = _strings(data[keys["ear"]], n, source, keys["ear"]) if keys["ear"] in data else None
    return _recordings(source, fs, pre, signals, intensity, patient_id=pid, ear=ear, age=numeric("age_years"),
                       rate=numeric("rate_per_s"), class_idx=classes, threshold=threshold, notes=notes)


def read_abra(path: Path, data_cfg: dict) -> Recordings:
    """ABRA / TDT BioSigRZ CSV: Freq(Hz), Level(dB), then the samples; one subject per file."""
    source = str(path)
    table = read_table(path, data_cfg.get("encoding", "auto"), data_cfg.get("sheet"))
    missing = [c for c in ABRA_COLUMNS if c not in table.columns]
    if missing:
        raise TableError(f"{source}: ABRA layout needs columns {', '.join(ABRA_COLUMNS)}; missing {', '.join(missing)}")
    meta_cols = [c for c in table.columns if c in ABRA_COLUMNS or not _is_number(c)]
    sample_cols = [c for c in table.columns if c not in meta_cols]
    if not sample_cols:
        raise TableError(f"{source}: no sample columns after {', '.join(meta_cols)}")
    signals = table[sample_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.all(np.isfinite(signals), axis=1)
    notes = []
    if bad.any():  # BioSigRZ rows of unequal length leave empty cells at the end: keep the common part
        lengths = np.array([np.flatnonzero(np.isfinite(r))[-1] + 1 if np.isfinite(r).any() else 0 for r in signals])
        n = int(lengths.min())
        if n < 8 or not np.all(np.isfinite(signals[:, :n])):
            first = int(np.flatnonzero(bad)[0])
            raise TableError(f"{source}: row {first + 2}: empty or non-numeric samples")
        notes.append(f"rows of unequal length: cropped to the common {n} samples")
        signals = signals[:, :n]
    level = pd.to_numeric(table["Level(dB)"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(level)):
        first = int(np.flatnonzero(~np.isfinite(level))[0])
        raise TableError(f"{source}: column 'Level(dB)' row {first + 2}: {table['Level(dB)'].iloc[first]!r} is not a level")
    stimulus = []
    for value in table["Freq(Hz)"].tolist():
        number = pd.to_numeric(value, errors="coerce")
        stimulus.append("click" if str(value).strip().lower() == "click" or number == 0 or pd.isna(number)
                        else f"{float(number) / 1000.0:g}kHz")
    fs = _finite_rate(data_cfg.get("abra_sampling_rate_hz", 24414.0625), source, "data.abra_sampling_rate_hz")
    stimulus = np.array(stimulus)
    return _recordings(source, fs, float(data_cfg.get("pre_stimulus_ms", 0.0) or 0.0), signals, level,
                       ear=stimulus, notes=notes, stimulus=stimulus)


def _is_number(name) -> bool:
    try:
        float(str(name))
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- checks
def suggest_unit(rms_uv: float, units: str) -> str:
    """The unit under which ``rms_uv`` (read as ``units``) comes closest to a typical ABR RMS."""
    raw = rms_uv / UNITS_TO_UV[units]
    options = {u: raw * f for u, f in UNITS_TO_UV.items() if u != "µV"}
    return min(options, key=lambda u: abs(math.log10(max(options[u], 1e-30)) - math.log10(TYPICAL_RMS_UV)))


def check_amplitude_scale(signals_uv: np.ndarray, units: str, mode: str, source: str) -> tuple[float, str | None]:
    """(factor, note): refuse (``error``) or convert (``convert``: the factor to multiply by, with a note)
    recordings whose median RMS lies outside AMPLITUDE_RANGE_UV; ``off`` skips the check."""
    if mode == "off":
        return 1.0, None
    if mode not in ("error", "convert"):
        raise TableError(f"data.amplitude_check must be error, convert or off, got {mode!r}")
    centred = signals_uv - signals_uv.mean(axis=1, keepdims=True)
    rms = float(np.median(np.sqrt(np.mean(centred**2, axis=1))))
    lo, hi = AMPLITUDE_RANGE_UV
    if lo <= rms <= hi:
        return 1.0, None
    guess = suggest_unit(rms, units)
    factor = UNITS_TO_UV[guess] / UNITS_TO_UV[units]
    message = (f"median RMS {rms:.3g} µV with data.units = {units}; an averaged ABR lies within {lo:g}-{hi:g} µV: "
               f"the samples look like {guess} (set data.units: {guess}, or data.amplitude_check: convert)")
    if mode == "error" or guess == units:
        raise AmplitudeScaleError(f"{source}: data.units: {message}")
    return factor, f"WARNING amplitude scale: {message}; converted as {guess} (×{factor:g})"


def finish_recordings(recs: Recordings, data_cfg: dict) -> Recordings:
    """Units, polarity, the amplitude-scale check and the level reference (see the module docstring)."""
    units = data_cfg.get("units", "uV") or "uV"
    if units not in UNITS_TO_UV:
        raise TableError(f"data.units must be one of V, mV, uV, nV, got {units!r}")
    factor = UNITS_TO_UV[units]
    recs.signals_uv = recs.signals_uv * factor
    recs.amplitude_uv = recs.amplitude_uv * factor
    if units not in ("uV", "µV"):
        recs.notes.append(f"samples in {units}, converted to µV (×{factor:g})")
    polarity = data_cfg.get("signal_polarity", "vertex_positive") or "vertex_positive"
    if polarity not in POLARITIES:
        raise TableError(f"data.signal_polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
    if polarity == "vertex_negative":
        recs.signals_uv = -recs.signals_uv
        recs.notes.append("data.signal_polarity = vertex_negative: traces inverted (vertex positive up)")
    elif polarity == "unknown":
        recs.notes.append("data.signal_polarity = unknown: traces used as exported; the classical wave V search "
                          "chooses the sign per ear (abr/classical.py:wave_v_sign)")
    else:
        recs.notes.append("data.signal_polarity = vertex_positive: traces used as exported (set vertex_negative "
                          "if the lab displays vertex-negative up)")
    rescale, note = check_amplitude_scale(recs.signals_uv, units, data_cfg.get("amplitude_check", "error") or "error",
                                          recs.source)
    if note:
        recs.notes.append(note)
        recs.signals_uv = recs.signals_uv * rescale
        recs.amplitude_uv = recs.amplitude_uv * rescale
    offset = float(data_cfg.get("level_offset_db", 0.0) or 0.0)
    recs.level_reference = canonical_level_reference(data_cfg.get("level_reference", "dB nHL"), recs.source)
    recs.level_offset_db = offset
    if offset:
        recs.intensity_db = recs.intensity_db + offset
        recs.threshold_db = recs.threshold_db + offset
        recs.notes.append(f"levels in {recs.level_reference} + {offset:g} dB = the model's reference")
    if not math.isfinite(recs.window_ms):
        recs.window_ms = recs.signals_uv.shape[1] / recs.sampling_rate_hz * 1000.0
    return recs


READERS = {"clinical": load_clinical, "long": read_long, "arrays": read_arrays, "abra": read_abra}


def read_recordings(path: str | Path, data_cfg: dict) -> Recordings:
    """Read ``path`` in its layout (``data.format``) and apply :func:`finish_recordings`."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"input not found: {path}")
    fmt = detect_format(path, data_cfg)
    recs = READERS[fmt](path, data_cfg)
    if (data_cfg.get("format", "auto") or "auto") == "auto" and fmt != "clinical":
        recs.notes.insert(0, f"layout detected: {fmt}")
    return finish_recordings(recs, data_cfg)
