import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.dicom_series import (DicomSeriesError, find_dicom_files, group_slices, index_by_modality, load_volume,
                                 pixel_data, read_header, slice_normal, sort_slices)
from common.slice_geometry import UnevenSlicesError, geometry_problem, nearest_slice, orientation, split_stacks

SAGITTAL_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run anterior→posterior (+y), columns head→foot (−z)


def write_slice(path, position, instance, value, iop=SAGITTAL_IOP, rows=4, cols=5, spacing=(0.5, 0.8),
                modality="MR", series_uid="1.2.3", slope=None, intercept=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = modality, series_uid, meta.MediaStorageSOPInstanceUID
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.full((rows, cols), value, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_slices_sort_by_position_not_instance_number(tmp_path):
    # Sagittal normal = row × col = (0,1,0) × (0,0,−1) = (−1, 0, 0): slices advance toward −x.
    assert np.allclose(slice_normal(np.array(SAGITTAL_IOP).reshape(2, 3)), [-1, 0, 0])
    xs = [10.0, 6.0, 8.0, 4.0]  # positions along x; along the normal they are −x
    instances = [3, 1, 4, 2]  # shuffled instance numbers that disagree with geometry
    paths = [write_slice(tmp_path / f"img_{i}.dcm", (x, -20, 30), inst, value=int(x))
             for i, (x, inst) in enumerate(zip(xs, instances))]
    headers = [read_header(p) for p in paths]
    order, along = sort_slices(headers)
    assert [xs[i] for i in order] == [10.0, 8.0, 6.0, 4.0]
    assert np.allclose(along, [-10, -8, -6, -4])
    volume = load_volume(paths)
    assert volume.array.shape == (4, 4, 5)
    assert volume.array[:, 0, 0].tolist() == [10.0, 8.0, 6.0, 4.0]
    assert volume.spacing_mm == (2.0, 0.5, 0.8)
    # voxel (k=1, j=2, i=3) → IPP(first) + i·Δc·row + j·Δr·col + k·Δs·normal
    expected = np.array([10, -20, 30]) + 3 * 0.8 * np.array([0, 1, 0]) + 2 * 0.5 * np.array([0, 0, -1]) \
        + 1 * 2.0 * np.array([-1, 0, 0])
    assert np.allclose(volume.voxel_to_patient([1, 2, 3])[0], expected)
    assert np.allclose(volume.patient_to_voxel(expected)[0], [1, 2, 3])


def test_find_by_content_and_group_mixed_orientations_and_sizes(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    write_slice(tmp_path / "a", (0, 0, 0), 1, 1)
    write_slice(tmp_path / "deep" / "er" / "b.weird", (-1, 0, 0), 2, 1)
    write_slice(tmp_path / "c.dcm", (0, 0, 0), 3, 1, iop=[1, 0, 0, 0, 1, 0])  # axial
    write_slice(tmp_path / "d.dcm", (-2, 0, 0), 4, 1, rows=6)  # other size
    (tmp_path / "notes.txt").write_text("not dicom", encoding="utf-8")
    files = find_dicom_files(tmp_path)
    assert len(files) == 4
    headers = [read_header(p) for p in files]
    groups = group_slices(headers)
    assert sorted(len(g) for g in groups) == [1, 1, 2] and len(groups[0]) == 2
    assert set(index_by_modality(files)) == {"MR"}
    with pytest.raises(DicomSeriesError, match="differ in orientation or size"):
        load_volume(files)


def test_rescale_and_duplicate_and_unreadable(tmp_path):
    ct = write_slice(tmp_path / "ct.dcm", (0, 0, 0), 1, 1000, modality="CT", slope=2.0, intercept=-1024.0,
                     iop=[1, 0, 0, 0, 1, 0])
    assert pixel_data(pydicom.dcmread(ct))[0, 0] == pytest.approx(2 * 1000 - 1024)
    dup = write_slice(tmp_path / "dup.dcm", (0, 0, 0), 2, 5, modality="CT", iop=[1, 0, 0, 0, 1, 0])
    with pytest.raises(DicomSeriesError, match="duplicate slice"):
        load_volume([ct, dup])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x01" * 300)
    with pytest.raises(DicomSeriesError, match="junk.dcm: not a readable DICOM file"):
        read_header(junk)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(ct.read_bytes()[:-10])  # cut inside the pixel data
    with pytest.raises(DicomSeriesError, match="truncated.dcm: cannot decode pixel data"):
        pixel_data(pydicom.dcmread(truncated, force=True), truncated)


def test_compressed_pixel_data_error_names_file_and_syntax(tmp_path):
    path = write_slice(tmp_path / "j2k.dcm", (0, 0, 0), 1, 7)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00garbage-not-a-codestream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=r"j2k.dcm: cannot decode pixel data \(transfer syntax JPEG 2000"):
        pixel_data(pydicom.dcmread(path), path)


def test_skip_unreadable_keeps_the_rest_and_per_slice_origins(tmp_path):
    paths = [write_slice(tmp_path / f"s{i}.dcm", (0, 0, 2.0 * i), i + 1, 10 * i, iop=[1, 0, 0, 0, 1, 0])
             for i in range(4)]
    paths[2].write_bytes(paths[2].read_bytes()[:-10])  # truncated pixel data
    with pytest.raises(DicomSeriesError, match="s2.dcm"):
        load_volume(paths)
    # the skipped slice leaves a gap: refused by default, kept when asked (exact positions stay visible)
    with pytest.raises(UnevenSlicesError, match="4.00 mm between 2.00 and 6.00"):
        load_volume(paths, skip_unreadable=True)
    volume = load_volume(paths, skip_unreadable=True, slice_gaps="keep")
    assert volume.array.shape[0] == 3 and [p.name for p in volume.sources] == ["s0.dcm", "s1.dcm", "s3.dcm"]
    assert np.allclose(volume.slice_origins_mm[:, 2], [0.0, 2.0, 6.0])
    assert volume.uneven_gaps_mm == [(0.0, 2.0), (2.0, 6.0)] and volume.interpolated_k == []


def test_missing_slice_refused_or_interpolated_on_request(tmp_path):
    """Slices at 0, 2, 4, 8 mm (6 missing): an error naming the gap by default; with "interpolate" the
    made slice at 6 mm is the mean of its neighbours (linear), recorded in interpolated_k."""
    paths = [write_slice(tmp_path / f"s{z}.dcm", (0, 0, float(z)), i + 1, 10 * z, iop=[1, 0, 0, 0, 1, 0])
             for i, z in enumerate((0, 2, 4, 8))]
    with pytest.raises(UnevenSlicesError, match="slice spacing 2.00 mm but gap.s. of 4.00 mm between 4.00 and 8.00") as info:
        load_volume(paths)
    assert info.value.gaps_mm == [(4.0, 8.0)] and str(tmp_path) in str(info.value)
    volume = load_volume(paths, slice_gaps="interpolate")
    assert volume.shape[0] == 5 and volume.interpolated_k == [3]
    assert np.allclose(volume.array[:, 0, 0], [0, 20, 40, 60, 80])
    assert np.allclose(volume.slice_origins_mm[:, 2], [0, 2, 4, 6, 8]) and volume.sideways_shift_mm == 0.0
    # a slice 0.05 mm off is within the absolute tolerance (0.1 mm); 0.3 mm off is not
    shifted = [write_slice(tmp_path / f"t{i}.dcm", (0, 0, 2.0 * i + (0.05 if i == 2 else 0)), i + 1, 1,
                           iop=[1, 0, 0, 0, 1, 0]) for i in range(4)]
    assert load_volume(shifted).uneven_gaps_mm == []
    with pytest.raises(UnevenSlicesError):
        load_volume(shifted, gap_tolerance_mm=0.01)


def test_orientation_is_never_guessed(tmp_path):
    path = write_slice(tmp_path / "a.dcm", (0, 0, 0), 1, 1)
    ds = pydicom.dcmread(path)
    del ds.ImageOrientationPatient
    with pytest.raises(DicomSeriesError, match="a.dcm: missing field ImageOrientationPatient"):
        orientation(ds, path)
    assert geometry_problem(ds) == "missing field ImageOrientationPatient"
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    with pytest.raises(DicomSeriesError, match="degenerate"):
        orientation(ds, path)
    ds.save_as(path)
    with pytest.raises(DicomSeriesError, match="a.dcm: missing field|a.dcm: degenerate"):
        load_volume([path])


def test_sheared_stack_measured_and_split_stacks_with_nearest_slice(tmp_path):
    """A tilted acquisition moves 1 mm sideways per slice; two axial blocks 30 mm apart become two stacks,
    and a point between them is 15 mm from the nearest slice, not "inside"."""
    sheared = [write_slice(tmp_path / f"sh{i}.dcm", (1.0 * i, 0, 3.0 * i), i + 1, 1, iop=[1, 0, 0, 0, 1, 0])
               for i in range(4)]
    assert load_volume(sheared).sideways_shift_mm == pytest.approx(1.0)
    blocks = [write_slice(tmp_path / f"b{i}.dcm", (0, 0, z), i + 1, 1, iop=[1, 0, 0, 0, 1, 0])
              for i, z in enumerate((0, 3, 6, 9, 39, 42, 45, 48))]
    datasets = [pydicom.dcmread(p) for p in blocks]
    stacks, counts = split_stacks(datasets, blocks, logger=lambda message: None)
    assert counts == {"slices": 8, "skipped_geometry": 0, "gap_splits": 1}
    assert [list(s.along_mm) for s in stacks] == [[0, 3, 6, 9], [39, 42, 45, 48]]
    lower = load_volume([blocks[i] for i in stacks[0].indices])
    assert nearest_slice(lower, [1.0, 1.0, 24.0])[:2] == (3, pytest.approx(15.0))
    assert nearest_slice(lower, [1.0, 1.0, 5.0]) == (2, pytest.approx(1.0), True)
    assert nearest_slice(lower, [100.0, 1.0, 5.0])[2] is False  # outside the image in-plane
