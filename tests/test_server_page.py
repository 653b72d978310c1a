"""The page at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium): upload an image,
ask, read the streamed answer, take a screenshot. Skips only where no browser (or driver) is installed."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from server_process import ServerProcess, png_bytes

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium and chromedriver installed "
                                "(apt-get install chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_the_page_streams_an_answer_and_renders(bundles, image, pipe, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(image))
    expected = pipe.describe(path, "What is on the table?", max_new_tokens=12)
    server = ServerProcess(bundle, "--api-key", "page-key", log=tmp_path / "server.log")
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "preview").get_attribute("src"))
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("What is on the table?")
        tokens = browser.find_element(By.ID, "max")
        tokens.clear()
        tokens.send_keys("12")
        browser.find_element(By.ID, "key").send_keys("page-key")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-done"))
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1", \
            browser.find_element(By.ID, "status").text
        # textContent: the answer exactly as streamed (.text would strip its leading space)
        assert browser.find_element(By.ID, "answer").get_attribute("textContent") == expected
        assert "tokens/s" in browser.find_element(By.ID, "status").text
        shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        shot.save(tmp_path / "page.png")
        pixels = np.asarray(shot)
        assert shot.width >= 600 and shot.height >= 600
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, the image, borders: a rendered page
        assert "POST /v1/chat/completions 200" in server.log.read_text()
        overlay = browser.find_element(By.ID, "overlay")  # the explain overlay, at the image's own size
        assert overlay.is_displayed()
        assert int(overlay.get_attribute("naturalWidth")) == image.shape[1]
        assert "POST /v1/explain 200" in server.log.read_text()
    finally:
        server.stop()
