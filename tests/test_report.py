"""The QC page (groupmorph_pyro.report): its numbers against the files it summarises, its pieces
against explicit NumPy, its flags, its errors, and the page itself in a real browser."""
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from groupmorph_pyro.cli import main
from groupmorph_pyro.data import write_landmarks
from groupmorph_pyro.report import (THRESHOLDS, checkerboard, jacobian_stats, landmark_errors, mosaic, qc_flags,
                                    slice_positions, write_report)
from groupmorph_pyro.synthetic import breathing_phantom
from groupmorph_pyro.volumes import load_volume, save_nifti

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """``groupmorph register`` of a 24³, K = 3 phantom with 3 posterior samples and landmarks."""
    folder = tmp_path_factory.mktemp("report")
    g = breathing_phantom((24, 24, 24), 3, seed=1, num_landmarks=6)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    images = [folder / f"t{k}.nii.gz" for k in range(3)]
    marks = [folder / f"l{k}.txt" for k in range(3)]
    for k in range(3):
        save_nifti(images[k], g.images[k], affine)
        write_landmarks(marks[k], g.landmarks[k])
    (folder / "c.yaml").write_text("register: {steps: 20, coarse_steps: 20, lr: 0.3}\n")
    assert main(["register", *map(str, images), "--out", str(folder / "reg"), "--samples", "3", "--landmarks",
                 *map(str, marks), "--config", str(folder / "c.yaml"), "--quiet"]) == 0
    return folder


def _table(page: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', page, flags=re.S).group(1)
    return [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)[1:]]


def test_register_writes_a_self_contained_page_whose_numbers_are_the_files(registered):
    reg = registered / "reg"
    page = (reg / "report.html").read_text()
    assert not re.search(r'(?:src|href)="(?!data:image/png;base64,)', page)  # every image inlined, no links
    assert "http://" not in page and "https://" not in page and "<link" not in page
    rows = _table(page, "summary")
    assert [r[0].strip() for r in rows] == ["0 fixed", "1", "2"]
    for k, row in enumerate(rows):
        jac = load_volume(reg / f"jacobian_{k}.nii.gz").data.astype(np.float64)
        assert float(row[3]) == pytest.approx(100 * (jac <= 0).mean(), abs=1e-4)
        assert (float(row[4]), float(row[5])) == pytest.approx((jac.min(), jac.max()), abs=1e-3)
        if k:  # registration raised each moving timepoint's NMI against the fixed one
            assert float(row[2]) > float(row[1]), row
            assert float(row[8]) > 0 and float(row[9]) >= float(row[8])  # posterior sd, mean and p95
    landmarks = _table(page, "landmarks")
    posterior = json.loads((reg / "landmarks_posterior.json").read_text())
    error, _ = landmark_errors(np.array(posterior["mean_mm"]), np.array(posterior["cov_mm2"]), 0)
    assert [float(r[1]) for r in landmarks] == pytest.approx([error[1].mean(), error[2].mean()], abs=0.006)
    settings = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page))
    assert settings["made by"].startswith("groupmorph_pyro ") and settings["mode"] == "all-to-one"
    assert 'id="view-1"' in page and "before-1" in page  # the inputs were found: before views exist


def test_report_command_rewrites_the_page_and_the_no_report_flag_skips_it(registered, tmp_path, capsys):
    out = tmp_path / "qc.html"
    assert main(["report", str(registered / "reg"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"report: {re.escape(str(out))} \(\d+\.\d\d MB; open it in a browser\)", printed)
    assert out.read_text().startswith("<!DOCTYPE html>")
    images = [str(registered / f"t{k}.nii.gz") for k in range(3)]
    (tmp_path / "c.yaml").write_text("register: {steps: 1, coarse_steps: 1}\n")
    assert main(["register", *images, "--out", str(tmp_path / "plain"), "--no-report", "--quiet",
                 "--config", str(tmp_path / "c.yaml")]) == 0
    assert not (tmp_path / "plain" / "report.html").exists() and (tmp_path / "plain" / "summary.json").is_file()


def test_without_its_inputs_the_page_says_so_and_shows_the_registered_images(registered, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(registered / "reg", reg)
    summary = json.loads((reg / "summary.json").read_text())
    summary["inputs"] = [str(tmp_path / "gone.nii.gz")] * 3
    (reg / "summary.json").write_text(json.dumps(summary))
    page = write_report(reg).read_text()
    assert "No \"before\" views:</b> the input files are gone" in page and "before-1" not in page
    assert [r[1] for r in _table(page, "summary")] == ["–", "–", "–"]


@pytest.mark.parametrize("args, message", [
    (lambda d, t: [str(t)], "not a registration output folder (no summary.json)"),
    (lambda d, t: [str(d), "--out", str(t / "page.txt")], "--out: expected an .html file"),
])
def test_bad_report_requests_fail_with_one_line_and_write_nothing(registered, tmp_path, capsys, args, message):
    before = sorted(os.listdir(tmp_path))
    assert main(["report", *args(registered / "reg", tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_failed_page_leaves_no_file(registered, tmp_path, monkeypatch):
    import groupmorph_pyro.report as report

    reg = tmp_path / "reg"
    shutil.copytree(registered / "reg", reg)
    (reg / "report.html").unlink()
    monkeypatch.setattr(report, "gray_png", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        write_report(reg)
    assert not (reg / "report.html").exists() and not list(reg.glob("*.tmp*"))


def test_slices_mosaics_and_checkerboards_are_where_they_should_be():
    assert slice_positions(10, 4) == [2, 4, 6, 8] and slice_positions(1, 2) == [0, 0]
    vol = np.zeros((20, 20, 20), np.float32)
    vol[8, 4, 12] = 1.0
    image = mosaic(vol, (1.0, 1.0, 1.0), count=4, pixels=20)  # slices at 4, 8, 12, 16; 20 px: no resampling
    assert image.shape == (3 * 20, 4 * 20)
    cell = lambda r, c: image[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20]  # noqa: E731
    # each slice shows its first remaining axis across and its second up (row 19 - index)
    assert cell(0, 1)[19 - 12, 4] == 1.0 and cell(1, 0)[19 - 12, 8] == 1.0 and cell(2, 2)[19 - 4, 8] == 1.0
    assert image.sum() == 3.0
    wide = mosaic(np.zeros((10, 20, 30)), (1.0, 1.0, 1.0), count=4, pixels=30)
    assert wide.shape == (3 * 30, 4 * 20)  # cells of the tallest and widest slice (30 mm up, 20 mm across)
    assert np.isnan(wide[60:, :2]).all() and not np.isnan(wide[60:, 2:17]).any()  # 15-px-wide slices, centred
    a, b = np.zeros((8, 8, 8)), np.ones((8, 8, 8))
    board = checkerboard(a, b, tiles=2)
    explicit = np.array([[[((i // 4) + (j // 4) + (k // 4)) % 2 for k in range(8)] for j in range(8)] for i in range(8)])
    assert np.array_equal(board, explicit)
    with pytest.raises(ValueError, match="one shape"):
        checkerboard(a, b[:4])
    with pytest.raises(ValueError, match=r"expected a \(D, H, W\) volume"):
        mosaic(np.zeros((4, 4)))


def test_jacobian_statistics_and_landmark_errors_match_explicit_computations():
    rng = np.random.default_rng(0)
    jac = 1 + 0.3 * np.sin(np.linspace(0, 6, 1000)).reshape(10, 10, 10) + 0.05 * rng.standard_normal((10, 10, 10))
    jac[0, 0, :3] = [-0.1, 0.0, 7.0]
    body = np.zeros(jac.shape, bool)
    body[2:8] = True
    stats = jacobian_stats(jac, body)
    assert stats["folding_percent"] == pytest.approx(0.2) and (stats["min"], stats["max"]) == (-0.1, 7.0)
    inside = jac[2:8].ravel()
    assert stats["sdlogj"] == pytest.approx(np.std(np.log(inside[inside > 0])))
    mean = rng.standard_normal((3, 5, 3))
    cov = np.einsum("klij,klmj->klim", *(2 * [rng.standard_normal((3, 5, 3, 3))]))
    error, sd = landmark_errors(mean, cov, fixed=1)
    for k in range(3):
        for l in range(5):
            assert error[k, l] == pytest.approx(np.sqrt(((mean[k, l] - mean[1, l]) ** 2).sum()))
            assert sd[k, l] == pytest.approx(np.sqrt(np.trace(cov[k, l]) / 3))
    moving, _ = landmark_errors(mean, cov, fixed=None)
    assert moving[0, 0] == pytest.approx(np.linalg.norm(mean[0, 0] - mean[:, 0].mean(0)))
    with pytest.raises(ValueError, match=r"expected mean \(K, L, 3\)"):
        landmark_errors(mean[..., :2], cov, None)


def test_each_flag_is_raised_by_its_own_condition_only():
    calm = {"timepoint": 1, "folding_percent": 0.0, "jacobian_min": 0.5, "jacobian_max": 2.0, "nmi_before": 0.5,
            "nmi_after": 0.6, "sd_p95_mm": 0.5}
    assert qc_flags([calm], voxel_mm=2.0) == []
    for change, words in (({"folding_percent": 0.01}, "folding"), ({"jacobian_min": 0.1}, "extreme det J"),
                          ({"jacobian_max": 6.0}, "extreme det J"), ({"nmi_after": 0.49}, "NMI against the reference fell"),
                          ({"sd_p95_mm": 2.5}, "uncertainty hot spots")):
        flags = qc_flags([{**calm, **change}], voxel_mm=2.0)
        assert len(flags) == 1 and words in flags[0] and "threshold" in flags[0], (change, flags)
    assert qc_flags([{**calm, "nmi_before": None, "nmi_after": None, "sd_p95_mm": None}], 2.0) == []
    assert THRESHOLDS["sd_p95_voxels"] == 1.0


def _browser():
    """Playwright and the system's Chromium; under CI their absence is a failure, elsewhere a skip."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: playwright (the test extra) is not installed")
        pytest.skip("playwright not installed")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI: {CHROMIUM} missing (apt-get install chromium in .ci/run)")
        pytest.skip(f"{CHROMIUM} missing")
    return sync_playwright


def test_the_page_works_in_a_real_browser(registered, tmp_path):
    """Headless Chromium opens the page from disk: no console error, no request leaves the file,
    every image decodes, the flicker and before/after controls change the image shown, and a
    screenshot is not blank."""
    from PIL import Image

    sync_playwright = _browser()
    page_path = registered / "reg" / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert widths and min(widths) > 0, widths
            view = page.locator("#view-1")
            first = view.get_attribute("src")
            page.locator("button.flicker[data-target=view-1]").click()
            flicked = view.get_attribute("src")
            assert flicked != first and page.locator("#caption-1").inner_text().startswith("reference")
            page.locator("button.flicker[data-target=view-1]").click()
            assert view.get_attribute("src") == first  # back to the registered image
            page.locator("input[name=stage-1][value=before]").check()
            assert view.get_attribute("src") not in (first, flicked)  # timepoint 1 before registration
            assert page.locator("#caption-1").inner_text() == "timepoint 1, before registration"
            assert page.evaluate("document.getElementById('view-1').naturalWidth") > 0
            shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("L"), np.float64)
            assert shot.std() > 10, shot.std()  # not a blank page
            assert errors == [] and requests == [], (errors, requests)
        finally:
            browser.close()


def test_the_body_mask_drops_isolated_noise_voxels_of_the_air():
    from groupmorph_pyro.report import body_mask

    image = np.zeros((20, 20, 20))
    image[5:15, 5:15, 5:15] = 1.0
    image[1, 1, 1] = image[18, 2, 7] = 1.0  # two bright noise voxels in the air
    mask = body_mask(image)
    assert mask[6:14, 6:14, 6:14].all() and mask.sum() > 0.85 * 1000 and not mask[1, 1, 1] and not mask[18, 2, 7]
    sheet = np.zeros((10, 10, 10))
    sheet[5] = 1.0  # one voxel thick: nothing survives the opening, so the plain foreground is kept
    assert body_mask(sheet).sum() == 100 and body_mask(sheet)[5].all()


def test_the_page_never_replaces_another_file_of_the_registration_folder(registered, tmp_path, capsys):
    reg = tmp_path / "reg"
    shutil.copytree(registered / "reg", reg)
    notes = reg / "notes.html"
    notes.write_text("mine")
    assert main(["report", str(reg), "--out", str(notes)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file of the registration folder; choose another name" in err
    assert notes.read_text() == "mine"
