"""The whole loop in the real Chromium, from an empty folder: ``serve`` writes the project, the Train page
creates classes, takes photos through its file inputs and a webcam burst (Chromium's fake camera fed a
video made from photos), trains with its progress streamed, and the Try page answers. Screenshots of each
page go to docs/screenshots (``PHOTOHEAD_SCREENSHOTS=1``)."""
import os
from pathlib import Path

import numpy as np
import pytest
from _server import Server
from PIL import Image
from test_browser import CHROMEDRIVER, CHROMIUM, wait

from conftest import CLASS_COLOURS, ROOT, make_image

SHOTS = ROOT / "docs" / "screenshots"


def fake_camera_video(path: Path, colour, frames: int = 30, size=(640, 480)) -> Path:
    """A Y4M video (what Chromium's --use-file-for-fake-video-capture reads) of noisy frames of one colour."""
    rng = np.random.default_rng(7)
    width, height = size
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            rgb = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            yuv = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
            f.write(b"FRAME\n" + yuv[..., 0].tobytes())
            for channel in (1, 2):  # 4:2:0: every other pixel of every other row
                f.write(np.ascontiguousarray(yuv[::2, ::2, channel]).tobytes())
    return path


@pytest.fixture(scope="module")
def camera_browser(tmp_path_factory):
    if not (CHROMEDRIVER and CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing in CI; .ci/run installs them (apt: chromium-driver)")
        pytest.skip("Chromium or chromedriver is not installed (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    video = fake_camera_video(tmp_path_factory.mktemp("camera") / "misty.y4m", CLASS_COLOURS["misty"])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1000",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-video-capture={video}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    """The page as it is, for docs/app.md (with PHOTOHEAD_SCREENSHOTS=1): 128 colours keep it small."""
    if os.environ.get("PHOTOHEAD_SCREENSHOTS"):
        import io

        SHOTS.mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        image.quantize(128).save(SHOTS / f"{name}.png", optimize=True)


def test_from_an_empty_folder_to_answers_in_the_browser(camera_browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = camera_browser
    project = tmp_path / "new"
    project.mkdir()
    server = Server(project, sets=("features.backbone=tiny",))
    try:
        assert (project / "params.yaml").is_file() and (project / "corrections.csv").is_file()
        wait(driver, lambda _: any("no model yet" in line for line in server.stdout), 10)
        driver.get(server.url + "/")
        wait(driver, lambda d: d.current_url.endswith("/train"))  # no model: the Train page first
        shot(driver, "train-empty")
        for name in ("misty", "tigger", "neither"):
            field = driver.find_element(By.ID, "class-name")
            field.send_keys(name)
            driver.find_element(By.CSS_SELECTOR, "#new-class button").click()
            wait(driver, lambda d, n=name: d.find_elements(By.CSS_SELECTOR, f'.card.class[data-name="{n}"]'))
        # a name that could name a path: one line, nothing made
        driver.find_element(By.ID, "class-name").send_keys("../escape")
        driver.find_element(By.CSS_SELECTOR, "#new-class button").click()
        error = wait(driver, lambda d: d.find_element(By.ID, "class-error").text)
        assert "could name a path" in error and not (project / "escape").exists()

        photos = tmp_path / "picked"
        for k, name in enumerate(("tigger", "neither")):
            files = [make_image(photos / name / f"{name}_{i}.png", CLASS_COLOURS[name], 50_000 + 100 * k + i)
                     for i in range(14)]
            card = driver.find_element(By.CSS_SELECTOR, f'.card.class[data-name="{name}"]')
            card.find_element(By.CSS_SELECTOR, 'input[type=file]:not([webkitdirectory])').send_keys(
                "\n".join(map(str, files)))
            wait(driver, lambda d, n=name: "14 photos" in d.find_element(
                By.CSS_SELECTOR, f'.card.class[data-name="{n}"] .count').text)

        # a webcam burst into misty: hold the button about 3 s at 5 frames a second
        driver.find_element(By.ID, "camera").click()
        wait(driver, lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0)
        record = driver.find_element(By.CSS_SELECTOR, '.card.class[data-name="misty"] .record')
        ActionChains(driver).click_and_hold(record).pause(3.2).release().perform()
        count = wait(driver, lambda d: (lambda n: n if n >= 12 else None)(int(d.find_element(
            By.CSS_SELECTOR, '.card.class[data-name="misty"] .count').text.split()[0])))
        written = list((project / "photos" / "misty").iterdir())
        assert len(written) == count and all(len(p.stem) == 64 and p.suffix == ".jpg" for p in written)
        shot(driver, "train-classes")

        driver.find_element(By.ID, "train").click()
        wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-job") == "done", 240)
        assert "val accuracy" in driver.find_element(By.ID, "train-figures").text
        shot(driver, "train-done")

        driver.get(server.url + "/")
        photo = make_image(tmp_path / "try" / "tigger_new.png", CLASS_COLOURS["tigger"], 97_100)
        driver.find_element(By.ID, "files").send_keys(str(photo))
        card = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-answer]"))
        assert card.get_attribute("data-answer") == "tigger"
        # the correct-it loop: one click files the photo into a class
        before = len(list((project / "photos" / "tigger").iterdir()))
        next(b for b in card.find_elements(By.CSS_SELECTOR, ".add-to button") if b.text == "tigger").click()
        wait(driver, lambda d: "added to tigger" in card.find_element(By.CSS_SELECTOR, ".added").text)
        assert len(list((project / "photos" / "tigger").iterdir())) == before + 1
        shot(driver, "try")

        # the live preview: the fake camera (misty's colour) answered frame after frame
        driver.find_element(By.ID, "camera").click()
        wait(driver, lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0)
        driver.find_element(By.ID, "live").click()
        wait(driver, lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-live-frames") or 0) >= 10)
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-live-answer") == "misty"
        assert int(driver.find_element(By.ID, "live-rate").text) >= 1
        misty = len(list((project / "photos" / "misty").iterdir()))
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "#live-add button") if b.text == "misty").click()
        wait(driver, lambda d: "added to misty" in d.find_element(By.ID, "live-add").text)
        assert len(list((project / "photos" / "misty").iterdir())) == misty + 1
        shot(driver, "live")
        driver.find_element(By.ID, "live").click()
        logged = [e["message"] for e in driver.get_log("browser")]
        assert [m for m in logged if "/api/classes - " not in m] == []  # the refused name's 400 alone
        assert len(logged) == 1 and "400" in logged[0]
    finally:
        server.stop()
