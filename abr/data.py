"""Reader and writer of the clinical ABR table (Interacoustics Eclipse export layout), CSV or Excel.

One row per recording: metadata columns, then the waveform as numbered sample columns ("1".."N", µV).
Column names come from the ``data.columns`` config (defaults below, as the synthetic generator writes
them); a column mapped to ``null`` is not used. Every problem is a :class:`TableError` that names the
file, the column and, where it applies, the row (1-based, as a spreadsheet shows it, header = row 1).

Columns (config key → default name):
  patient_id Patient_ID · ear Ear (R/L; optional) · age Age (years by default) · intensity Intensity
  (dB nHL) · rate Stimulus Rate (/s) · fmp FMP · sweeps_rejected Sweeps Rejected · polarity Stimulus
  Polarity · hearing_loss Hear_Loss (NORMAL, SNİK, İTİK, TOTAL, NÖROPATİ or ASCII/English aliases) ·
  threshold Threshold (dB nHL; "NR" = no response at any level; empty = unknown) · latency_I/III/V
  "I Latency" ... (ms; empty = wave absent) · amplitude_I/III/V "I Amplitude" ... (µV).

Only patient_id and intensity are required. Age, rate, hearing-loss class, threshold, FMP, sweeps, polarity and
the peak columns are optional: a column missing under its default name is treated as absent (noted in
``Recordings.notes``, no ``--set ...=null`` needed); a column renamed in the config must exist (a typo is
an error). An empty age / rate / class cell, or a class spelled "unknown", is unknown (NaN / -1): the model
is conditioned on "unknown" (abr/dataset.py) and the class loss skips it.

Sweep rejection: ``data.max_rejected_fraction`` drops recordings whose rejected / (rejected + accepted)
sweeps exceed the fraction (needs both columns); ``data.max_sweeps_rejected`` (absolute, off by default)
is kept for exports without an accepted-sweeps column. Both are counted in ``Recordings.dropped``.

Other layouts (long CSV, NumPy, MATLAB, ABRA/TDT CSV), units, polarity and level reference: abr/readers.py.

FMP (Elberling & Don's response-detection statistic, Fmp ≥ 3.1 ≈ 99 % confidence) is read and kept
for reporting only: it encodes the wave-present label, so it is never a model input.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from abr.labels import UNKNOWN_CLASS, WAVES, class_index_or_unknown
from common.errors import InputError, NothingProcessedError

DEFAULT_COLUMNS = {
    "patient_id": "Patient_ID",
    "ear": "Ear",
    "age": "Age",
    "intensity": "Intensity",
    "rate": "Stimulus Rate",
    "fmp": "FMP",
    "sweeps_rejected": "Sweeps Rejected",
    "sweeps_accepted": "Sweeps Accepted",
    "polarity": "Stimulus Polarity",
    "hearing_loss": "Hear_Loss",
    "threshold": "Threshold",
    "latency_I": "I Latency",
    "amplitude_I": "I Amplitude",
    "latency_III": "III Latency",
    "amplitude_III": "III Amplitude",
    "latency_V": "V Latency",
    "amplitude_V": "V Amplitude",
    "sample_prefix": "",  # sample columns are "<prefix>1" .. "<prefix>N"
    "samples": "Samples",  # long layout: the waveform in one cell (abr/readers.py)
    "file": "File",  # long layout: the waveform in a file named by the row
    "sampling_rate": "Sampling Rate",  # long layout: per-row sampling rate (Hz), optional
}
REQUIRED = ("patient_id", "intensity")
NO_RESPONSE_WORDS = {"NR", "NORESPONSE", "YOK", "CEVAPYOK", "YANITYOK", "ABSENT", "NONE"}
AGE_TO_YEARS = {"years": 1.0, "months": 1.0 / 12.0, "days": 1.0 / 365.25}


class TableError(InputError):
    """A table that cannot be used as it is; the message names the file, column and row."""


class NoRecordingsError(TableError, NothingProcessedError):
    """Every recording of the table was dropped by the checks: nothing to preprocess (non-zero exit)."""


@dataclass
class Recordings:
    """Validated recordings as arrays (N rows, W = 3 waves, S samples)."""

    source: str
    sampling_rate_hz: float
    pre_stimulus_ms: float
    patient_id: np.ndarray  # (N,) str
    ear: np.ndarray  # (N,) str ("" when the table has no ear column)
    age_years: np.ndarray
    intensity_db: np.ndarray
    rate_per_s: np.ndarray
    class_idx: np.ndarray  # (N,) int into CLASS_NAMES
    threshold_db: np.ndarray  # (N,) NaN unknown, +inf no response
    latency_ms: np.ndarray  # (N, W) NaN where absent
    amplitude_uv: np.ndarray  # (N, W)
    peaks_known: np.ndarray  # (N, W) bool: the table has this wave's columns
    signals_uv: np.ndarray  # (N, S)
    fmp: np.ndarray  # (N,) NaN when absent (reporting only, never a model input)
    row_number: np.ndarray  # (N,) spreadsheet row of each recording
    dropped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # repairs and assumptions, shown in the log and the outputs
    window_ms: float = float("nan")  # the recordings' own window (samples / rate), before any crop or pad
    level_reference: str = "dB nHL"  # the input's level reference (intensity_db and threshold_db are in it)
    level_offset_db: float = 0.0  # added to the input's levels to get the model's reference
    stimulus: np.ndarray | None = None  # (N,) str: "click" or the tone frequency, when the layout has it

    def __len__(self) -> int:
        return int(self.patient_id.size)


# ------------------------------------------------------------------------------------------------ io
def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """CSV as UTF-8 with a byte-order mark (Excel then shows SNİK / NÖROPATİ correctly), or .xlsx."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    if path.suffix.lower() == ".csv":
        table.to_csv(tmp, index=False, encoding="utf-8-sig")
    elif path.suffix.lower() in (".xlsx", ".xlsm"):
        table.to_excel(tmp, index=False, engine="openpyxl")
    else:
        raise TableError(f"{path}: unsupported table format '{path.suffix}' (use .csv or .xlsx)")
    tmp.replace(path)
    return path


def read_table(path: str | Path, encoding: str = "auto", sheet=None) -> pd.DataFrame:
    """Read a CSV (UTF-8 with or without BOM; ``encoding="auto"`` falls back to the Turkish Windows
    code page cp1254) or an Excel sheet (``sheet``: name or index, default the first)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"table not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm", ".xls"):
        try:
            table = pd.read_excel(path, sheet_name=0 if sheet is None else sheet)
        except ValueError as exc:
            raise TableError(f"{path}: cannot read sheet {sheet!r}: {exc}") from exc
        except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:  # a half-copied or damaged workbook
            raise TableError(f"{path}: not a readable Excel workbook, truncated or damaged? "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    elif suffix in (".csv", ".txt", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        encodings = ["utf-8-sig", "cp1254"] if encoding == "auto" else [encoding]
        table = None
        for enc in encodings:
            try:
                with path.open("r", encoding=enc) as handle:
                    header = handle.readline()
                if sep == "," and header.count(";") > header.count(","):
                    # Excel in Turkish/European locales: semicolons between fields, decimal commas
                    table = pd.read_csv(path, sep=";", decimal=",", encoding=enc)
                else:
                    table = pd.read_csv(path, sep=sep, encoding=enc)
                break
            except UnicodeDecodeError:
                continue
        if table is None:
            raise TableError(f"{path}: not decodable as {' or '.join(encodings)} (set data.encoding)")
    else:
        raise TableError(f"{path}: unsupported table format '{path.suffix}' (use .csv or .xlsx)")
    table.columns = [_column_name(c) for c in table.columns]
    return table


def _column_name(name) -> str:
    if isinstance(name, float) and name.is_integer():
        return str(int(name))
    return str(name).strip()


# ------------------------------------------------------------------------------------------- parsing
def sample_columns(table: pd.DataFrame, prefix: str, source: str) -> list[str]:
    """The numbered sample columns in order; missing numbers are an error that names them."""
    numbered = {}
    for name in table.columns:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            numbered[int(name[len(prefix):])] = name
    if not numbered:
        raise TableError(f"{source}: no sample columns '{prefix}1'..'{prefix}N' (data.columns.sample_prefix="
                         f"{prefix!r}); columns are: {', '.join(list(table.columns)[:20])} ...")
    top = max(numbered)
    missing = [i for i in range(1, top + 1) if i not in numbered]
    if missing:
        shown = ", ".join(f"'{prefix}{i}'" for i in missing[:10])
        raise TableError(f"{source}: sample column(s) {shown} missing (found {len(numbered)} of "
                         f"'{prefix}1'..'{prefix}{top}')")
    return [numbered[i] for i in range(1, top + 1)]


def _check_columns(table: pd.DataFrame, columns: dict, source: str, notes: list | None = None) -> dict:
    """The column map actually used. A required column must exist; an optional column missing under its
    default name is dropped from the map (noted); one the config renamed must exist (a typo is an error)."""
    for key in REQUIRED:
        if columns.get(key) is None:
            raise TableError(f"{source}: data.columns.{key} is required and cannot be null")
    used = dict(columns)
    absent = []
    order = list(REQUIRED) + [k for k in columns if k not in REQUIRED]  # required columns reported first
    for key in order:
        name = columns.get(key)
        if key in ("sample_prefix", "samples", "file", "sampling_rate") or name is None:
            continue
        if name not in table.columns:
            if key not in REQUIRED and name == DEFAULT_COLUMNS.get(key):
                used[key] = None
                absent.append(name)
                continue
            need = "required" if key in REQUIRED else f"set data.columns.{key}: null if the table has none"
            raise TableError(f"{source}: column '{name}' (data.columns.{key}) not found ({need}); "
                             f"the table's columns start with: {', '.join(list(table.columns)[:16])}")
    if absent and notes is not None:
        notes.append(f"columns not in the table (treated as absent/unknown): {', '.join(absent)}")
    return used


def _numeric(table: pd.DataFrame, name: str, source: str, rows: np.ndarray, allow_nan: bool) -> np.ndarray:
    values = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) & table[name].notna().to_numpy()
    if not allow_nan:
        bad |= ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise TableError(f"{source}: column '{name}' row {rows[first]}: {table[name].iloc[first]!r} is not a "
                         f"number ({int(bad.sum())} such row(s))")
    return values


def _threshold(table: pd.DataFrame, name: str, source: str, rows: np.ndarray) -> np.ndarray:
    out = np.full(len(table), np.nan)
    for i, value in enumerate(table[name].tolist()):
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            continue
        text = "".join(ch for ch in str(value).upper() if ch.isalnum())
        if text in NO_RESPONSE_WORDS or str(value).strip().startswith(">"):
            out[i] = math.inf
            continue
        try:
            out[i] = float(value)
        except ValueError:
            raise TableError(f"{source}: column '{name}' row {rows[i]}: threshold {value!r} is neither a number "
                             f"in dB nHL, 'NR' (no response) nor empty (unknown)") from None
    return out


def parse_recordings(table: pd.DataFrame, data_cfg: dict, source: str = "table") -> Recordings:
    """Validate ``table`` against ``data_cfg`` (the ``data`` config section) and return arrays.

    Checks, each a TableError naming column and row: mapped columns present; numbered sample columns
    complete; their count consistent with ``sampling_rate_hz`` × ``window_ms``; no NaN / text in samples
    (or such rows dropped when ``nan_samples: drop``); known class names; numeric metadata; peak
    latencies inside the recording window (a latency past the window means the sampling rate is wrong).
    """
    notes: list = []
    columns = _check_columns(table, {**DEFAULT_COLUMNS, **(data_cfg.get("columns") or {})}, source, notes)
    table = table.reset_index(drop=True)
    rows = np.arange(len(table)) + 2  # spreadsheet row numbers (header is row 1)
    names = sample_columns(table, columns["sample_prefix"], source)
    fs = float(data_cfg["sampling_rate_hz"])
    if data_cfg.get("window_ms") is not None:
        expected = float(data_cfg["sampling_rate_hz"]) * float(data_cfg["window_ms"]) / 1000.0
        tolerance = float(data_cfg.get("sample_count_tolerance", 0.05))
        if abs(len(names) - expected) > tolerance * expected + 1:
            raise TableError(
                f"{source}: {len(names)} sample columns ('{names[0]}'..'{names[-1]}') but data.sampling_rate_hz="
                f"{fs:g} × data.window_ms={data_cfg['window_ms']:g} expects about {expected:.0f}: either the window "
                f"is {len(names) / fs * 1000:.2f} ms at {fs:g} Hz (set data.window_ms, or null to take it from the "
                f"sample count; the model grid is cropped or padded to it) or the sampling rate is "
                f"{len(names) / float(data_cfg['window_ms']) * 1000:.0f} Hz for a {data_cfg['window_ms']:g} ms "
                "window (set data.sampling_rate_hz)")
    signals = table[names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    dropped = {}
    bad_rows = ~np.all(np.isfinite(signals), axis=1)
    if bad_rows.any():
        if data_cfg.get("nan_samples", "error") == "drop":
            dropped["nan_samples"] = int(bad_rows.sum())
        else:
            first = int(np.flatnonzero(bad_rows)[0])
            column = names[int(np.flatnonzero(~np.isfinite(signals[first]))[0])]
            raise TableError(
                f"{source}: row {rows[first]} (patient {table[columns['patient_id']].iloc[first]}): sample column "
                f"'{column}' is empty, NaN or not a number ({int(bad_rows.sum())} row(s) affected; set "
                "data.nan_samples: drop to skip them)")
    keep = ~bad_rows
    if columns.get("polarity") and data_cfg.get("keep_polarities"):
        allowed = {str(p).strip().upper() for p in data_cfg["keep_polarities"]}
        ok = table[columns["polarity"]].astype(str).str.strip().str.upper().isin(allowed).to_numpy()
        dropped["polarity"] = int((keep & ~ok).sum())
        keep &= ok
    if columns.get("sweeps_rejected") and data_cfg.get("max_sweeps_rejected") is not None:
        swept = _numeric(table, columns["sweeps_rejected"], source, rows, allow_nan=True)
        ok = ~(swept >= float(data_cfg["max_sweeps_rejected"]))
        dropped["sweeps_rejected"] = int((keep & ~ok).sum())
        keep &= ok
    if data_cfg.get("max_rejected_fraction") is not None and columns.get("sweeps_rejected"):
        if columns.get("sweeps_accepted"):
            rejected = _numeric(table, columns["sweeps_rejected"], source, rows, allow_nan=True)
            accepted = _numeric(table, columns["sweeps_accepted"], source, rows, allow_nan=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                fraction = rejected / (rejected + accepted)
            ok = ~(fraction > float(data_cfg["max_rejected_fraction"]))
            dropped["rejected_fraction"] = int((keep & ~ok).sum())
            keep &= ok
        else:
            notes.append(f"sweep rejection not checked: no '{DEFAULT_COLUMNS['sweeps_accepted']}' column "
                         "(data.columns.sweeps_accepted) to form the rejected fraction")
    if not keep.any():
        raise NoRecordingsError(f"{source}: 0 of {len(keep)} recordings left after filtering ({dropped})")
    table, signals, rows = table[keep].reset_index(drop=True), signals[keep], rows[keep]

    age_unit = data_cfg.get("age_unit", "years")
    if age_unit not in AGE_TO_YEARS:
        raise TableError(f"data.age_unit must be one of {sorted(AGE_TO_YEARS)}, got {age_unit!r}")
    unknown = np.full(len(table), np.nan)
    age = (_numeric(table, columns["age"], source, rows, allow_nan=True) * AGE_TO_YEARS[age_unit]
           if columns.get("age") else unknown.copy())
    if (age < 0).any():
        first = int(np.flatnonzero(age < 0)[0])
        raise TableError(f"{source}: column '{columns['age']}' row {rows[first]}: negative age")
    intensity = _numeric(table, columns["intensity"], source, rows, allow_nan=False)
    rate = _numeric(table, columns["rate"], source, rows, allow_nan=True) if columns.get("rate") else unknown.copy()
    class_idx = np.full(len(table), UNKNOWN_CLASS, dtype=np.int64)
    if columns.get("hearing_loss"):
        labels = table[columns["hearing_loss"]]
        for value in pd.unique(labels):
            where = (np.flatnonzero((labels == value).to_numpy()) if not pd.isna(value)
                     else np.flatnonzero(labels.isna().to_numpy()))
            shown = ", ".join(str(r) for r in rows[where[:5]])
            class_idx[where] = class_index_or_unknown(
                value, f"{source}: column '{columns['hearing_loss']}' row(s) {shown}")
    for name, values in (("age", age), ("rate", rate)):
        if np.isnan(values).any():
            notes.append(f"{name} unknown for {int(np.isnan(values).sum())} of {len(table)} recordings")
    if (class_idx < 0).any():
        notes.append(f"hearing-loss class unknown for {int((class_idx < 0).sum())} of {len(table)} recordings")
    threshold = (_threshold(table, columns["threshold"], source, rows) if columns.get("threshold")
                 else np.full(len(table), np.nan))
    n_waves = len(WAVES)
    latency = np.full((len(table), n_waves), np.nan)
    amplitude = np.full((len(table), n_waves), np.nan)
    known = np.zeros((len(table), n_waves), dtype=bool)
    t_end_ms = len(names) / fs * 1000.0 - float(data_cfg.get("pre_stimulus_ms", 0.0))
    for w, wave in enumerate(WAVES):
        lat_col, amp_col = columns.get(f"latency_{wave}"), columns.get(f"amplitude_{wave}")
        if lat_col is None:
            continue
        known[:, w] = True
        latency[:, w] = _numeric(table, lat_col, source, rows, allow_nan=True)
        if amp_col is not None:
            amplitude[:, w] = _numeric(table, amp_col, source, rows, allow_nan=True)
        outside = np.isfinite(latency[:, w]) & ((latency[:, w] <= 0) | (latency[:, w] >= t_end_ms))
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise TableError(
                f"{source}: column '{lat_col}' row {rows[first]}: latency {latency[first, w]:g} ms lies outside the "
                f"recording window (0, {t_end_ms:.2f}) ms given by {len(names)} samples at {fs:g} Hz; check "
                "data.sampling_rate_hz and data.window_ms")
    fmp = (_numeric(table, columns["fmp"], source, rows, allow_nan=True) if columns.get("fmp")
           else np.full(len(table), np.nan))
    ear = (table[columns["ear"]].astype(str).str.strip().to_numpy() if columns.get("ear")
           else np.full(len(table), "", dtype=object))
    return Recordings(
        source=source, sampling_rate_hz=fs, pre_stimulus_ms=float(data_cfg.get("pre_stimulus_ms", 0.0)),
        patient_id=table[columns["patient_id"]].astype(str).str.strip().to_numpy(), ear=ear, age_years=age,
        intensity_db=intensity, rate_per_s=rate, class_idx=class_idx, threshold_db=threshold, latency_ms=latency,
        amplitude_uv=amplitude, peaks_known=known, signals_uv=signals, fmp=fmp, row_number=rows, dropped=dropped,
        notes=notes, window_ms=len(names) / fs * 1000.0)


def load_clinical(path: str | Path, data_cfg: dict) -> Recordings:
    """:func:`read_table` + :func:`parse_recordings` (the clinical layout only, samples as given)."""
    table = read_table(path, data_cfg.get("encoding", "auto"), data_cfg.get("sheet"))
    return parse_recordings(table, data_cfg, source=str(path))


def load_recordings(path: str | Path, data_cfg: dict) -> Recordings:
    """Any supported layout (``data.format``, see abr/readers.py), with units, polarity, the amplitude-scale
    check and the level reference applied."""
    from abr.readers import read_recordings

    return read_recordings(path, data_cfg)
