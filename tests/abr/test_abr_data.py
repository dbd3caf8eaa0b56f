"""Clinical table reader: CSV and Excel round trips (UTF-8 Turkish names), bad input with clear errors."""

import numpy as np
import pandas as pd
import pytest

from abr.data import DEFAULT_COLUMNS, TableError, load_recordings, parse_recordings, read_table, write_table
from abr.labels import CLASS_NAMES
from abr.synthetic import SYNTHETIC_DEFAULTS, generate_recordings

DATA_CFG = {"sampling_rate_hz": 30000.0, "window_ms": 15.0, "columns": dict(DEFAULT_COLUMNS)}


@pytest.fixture(scope="module")
def table():
    cfg = dict(SYNTHETIC_DEFAULTS, n_patients=4, intensity_step_db=25.0,
               class_probs={"NORMAL": 0.2, "SNIK": 0.2, "ITIK": 0.2, "TOTAL": 0.2, "NOROPATI": 0.2})
    frame, _ = generate_recordings(cfg, 30000.0, 15.0, seed=11)
    # make sure every Turkish spelling appears
    frame.loc[:4, "Hear_Loss"] = list(CLASS_NAMES)
    return frame


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_round_trip(table, tmp_path, suffix):
    path = write_table(table, tmp_path / f"abr{suffix}")
    recs = load_recordings(path, DATA_CFG)
    assert len(recs) == len(table)
    np.testing.assert_allclose(recs.signals_uv, table[[str(i + 1) for i in range(450)]].to_numpy(), atol=1e-9)
    np.testing.assert_array_equal(recs.intensity_db, table["Intensity"].to_numpy())
    assert [CLASS_NAMES[i] for i in recs.class_idx[:5]] == list(CLASS_NAMES)
    np.testing.assert_allclose(recs.latency_ms[:, 2], table["V Latency"].to_numpy(dtype=float), equal_nan=True)
    expected_thr = pd.to_numeric(table["Threshold"].replace("NR", np.inf)).to_numpy(dtype=float)
    np.testing.assert_array_equal(recs.threshold_db, expected_thr)


def test_csv_is_utf8_with_bom_and_keeps_turkish_letters(table, tmp_path):
    path = write_table(table, tmp_path / "abr.csv")
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    assert "NÖROPATİ".encode() in raw and "SNİK".encode() in raw


def test_cp1254_export_is_read_with_auto_encoding(table, tmp_path):
    path = tmp_path / "abr_cp1254.csv"
    table.to_csv(path, index=False, encoding="cp1254")
    recs = load_recordings(path, DATA_CFG)
    assert [CLASS_NAMES[i] for i in recs.class_idx[:5]] == list(CLASS_NAMES)


def test_semicolon_csv_with_decimal_commas_is_read(table, tmp_path):
    path = tmp_path / "abr_semicolon.csv"
    table.to_csv(path, index=False, sep=";", decimal=",", encoding="utf-8-sig")
    recs = load_recordings(path, DATA_CFG)
    np.testing.assert_allclose(recs.signals_uv, table[[str(i + 1) for i in range(450)]].to_numpy(), atol=1e-9)


def test_ascii_aliases_are_accepted(table):
    frame = table.copy()
    frame["Hear_Loss"] = frame["Hear_Loss"].map({"SNİK": "SNIK", "İTİK": "ITIK", "NÖROPATİ": "NOROPATI"}).fillna(frame["Hear_Loss"])
    recs = parse_recordings(frame, DATA_CFG)
    assert set(recs.class_idx) <= set(range(5))


def test_missing_sample_column_is_named(table):
    with pytest.raises(TableError, match=r"sample column\(s\) '37' missing"):
        parse_recordings(table.drop(columns=["37"]), DATA_CFG)


def test_wrong_sampling_rate_is_reported(table):
    with pytest.raises(TableError, match=r"450 sample columns .*sampling_rate_hz=20000.*30000 Hz"):
        parse_recordings(table, {**DATA_CFG, "sampling_rate_hz": 20000.0})


def test_latency_outside_the_window_points_at_the_sampling_rate(table):
    cfg = {**DATA_CFG, "sampling_rate_hz": 60000.0, "window_ms": 7.5}  # consistent count, wrong rate
    with pytest.raises(TableError, match=r"'(I|III|V) Latency' row \d+: latency .* outside the recording window"):
        parse_recordings(table, cfg)


def test_nan_sample_is_named_or_dropped(table):
    frame = table.copy()
    frame.loc[3, "120"] = np.nan
    with pytest.raises(TableError, match=r"row 5 \(patient P\d+\): sample column '120' is empty"):
        parse_recordings(frame, DATA_CFG)
    recs = parse_recordings(frame, {**DATA_CFG, "nan_samples": "drop"})
    assert len(recs) == len(frame) - 1 and recs.dropped["nan_samples"] == 1


def test_unknown_class_label_is_named(table):
    frame = table.copy()
    frame.loc[2, "Hear_Loss"] = "MIKST"
    with pytest.raises(ValueError, match=r"column 'Hear_Loss' row\(s\) 4: unknown hearing-loss class 'MIKST'"):
        parse_recordings(frame, DATA_CFG)


def test_missing_mapped_column_is_named(table):
    with pytest.raises(TableError, match=r"column 'Intensity' \(data.columns.intensity\) not found \(required\)"):
        parse_recordings(table.drop(columns=["Intensity"]), DATA_CFG)
    renamed = {**DATA_CFG, "columns": {**DEFAULT_COLUMNS, "threshold": "Esik"}}  # renamed in the config: a typo must fail
    with pytest.raises(TableError, match=r"'Esik' \(data.columns.threshold\) not found \(set data.columns.threshold: null"):
        parse_recordings(table, renamed)
    recs = parse_recordings(table.drop(columns=["Threshold"]),
                            {**DATA_CFG, "columns": {**DEFAULT_COLUMNS, "threshold": None}})
    assert np.isnan(recs.threshold_db).all()


def test_optional_columns_absent_under_their_default_names_need_no_flags(table):
    """Issue 16: no peak, FMP, sweeps, age, rate or class columns, and no `--set ...=null` flags."""
    optional = ["Age", "Stimulus Rate", "Hear_Loss", "FMP", "Sweeps Rejected", "Stimulus Polarity", "Threshold",
                "I Latency", "I Amplitude", "III Latency", "III Amplitude", "V Latency", "V Amplitude"]
    recs = parse_recordings(table.drop(columns=optional), DATA_CFG)
    assert len(recs) == len(table)
    assert np.isnan(recs.age_years).all() and np.isnan(recs.rate_per_s).all()
    assert (recs.class_idx == -1).all() and not recs.peaks_known.any()
    assert any("FMP" in note for note in recs.notes)


@pytest.mark.parametrize("value", ["", "unknown", "?", None])
def test_unknown_or_empty_class_is_unknown_not_a_crash(table, value):
    frame = table.copy().astype({"Hear_Loss": object, "Age": object})
    frame.loc[0, "Hear_Loss"] = value
    frame.loc[1, "Age"] = None
    recs = parse_recordings(frame, DATA_CFG)
    assert recs.class_idx[0] == -1 and recs.class_idx[1] >= 0
    assert np.isnan(recs.age_years[1]) and np.isfinite(recs.age_years[0])


def test_text_in_a_numeric_column_is_named(table):
    frame = table.copy().astype({"Intensity": object})
    frame.loc[1, "Intensity"] = "loud"
    with pytest.raises(TableError, match=r"column 'Intensity' row 3: 'loud' is not a number"):
        parse_recordings(frame, DATA_CFG)


def test_unreadable_table_kinds(tmp_path):
    with pytest.raises(TableError, match="table not found"):
        read_table(tmp_path / "missing.csv")
    other = tmp_path / "abr.json"
    other.write_text("{}", encoding="utf-8")
    with pytest.raises(TableError, match="unsupported table format"):
        read_table(other)


def test_filters_drop_rejected_recordings(table):
    frame = table.copy()
    frame["Stimulus Polarity"] = "Alternating"
    frame.loc[0, "Sweeps Rejected"] = 250
    frame.loc[1, "Stimulus Polarity"] = "Rarefaction"
    recs = parse_recordings(frame, {**DATA_CFG, "max_sweeps_rejected": 100, "keep_polarities": ["Alternating"]})
    assert recs.dropped == {"sweeps_rejected": 1, "polarity": 1}
    assert recs.row_number[0] == 4  # rows 2 and 3 of the sheet were dropped


def test_sweep_rejection_is_a_fraction(table):
    frame = table.copy()
    frame["Sweeps Accepted"] = 2000
    frame.loc[0, "Sweeps Rejected"] = 250  # 11 %: kept (an absolute 100 dropped it)
    frame.loc[1, "Sweeps Rejected"] = 2500  # 56 %: dropped
    recs = parse_recordings(frame, {**DATA_CFG, "max_rejected_fraction": 0.5})
    assert recs.dropped == {"rejected_fraction": 1}
    assert recs.row_number[0] == 2 and recs.row_number[1] == 4


def test_cache_of_a_table_without_class_or_age_conditions_on_unknown(table):
    from abr.dataset import STATIC_FEATURES, standardize_static
    from abr.defaults import abr_defaults
    from abr.evaluation import class_metrics

    frame = table.drop(columns=["Hear_Loss"]).astype({"Age": object})
    frame.loc[frame["Patient_ID"] == frame["Patient_ID"].iloc[0], "Age"] = None
    recs = parse_recordings(frame, DATA_CFG)
    cfg = abr_defaults()
    cfg["preprocess"].update(model_rate_hz=5000.0, unknown_metadata_fraction=0.0, short_window_fraction=0.0)
    from abr.preprocess_abr import build_cache

    arrays, meta = build_cache(recs, None, cfg)
    assert (arrays["series_class"] == -100).all()  # ignored by the class loss (ignore_index -100)
    static = standardize_static(arrays["static_raw"], meta)
    assert np.isfinite(static).all()
    age_known = STATIC_FEATURES.index("age_known")
    unknown = np.isnan(recs.age_years)
    assert unknown.any() and (arrays["static_raw"][unknown, age_known] == 0).all()
    assert static[unknown, STATIC_FEATURES.index("log_age_months")] == pytest.approx(0.0)  # the training mean
    assert np.isnan(class_metrics(np.zeros(0, int), np.zeros((0, 5)), list(CLASS_NAMES))["macro_f1"])


def test_training_augmentations_touch_training_ears_only(table):
    from abr.dataset import STATIC_FEATURES
    from abr.defaults import abr_defaults
    from abr.preprocess_abr import build_cache

    cfg = abr_defaults()
    cfg["preprocess"].update(model_rate_hz=5000.0, unknown_metadata_fraction=1.0, short_window_fraction=1.0,
                             split=[0.5, 0.25, 0.25])
    frame = table.assign(Hear_Loss="NORMAL")  # one class: 4 patients split 2 / 1 / 1
    arrays, meta = build_cache(parse_recordings(frame, DATA_CFG), None, cfg)
    train = arrays["series_split"][arrays["series_of_row"]] == 0
    assert train.any() and (~train).any()
    tail = np.abs(arrays["signal"][:, 62:]).max(axis=1)  # after 12.4 ms: cut in every training ear
    assert (tail[train] == 0).all() and (tail[~train] > 0).all()
    known = arrays["static_raw"][:, STATIC_FEATURES.index("age_known")]
    assert (known[train] == 0).all() and (known[~train] == 1).all()
    cut_v = train & ~arrays["exist_known"][:, 2]
    assert np.isnan(arrays["latency_ms"][cut_v, 2]).all()  # a wave cut off is unknown, not a label
    assert any("short-window augmentation" in n for n in meta["notes"])
