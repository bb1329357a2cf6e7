"""OHIF v3 in a real browser (headless Chromium driven by Playwright): a click on a PACS study runs one of
our models, and the result is on screen.

The study (the marker phantom of ``tests/dicom_series.py``) lives in an Orthanc DICOMweb PACS; MONAI Label
serves it, and OHIF (``/ohif/``) reads it through the server's DICOMweb proxy (``../shared/specs/clients.md``):

1. MONAI Label view, *Point Prompts*: the fake deepgrow model, one click off the image centre and off the
   middle slice, *Run*. The labelmap must hold the model's sphere around the voxel clicked (OHIF copies the
   NRRD's voxels without reading its geometry, so a transposed or mirrored answer moves or clips it), the
   viewport must show it in colour, and nothing may go wrong on the way (console, notifications, HTTP).
2. Plain viewer: the SR the server stored back to the PACS is listed; opened, it shows the image clicked
   with the region's outline and the measurement, the probability read back from the PACS.

Screenshots go to ``$ONCOFUSION_ARTIFACTS`` (default ``test-artifacts/``). Without Playwright, Debian's
Chromium or Orthanc the test is skipped, unless ``ONCOFUSION_REQUIRE_BROWSER=1`` (``.ci/run`` sets it
where Chromium is installed): then it fails.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from oncofusion.serving.launcher import REPO_ROOT, LocalOrthanc, LocalServer
from tests.dicom_series import SERIES_CASES, orientation, write_marker_series
from tests.serving_fakes import make_wide_bundle

CHROMIUM = Path("/usr/bin/chromium")


def _missing() -> list[str]:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install -c constraints.txt -e .[dev]; never `playwright install`)")
    if not CHROMIUM.is_file():
        missing.append(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    if LocalOrthanc.executable() is None:
        missing.append("Orthanc (apt-get install orthanc orthanc-dicomweb)")
    return missing


pytestmark = [pytest.mark.server, pytest.mark.browser]
if _missing():
    reason = "the OHIF browser test needs " + "; ".join(_missing()) + " (.ci/run installs the Debian packages)"
    if os.environ.get("ONCOFUSION_REQUIRE_BROWSER") == "1":
        pytest.fail(reason, pytrace=False)
    pytestmark.append(pytest.mark.skip(reason=reason))

MODEL = "fake_nodule"
RADIUS = 8  # voxels: the fake model's sphere, wide enough to see
CLICK_COLUMN, CLICK_ROW = 60, 90  # soft tissue (probability well below 1), off the centre
PIXEL_MM = 0.7  # square pixels: see _phantom
TIMEOUT_MS = 60_000  # first render takes 5-7 s here; the CPUs are shared

# The panel asks whether a training run is going on: 404 when none is.
EXPECTED_HTTP_ERRORS = ("/train/?check_if_running=true",)
# What OHIF says when a result cannot be shown; pageerror does not fire for these (clients.md).
TROUBLE = re.compile(r"not an NRRD|Failed to parse|Something went wrong|Empty imageId|Failed to Run", re.I)
RECORD_NOTIFICATIONS = """
window.__notifications = [];
new MutationObserver(records => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType !== 1) continue;
      const toasts = node.matches('[data-sonner-toast]') ? [node] : node.querySelectorAll('[data-sonner-toast]');
      for (const toast of toasts) {
        window.__notifications.push({type: toast.getAttribute('data-type'), text: toast.innerText});
      }
    }
  }
}).observe(document, {childList: true, subtree: true});
"""
AXIAL = "window.cornerstone.getRenderingEngines()[0].getViewport('mpr-axial')"
AXIAL_SHOWS_THE_SERIES = """() => {
  const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
  const viewport = engine && engine.getViewport('mpr-axial');
  return Boolean(viewport && viewport.getActors().length);
}"""
# page coordinates of a voxel of the slice the axial viewport shows, and of a box around it
TARGET = f"""([column, row, margin]) => {{
  const viewport = {AXIAL};
  const volume = window.cornerstone.cache.getVolume(viewport.getVolumeId());
  const data = volume.imageData;
  const slice = Math.round(data.worldToIndex(viewport.getCamera().focalPoint)[2]);
  const rect = viewport.canvas.getBoundingClientRect();
  const toPage = ijk => {{
    const xy = viewport.worldToCanvas(data.indexToWorld(ijk));
    return [rect.x + xy[0], rect.y + xy[1]];
  }};
  return {{slice, dims: Array.from(volume.dimensions), click: toPage([column, row, slice]),
          box: [toPage([column - margin, row - margin, slice]), toPage([column + margin, row + margin, slice])]}};
}}"""
# the clicks OHIF sends: its ProbeMONAILabel annotations as IJK (rounded as the panel rounds them), and the
# instance each was placed on
CLICKED = f"""() => {{
  const data = window.cornerstone.cache.getVolume({AXIAL}.getVolumeId()).imageData;
  return window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter(a => a.metadata.toolName === 'ProbeMONAILabel')
    .map(a => ({{ijk: Array.from(data.worldToIndex(a.data.handles.points[0])).map(Math.round),
                instance: (a.metadata.referencedImageId.match(/\\/instances\\/([^/]+)/) || [])[1]}}));
}}"""
LABELMAP_HAS_VOXELS = """() => {
  const volume = window.services.segmentationService.getLabelmapVolume('1');
  return Boolean(volume && volume.voxelManager.getCompleteScalarDataArray().some(v => v));
}"""
LABELMAP = """() => {
  const service = window.services.segmentationService;
  const volume = service.getLabelmapVolume('1');
  const voxels = volume.voxelManager.getCompleteScalarDataArray();
  const [nx, ny] = volume.dimensions;
  let count = 0, i = 0, j = 0, k = 0;
  const values = new Set();
  for (let x = 0; x < voxels.length; x++) {
    if (!voxels[x]) continue;
    count++;
    values.add(voxels[x]);
    i += x % nx; j += Math.floor(x / nx) % ny; k += Math.floor(x / (nx * ny));
  }
  const segments = {};
  for (const s of Object.values(service.getSegmentation('1').segments)) if (s) segments[s.label] = s.segmentIndex;
  return {count, centre: count ? [i / count, j / count, k / count] : null, values: Array.from(values), segments};
}"""

# Plain viewer, the SR's viewport: the image shown, the outlines drawn (canvas px), and where the corners of a
# pixel-coordinate box ([column, row] from the top left corner of the top left pixel) are on that image
SR_VIEW = """([c0, r0, c1, r1]) => {
  const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
  const {imageData} = viewport.getImageData();
  const toCanvas = (x, y) => Array.from(viewport.worldToCanvas(imageData.indexToWorld([x - 0.5, y - 0.5, 0])));
  const layer = document.getElementById('svg-layer-' + viewport.id);
  return {imageId: viewport.getCurrentImageId(),
          outlines: Array.from(layer.querySelectorAll('polyline')).map(p => Array.from(p.points).map(q => [q.x, q.y])),
          texts: Array.from(layer.querySelectorAll('text')).map(t => t.textContent),
          box: [toCanvas(c0, r0), toCanvas(c1, r1)]};
}"""


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("ONCOFUSION_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class PageWatch:
    """What goes wrong in a page without a ``pageerror``: console errors, failed calls to the servers
    (loopback; the Google Fonts request fails harmlessly offline), error notifications."""

    def __init__(self, page):
        self.page = page
        self.problems: list[str] = []
        page.add_init_script(RECORD_NOTIFICATIONS)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("response", self._response)
        page.on("requestfailed", self._request_failed)

    def _console(self, message) -> None:
        if TROUBLE.search(message.text):
            self.problems.append(f"console {message.type}: {message.text[:300]}")
        elif message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.problems.append(f"console error: {message.text[:300]}")  # (failed loads: see _response)

    def _response(self, response) -> None:
        if response.status >= 400 and not response.url.endswith(EXPECTED_HTTP_ERRORS):
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def _request_failed(self, request) -> None:
        if request.url.startswith("http://127.0.0.1"):
            self.problems.append(f"request failed ({request.failure}): {request.method} {request.url}")

    def notifications(self) -> list[dict]:
        try:
            return self.page.evaluate("() => window.__notifications || []")
        except Exception as e:  # noqa: BLE001 - a page that cannot answer is a problem to report
            return [{"type": "error", "text": f"(notifications unreadable: {e})"}]

    def all_problems(self) -> list[str]:
        bad = [n for n in self.notifications() if n["type"] == "error" or TROUBLE.search(n["text"] or "")]
        return [*self.problems, *(f"notification {n['type']}: {n['text']!r}" for n in bad)]

    def check(self, step: str) -> None:
        problems = self.all_problems()
        assert not problems, f"{step}:\n" + "\n".join(problems)

    def wait_for(self, condition: str, step: str) -> None:
        """Wait until the JS ``condition`` holds; fail at once when something goes wrong meanwhile."""
        deadline = time.time() + TIMEOUT_MS / 1000
        while not self.page.evaluate(condition):
            self.check(step)
            assert time.time() < deadline, f"{step}: nothing after {TIMEOUT_MS / 1000:.0f} s"
            self.page.wait_for_timeout(250)


def _phantom(folder: Path) -> dict:
    """The marker phantom, axial, five slices, InstanceNumbers shuffled against position, with square pixels:
    OHIF draws an SR's outline with the two pixel spacings swapped (cornerstone3D#2758), which only
    square pixels (nearly every CT) hide."""
    spec = SERIES_CASES["shuffled"]
    row_cos, col_cos = orientation(*spec["angles"])
    normal = np.cross(row_cos, col_cos)
    positions = np.array([-158.1, -179.0, -75.7]) + np.asarray(spec["steps"], float)[:, None] * normal
    folder.mkdir(parents=True)
    write_marker_series(folder, positions, spec["numbers"], spec["marker"], row_cos, col_cos)
    files = sorted(folder.iterdir())
    for file in files:
        ds = pydicom.dcmread(file)
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.save_as(file)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"study": header.StudyInstanceUID, "series": header.SeriesInstanceUID, "files": files}


def _sphere(dims: list[int], centre: list[int], radius: float) -> np.ndarray:
    """The fake model's region (SphereMeanPredictor): voxels within ``radius`` of the click."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in dims], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def _colour_fraction(page, box: list[list[float]]) -> float:
    """Share of the pixels in a page box that are coloured (the CT is grey; the segment is not)."""
    from PIL import Image

    (x0, x1), (y0, y1) = sorted((box[0][0], box[1][0])), sorted((box[0][1], box[1][1]))
    png = page.screenshot(clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 40).mean())


def _dismiss_banner(page) -> None:
    """OHIF's 'investigational use only' banner covers the bottom of the viewports."""
    button = page.get_by_role("button", name="Confirm and Hide")
    if button.is_visible():
        button.click()


def _stored_sr(pacs: LocalOrthanc, study: str) -> dict:
    """The SR the server stored back, read from the PACS with highdicom: its series description, the
    measurement text OHIF draws (``<concept>: <value to 2 decimals>``) and the instance its region is on."""
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(pacs.dicomweb_url)
    (series,) = client.search_for_series(study, search_filters={"Modality": "SR"})
    series_uid = series["0020000E"]["Value"][0]
    (instance,) = client.search_for_instances(study, series_uid)
    sr = hd.sr.ComprehensiveSR.from_dataset(
        client.retrieve_instance(study, series_uid, instance["00080018"]["Value"][0]))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (measurement,) = group.get_measurements()
    (image,) = group.roi.ContentSequence
    return {"description": series["0008103E"]["Value"][0],
            "measurement": f"{measurement.name.meaning}: {measurement.value:.2f}",
            "instance": image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}


def _run_point_prompt(page, watch: PageWatch, server_url: str, study: str) -> dict:
    """MONAI Label view: connect, Point Prompts, pick the model and the label, click, Run.
    Returns the click (IJK and instance), the labelmap and the colour in the viewport around the click."""
    page.goto(f"{server_url}/ohif/monai-label?StudyInstanceUIDs={study}")
    page.wait_for_function(AXIAL_SHOWS_THE_SERIES, timeout=TIMEOUT_MS)
    _dismiss_banner(page)
    page.locator("table.settingsTable button.actionButton").click()  # connect (the cookie holds the URL)
    tab_label = page.locator("label.tab-label", has_text="Point Prompts")
    tab_label.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("() => Boolean(window.services.segmentationService.getLabelmapVolume('1'))",
                           timeout=TIMEOUT_MS)
    tab_label.click()
    tab = page.locator(".tab").filter(has=tab_label)
    tab.locator("select.selectBox").select_option(MODEL)
    tab.locator("tr.clickable-row", has_text="lesion").click()

    # one slice off the middle one, where a slice order mirrored between OHIF and the server shows
    target = page.evaluate(TARGET, [CLICK_COLUMN, CLICK_ROW, RADIUS + 2])
    page.mouse.move(*target["click"])
    page.mouse.wheel(0, 100)
    page.wait_for_function(f"() => ({TARGET})([0, 0, 0]).slice !== {target['slice']}", timeout=TIMEOUT_MS)
    target = page.evaluate(TARGET, [CLICK_COLUMN, CLICK_ROW, RADIUS + 2])
    before = _colour_fraction(page, target["box"])
    page.mouse.click(*(round(v) for v in target["click"]))  # whole pixels, as a mouse gives
    page.wait_for_function(f"() => ({CLICKED})().length === 1", timeout=TIMEOUT_MS)
    (clicked,) = page.evaluate(CLICKED)
    watch.check("before Run")

    tab.get_by_role("button", name="Run").click()
    watch.wait_for(LABELMAP_HAS_VOXELS, "waiting for the segment after Run")
    tab.get_by_text("Clear Points", exact=True).click()  # the click's marker is coloured too
    page.wait_for_function(f"() => ({CLICKED})().length === 0", timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the overlay is drawn on the next render
    return {"target": target, "clicked": clicked, "labelmap": page.evaluate(LABELMAP),
            "colour_before": before, "colour_after": _colour_fraction(page, target["box"])}


def _open_sr(page, watch: PageWatch, server_url: str, study: str, description: str,
             region_box: list[int]) -> dict:
    """Plain viewer: open the SR series by its thumbnail; returns what its viewport shows (SR_VIEW)."""
    page.goto(f"{server_url}/ohif/viewer?StudyInstanceUIDs={study}")
    thumbnail = page.locator("[data-cy='study-browser-thumbnail-no-image']", has_text=description)
    thumbnail.wait_for(timeout=TIMEOUT_MS)
    _dismiss_banner(page)
    thumbnail.dblclick()
    watch.wait_for("() => document.querySelectorAll(\"[data-cy='viewport-grid'] svg text\").length > 0",
                   "waiting for the SR's measurement")
    page.wait_for_timeout(1000)
    return page.evaluate(SR_VIEW, region_box)


def _bounding_box(mask: np.ndarray) -> list[int]:
    """[c0, r0, c1, r1] of a (column, row) mask, in DICOM pixel coordinates (corners of the pixels)."""
    columns, rows = np.nonzero(mask)
    return [int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1]


def test_ohif_draws_the_segment_and_shows_the_sr_measurement(tmp_path):
    from playwright.sync_api import sync_playwright

    start = time.time()
    phantom = _phantom(tmp_path / "series")
    make_wide_bundle(tmp_path / "bundles", radius=RADIUS, name=MODEL)
    shots = artifacts_dir()
    names = {"monai-label": "ohif-monai-label-segment.png", "viewer": "ohif-viewer-sr.png"}
    for name in [*names.values(), *(f"ohif-failure-{step}.png" for step in names)]:
        (shots / name).unlink(missing_ok=True)
    with LocalOrthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(phantom["files"])
        with LocalServer(pacs.dicomweb_url, tmp_path / "server", {"bundles": str(tmp_path / "bundles")}) as live, \
                sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.add_cookies([{"name": "MONAILABEL_SERVER_URL", "value": f"{live.url}/", "url": live.url}])
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            watch = PageWatch(page)
            step = "monai-label"
            try:
                seen = _run_point_prompt(page, watch, live.url, phantom["study"])
                page.screenshot(path=shots / names[step])
                watch.check("MONAI Label view, after Run")
                step = "viewer"
                sr = _stored_sr(pacs, phantom["study"])
                region = _sphere(seen["target"]["dims"], seen["clicked"]["ijk"], RADIUS)
                region_box = _bounding_box(region[:, :, seen["clicked"]["ijk"][2]])
                sr_view = _open_sr(page, watch, live.url, phantom["study"], sr["description"], region_box)
                page.screenshot(path=shots / names[step])
                watch.check("viewer, SR opened")
            except BaseException:
                page.screenshot(path=shots / f"ohif-failure-{step}.png")
                print(f"screenshot: {shots / f'ohif-failure-{step}.png'}\nin the page:", *watch.all_problems(),
                      f"server log:\n{live.log_tail()}", sep="\n")
                raise
            finally:
                browser.close()
    print(f"screenshots ({time.time() - start:.0f} s): " + " ".join(str(shots / n) for n in names.values()))

    # the model's sphere around the voxel clicked: all of it, as the lesion segment
    labelmap, clicked, target = seen["labelmap"], seen["clicked"], seen["target"]
    assert clicked["ijk"] == [CLICK_COLUMN, CLICK_ROW, target["slice"]], "the click missed the voxel aimed at"
    assert target["slice"] != (target["dims"][2] - 1) // 2, "the viewport did not leave the middle slice"
    assert labelmap["count"] == region.sum(), labelmap
    assert labelmap["centre"] == pytest.approx(np.argwhere(region).mean(axis=0).tolist(), abs=1e-6), labelmap
    assert labelmap["values"] == [labelmap["segments"]["lesion"]], labelmap
    # on screen: grey before, coloured after
    assert seen["colour_before"] < 0.02, seen
    assert seen["colour_after"] > 0.3, seen

    # the SR stored back to the PACS is on the image clicked; the viewer opens it there and draws its
    # measurement and the region's outline (the bounding box on that slice)
    assert sr["instance"] == clicked["instance"], "the SR's region is on another image than the one clicked"
    assert f"/instances/{clicked['instance']}/" in sr_view["imageId"], sr_view["imageId"]
    assert any(text.startswith(sr["measurement"]) for text in sr_view["texts"]), (sr["measurement"], sr_view)
    (outline,) = sr_view["outlines"]
    corners = np.array(outline)
    assert corners.min(axis=0) == pytest.approx(np.min(sr_view["box"], axis=0), abs=1.0), sr_view
    assert corners.max(axis=0) == pytest.approx(np.max(sr_view["box"], axis=0), abs=1.0), sr_view
