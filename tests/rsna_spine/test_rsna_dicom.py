"""DICOM series loading: sorting by position, canonical orientation, bad files, compressed syntaxes."""

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from common.dicom_series import DicomSeriesError
from rsna_spine.data import load_series


def _messages():
    out = []
    return out, out.append


def test_shuffled_instance_numbers_are_sorted_by_position(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=6)
    numbers = np.array([4, 1, 6, 2, 5, 3])  # unrelated to position
    pixels, _ = dicom.write_series(tmp_path / "s", geom, numbers=numbers)
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2")
    # canonical sagittal: slice index increases towards patient left (+x), whatever the file order
    x = stack.slice_origins_mm[:, 0]
    assert np.all(np.diff(x) > 0)
    np.testing.assert_allclose(x, geom.positions[:, 0])
    np.testing.assert_array_equal(stack.instance_numbers, numbers)
    # rows run towards the feet (−z) and columns posterior (+y), as written: pixels unchanged
    np.testing.assert_array_equal(stack.array, pixels.astype(np.float32))
    assert stack.orientation == "sagittal" and stack.spacing_mm == pytest.approx((4.0, 1.5, 2.0))


def test_reversed_geometry_is_canonicalized_with_exact_geometry(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=5, flip_rows=True, origin=(10.0, -5.0, 30.0))
    pixels, numbers = dicom.write_series(tmp_path / "s", geom, numbers=[5, 4, 3, 2, 1])
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2")
    assert stack.col_dir @ np.array([0, 0, -1.0]) > 0.99  # rows now run towards the feet
    # every stored pixel lands at the same patient point, through the canonical geometry
    for k in range(5):
        for r, c in ((0, 0), (3, 7), (7, 9)):
            point = geom.positions[k] + c * 2.0 * geom.row_dir + r * 1.5 * geom.col_dir
            kk, jj, ii = np.round(stack.patient_to_voxel(point[None])[0]).astype(int)
            assert stack.array[kk, jj, ii] == pixels[k, r, c]
            kji = stack.label_to_voxel(numbers[k], c, r)  # a Kaggle label (instance, x = column, y = row)
            np.testing.assert_allclose(stack.voxel_to_patient(kji)[0], point, atol=1e-6)


def test_missing_optional_tags_and_compressed_syntaxes(tmp_path, dicom):
    geom = dicom.make_geometry("axial", n=4, rows=32, cols=32)  # openjpeg needs more than a few pixels
    ref = None
    for syntax in ("explicit", "rle", "jpeg2000"):
        pixels, _ = dicom.write_series(tmp_path / syntax, geom, syntax=syntax, drop_optional=True, description="Axial T2")
        (stack,) = load_series(tmp_path / syntax, 1, 2, "axial_t2")
        ref = stack.array if ref is None else ref
        np.testing.assert_array_equal(stack.array, ref)  # lossless round trip
    assert "SliceLocation" not in pydicom.dcmread(next((tmp_path / "rle").glob("*.dcm")))
    np.testing.assert_array_equal(ref, pixels.astype(np.float32))


def test_bad_files_are_skipped_with_a_message_naming_them(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=5)
    dicom.write_series(tmp_path / "s", geom)
    data = (tmp_path / "s" / "3.dcm").read_bytes()
    (tmp_path / "s" / "3.dcm").write_bytes(data[: len(data) - 40])  # truncated pixel data
    (tmp_path / "s" / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    messages, log = _messages()
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2", logger=log)
    assert stack.shape[0] == 4 and 3 not in stack.instance_numbers.tolist()
    assert any("3.dcm" in m and "cannot decode pixel data" in m for m in messages)
    assert any("junk.dcm" in m and "not a readable DICOM" in m for m in messages)


def test_undecodable_transfer_syntax_names_file_and_syntax(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=1)
    dicom.write_series(tmp_path / "s", geom)
    path = tmp_path / "s" / "1.dcm"
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    messages, log = _messages()
    with pytest.raises(DicomSeriesError, match="no decodable slice"):
        load_series(tmp_path / "s", 1, 2, "sag_t2", logger=log)
    assert any("1.dcm" in m and "1.2.840.10008.1.2.4.100" in m for m in messages)


def test_mixed_sizes_and_orientations_become_separate_stacks(tmp_path, dicom):
    upper = dicom.make_geometry("axial", n=5, rows=8, cols=8, origin=(0, 0, 40.0))
    lower = dicom.make_geometry("axial", n=3, rows=6, cols=6, tilt_deg=12.0, origin=(0, 0, 0.0))
    dicom.write_series(tmp_path / "s", upper, description="Axial T2")
    dicom.write_series(tmp_path / "s", lower, numbers=[6, 7, 8], description="Axial T2")
    stacks = load_series(tmp_path / "s", 1, 2, "axial_t2")
    assert [s.shape for s in stacks] == [(5, 8, 8), (3, 6, 6)]
    assert all(s.orientation == "axial" for s in stacks)
    assert stacks[1].instance_numbers.tolist() == [6, 7, 8]


def test_missing_folder_and_empty_folder(tmp_path, dicom):
    with pytest.raises(DicomSeriesError, match="not found"):
        load_series(tmp_path / "absent", 1, 2, "sag_t1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomSeriesError, match="no readable DICOM"):
        load_series(tmp_path / "empty", 1, 2, "sag_t1")
