"""The web page at / in a real headless browser (Debian's chromium + chromedriver, driven by Selenium):
upload an image, ask, read the streamed answer; it must equal `edgevl run`'s."""

from __future__ import annotations

import shutil

import pytest

from conftest import has_module
from serving_live import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(not all(has_module(m) for m in ("fastapi", "uvicorn", "prometheus_client", "selenium")),
                       reason="needs the serve extra and selenium: pip install -e '.[dev]'"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs a headless browser: apt-get install chromium chromium-driver"),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_uploads_asks_and_streams_the_answer_of_edgevl_run(tiny_bundle, tmp_path, browser, capsys):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import edgevl
    from edgevl.cli.main import main
    from edgevl.data.world import make_scene
    from edgevl.serving.app import create_app

    path = tmp_path / "scene.png"
    Image.fromarray(make_scene("test", 7).image()).save(path)
    question = "describe the image."
    assert main(["run", str(tiny_bundle), "--image", str(path), "--prompt", question, "--backend", "onnxruntime"]) == 0
    expected = capsys.readouterr().out.strip()
    assert expected

    server = LiveServer(create_app({"edgevl-tiny": edgevl.load(tiny_bundle, backend="onnxruntime", batching=True,
                                                               verbose=False)}))
    try:
        browser.get(server.url + "/")
        assert browser.title == "edgevl"
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "edgevl-tiny")
        browser.find_element(By.ID, "image").send_keys(str(path))
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("image ready"))
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(question)
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or
                   d.find_element(By.ID, "status").text.startswith("error"))
        assert browser.find_element(By.ID, "status").text == "done"
        assert browser.find_element(By.ID, "answer").text == expected
        assert float(browser.find_element(By.ID, "ttft").text) > 0
        assert int(browser.find_element(By.ID, "tokens").text) == len(expected.split())  # one token per word here
        assert float(browser.find_element(By.ID, "tps").text) > 0
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        server.stop()
