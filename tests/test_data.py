import numpy as np
import pytest

from groupmorph_pyro.checks import InputError
from groupmorph_pyro.data import (
    SeriesEntry, load_manifest, read_dirlab_image, read_landmarks, read_series, resample_to_spacing, write_landmarks,
    write_manifest,
)
from groupmorph_pyro.volumes import Volume, load_volume, save_nifti
from groupmorph_pyro.prepare import crop_window, prepare_dirlab, write_dirlab_twin


def _raw(path, shape):
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    data = (x + 10 * y + 100 * z).astype("<i2")  # value encodes the (x, y, z) position
    data.transpose(2, 1, 0).tofile(path)  # x fastest, then y, then z
    return data


def test_dirlab_raw_is_read_x_fastest_without_reorientation(tmp_path):
    data = _raw(tmp_path / "case3_T10_s.img", (5, 4, 3))
    vol = read_dirlab_image(tmp_path / "case3_T10_s.img", shape=(5, 4, 3), spacing=(1.15, 1.15, 2.5))
    assert vol.data.shape == (5, 4, 3) and np.array_equal(vol.data, data)
    assert vol.data[4, 1, 2] == 4 + 10 + 200
    assert np.allclose(vol.affine, np.diag([1.15, 1.15, 2.5, 1.0]))


def test_dirlab_case_table_and_truncated_file(tmp_path):
    path = tmp_path / "case1_T00_s.img"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(InputError, match=r"case1_T00_s.img: expected 12320768 bytes \(int16 256x256x94\), got 1000"):
        read_dirlab_image(path)
    other = tmp_path / "scan.img"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(InputError, match="cannot tell the DIR-Lab case"):
        read_dirlab_image(other)
    with pytest.raises(InputError, match="case must be 1..10, got 11"):
        read_dirlab_image(other, case=11)


def test_landmarks_one_based_round_trip(tmp_path):
    path = tmp_path / "case1_4D-75_T00.txt"
    path.write_text("1\t1\t1\n10 20 30\n5,6,7\n")
    pts = read_landmarks(path, shape=(256, 256, 94))
    assert np.array_equal(pts, [[0, 0, 0], [9, 19, 29], [4, 5, 6]])
    write_landmarks(tmp_path / "out.txt", pts + 0.25)
    assert np.allclose(read_landmarks(tmp_path / "out.txt"), pts + 0.25)
    assert (tmp_path / "out.txt").read_text().splitlines()[1] == "10.25\t20.25\t30.25"


@pytest.mark.parametrize(
    "text, match",
    [
        ("1 2 3\n4 5\n", r"case1_4D-75_T00.txt:2: expected 3 columns \(x y z\), got 2"),
        ("1 2 3 4\n", r":1: expected 3 columns"),
        ("1 2 x\n", r":1: expected numbers"),
        ("1 2 95\n", r"1 landmark\(s\) outside the image of size \(256, 256, 94\), first #1 at 1-based \(1, 2, 95\)"),
        ("0 5 5\n", r"outside the image"),
        ("\n", r"no landmarks"),
    ],
)
def test_bad_landmark_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "case1_4D-75_T00.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_landmarks(path, shape=(256, 256, 94))


def test_crop_window_keeps_every_point():
    pts = np.array([100.0, 300.0, 180.0])
    start = crop_window(512, 256, pts)
    assert start <= 100 and start + 255 >= 300
    assert crop_window(256, 256, pts) == 0
    assert crop_window(512, 256, np.array([2.0, 200.0])) == 0
    assert crop_window(512, 256, np.array([300.0, 511.0])) == 256
    with pytest.raises(InputError, match="span 301 voxels, more than the crop of 256"):
        crop_window(512, 256, np.array([0.0, 300.0]))


def test_prepare_dirlab_crops_and_shifts_landmarks_consistently(tmp_path):
    geo = write_dirlab_twin(tmp_path / "raw", case=4, shape=(48, 40, 24), spacing=(2.0, 2.0, 2.5), num_landmarks=20)
    manifest = prepare_dirlab(tmp_path / "raw", tmp_path / "prep", 4, crop=44, shape=geo["shape"], spacing=geo["spacing"])
    (entry,) = load_manifest(manifest)
    assert entry.name == "case4" and len(entry.images) == len(entry.landmarks) == 6
    for t, img_path, lm_path in zip(geo["phases"], entry.images, entry.landmarks):
        original = read_dirlab_image(tmp_path / "raw" / f"case4_{t}_s.img", shape=geo["shape"], spacing=geo["spacing"])
        pts_orig = read_landmarks(tmp_path / "raw" / f"case4_4D-75_{t}.txt")
        cropped = load_volume(img_path)
        pts = read_landmarks(lm_path, cropped.data.shape)
        assert cropped.data.shape == (44, 40, 24)
        # same world position before and after the crop
        world = lambda aff, p: p @ aff[:3, :3].T + aff[:3, 3]  # noqa: E731
        assert np.allclose(world(cropped.affine, pts), world(original.affine, pts_orig), atol=1e-4)
        # same intensity at the (rounded) landmark voxel
        i, j = np.round(pts).astype(int), np.round(pts_orig).astype(int)
        assert np.array_equal(cropped.data[tuple(i.T)], original.data[tuple(j.T)])


def test_prepare_dirlab_missing_phase(tmp_path):
    write_dirlab_twin(tmp_path / "raw", case=1, shape=(20, 20, 16), num_phases=3, num_landmarks=5)
    with pytest.raises(InputError, match=r"lacks image\(s\) for phase\(s\) \['T30', 'T40', 'T50'\]"):
        prepare_dirlab(tmp_path / "raw", tmp_path / "prep", 1, shape=(20, 20, 16), spacing=(1, 1, 1))


def _nifti(path, shape=(6, 6, 6), spacing=(1.0, 1.0, 1.0)):
    save_nifti(path, np.random.default_rng(0).random(shape), np.diag([*spacing, 1.0]))
    return path


def test_manifest_yaml_and_csv(tmp_path):
    imgs = [_nifti(tmp_path / f"t{k}.nii.gz") for k in range(3)]
    write_manifest(tmp_path / "m.yaml", [SeriesEntry("a", imgs, [], "train"), SeriesEntry("b", imgs, [], "test")])
    entries = load_manifest(tmp_path / "m.yaml")
    assert [e.name for e in entries] == ["a", "b"] and entries[1].split == "test"
    assert entries[0].images == [str(p) for p in imgs]
    (tmp_path / "m.csv").write_text("name,split,image_0,image_1,image_2\ns1,train,t0.nii.gz,t1.nii.gz,t2.nii.gz\n")
    (e,) = load_manifest(tmp_path / "m.csv")
    assert e.images == [str(tmp_path / f"t{k}.nii.gz") for k in range(3)]


@pytest.mark.parametrize(
    "csv_text, match",
    [
        ("name,image_0,image_1,image_2\ns1,t0.nii.gz,,t2.nii.gz\n", r"series 's1' has missing timepoints"),
        ("name,image_0,image_1\ns1,t0.nii.gz,gone.nii.gz\n", r"series 's1': missing file .*gone.nii.gz"),
        ("name,image_0,image_1,image_2\ns1,t0.nii.gz,t1.nii.gz,t2.nii.gz\n", r"has 3 timepoints, expected 2"),
    ],
)
def test_bad_manifests(tmp_path, csv_text, match):
    for k in range(3):
        _nifti(tmp_path / f"t{k}.nii.gz")
    (tmp_path / "m.csv").write_text(csv_text)
    with pytest.raises(InputError, match=match):
        load_manifest(tmp_path / "m.csv", num_timepoints=2 if "expected 2" in match else None)


def test_read_series_resamples_and_rejects_mixed_spacing(tmp_path):
    a = _nifti(tmp_path / "a.nii.gz", (8, 8, 4), (1.0, 1.0, 3.0))
    b = _nifti(tmp_path / "b.nii.gz", (8, 8, 4), (1.0, 1.0, 3.0))
    vols = read_series([a, b], spacing=1.0)
    assert vols[0].data.shape == (8, 8, 10) and np.allclose(vols[0].spacing, 1.0)
    c = _nifti(tmp_path / "c.nii.gz", (8, 8, 4), (1.0, 1.0, 2.0))
    with pytest.raises(InputError, match=r"c.nii.gz: spacing \(1, 1, 2\) mm differs from .*a.nii.gz \(1, 1, 3\) mm"):
        read_series([a, c], spacing=None)


def test_resample_keeps_field_of_view():
    vol = Volume(np.ones((10, 10, 5), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    out = resample_to_spacing(vol, 1.5)
    assert out.data.shape == (7, 7, 9)  # 9 mm and 12 mm centre-to-centre extents
    assert np.allclose(out.affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    ramp = Volume(np.broadcast_to(np.arange(5, dtype=np.float32) * 3.0, (4, 4, 5)).copy(), np.diag([1.0, 1.0, 3.0, 1.0]))
    out = resample_to_spacing(ramp, 1.0)
    assert np.allclose(out.data[0, 0], np.arange(13.0))  # value = z in mm: sampled at exactly 1 mm


def test_dicom_series_is_read_with_orientation(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    series = tmp_path / "dcm"
    series.mkdir()
    vol = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(3, 4, 5)  # (slices, rows, cols)
    for z in [2, 0, 1]:  # written out of order on purpose
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = 4, 5
        ds.PixelSpacing = [0.8, 0.6]  # row spacing, column spacing
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [10.0, 20.0, 3.0 * z]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -5
        ds.PixelData = vol[z].tobytes()
        ds.save_as(series / f"slice{z}.dcm", enforce_file_format=True)
    (out,) = read_series([series], spacing=None)
    assert out.data.shape == (5, 4, 3)  # (cols, rows, slices)
    assert out.data[3, 2, 1] == 2 * vol[1, 2, 3] - 5
    assert np.allclose(out.affine, [[-0.6, 0, 0, -10], [0, -0.8, 0, -20], [0, 0, 3, 0], [0, 0, 0, 1]])


def test_landmark_files_with_different_point_counts_are_an_error(tmp_path):
    from groupmorph_pyro.data import read_landmark_files

    write_landmarks(tmp_path / "a.txt", np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    write_landmarks(tmp_path / "b.txt", np.array([[1.0, 2.0, 3.0]]))
    with pytest.raises(InputError, match=r"hold different numbers of points \[2, 1\]"):
        read_landmark_files([tmp_path / "a.txt", tmp_path / "b.txt"], (10, 10, 10))
    assert read_landmark_files([tmp_path / "a.txt"] * 2, (10, 10, 10)).shape == (2, 2, 3)


def test_load_mni152_crops_and_resamples_the_template_from_nilearns_wheel():
    pytest.importorskip("nilearn")
    from groupmorph_pyro.data import load_mni152

    vols = load_mni152(3.5)
    assert set(vols) == {"t1", "grey", "white"}
    shape = vols["t1"].data.shape
    assert all(v.data.shape == shape for v in vols.values()) and np.allclose(vols["t1"].spacing, 3.5)
    assert 35 <= min(shape) and max(shape) <= 60  # a head at 3.5 mm, cropped to its bounding box
    t1 = vols["t1"].data
    assert t1[tuple(n // 2 for n in shape)] > 0.2 * t1.max()  # the brain is in the middle
    assert 0 <= vols["grey"].data.min() and vols["grey"].data.max() <= 1.0 + 1e-6
    assert np.allclose(vols["t1"].affine[:3, :3], 3.5 * np.eye(3))
    with pytest.raises(InputError, match="spacing"):
        load_mni152(-1.0)
