"""The web playground (deployments/playground/, served at /ui/) in a real browser.

Debian's headless Chromium, driven by Selenium through Debian's chromedriver (never Selenium
Manager: the Service names the driver), against the shared Ray Serve app. One browser for the
module; its fake microphone plays Beckett's speech. Screenshots go to $HARK_TEST_ARTIFACTS (else a
temporary directory).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shutil
import tomllib
import wave
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import API_KEYS, wait_until
from textnorm import wer

pytestmark = pytest.mark.serve

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_TIMEOUT_S = 240  # a diarized 30 s file on two shared cores
MIC_LEAD_S, MIC_TAIL_S = 0.5, 2.0  # silence around the speech in the fake microphone's loop


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = Path(os.environ["HARK_TEST_ARTIFACTS"]) if os.environ.get("HARK_TEST_ARTIFACTS") else tmp_path_factory.mktemp("playground")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def microphone_wav(clips, tmp_path_factory) -> Path:
    """Beckett's speech, then silence (Chromium loops the file): 16-bit PCM mono, as Chromium's
    fake capture device reads it."""
    with wave.open(str(clips["beckett"].path)) as src:
        assert (src.getsampwidth(), src.getnchannels()) == (2, 1)
        rate, frames = src.getframerate(), src.readframes(src.getnframes())
    path = tmp_path_factory.mktemp("mic") / "beckett-then-silence.wav"
    with wave.open(str(path), "wb") as dst:
        dst.setnchannels(1)
        dst.setsampwidth(2)
        dst.setframerate(rate)
        dst.writeframes(bytes(2 * int(MIC_LEAD_S * rate)) + frames + bytes(2 * int(MIC_TAIL_S * rate)))
    return path


@pytest.fixture(scope="module")
def browser(microphone_wav, tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the playground tests need Debian's browser: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    # Every request the page makes, for test_no_request_leaves_the_service.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    driver.requests_seen = []  # URLs from the performance log, gathered as the tests read it
    yield driver
    driver.quit()


def requests_of(driver) -> list[str]:
    """URLs requested since the last call (HTTP requests and WebSockets), also kept on the driver."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(params["url"])
    driver.requests_seen.extend(urls)
    return urls


def save_page(driver, path: Path) -> None:
    """A screenshot of the whole page, beyond the window."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    })
    path.write_bytes(base64.b64decode(shot["data"]))


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def all_of(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver, serve_app, key):
    driver.get(f"{serve_app}/")  # redirected to /ui/
    wait_until(lambda: driver.execute_script("return document.readyState") == "complete", 30, what="the page")
    key_input = by_id(driver, "key")
    key_input.clear()
    key_input.send_keys(key)


def blob_text(driver, href: str) -> str:
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.text()).then(done, e => done('ERROR ' + e));", href)


def visible_error(driver, box_id: str, timeout_s: float = 60) -> str:
    return wait_until(lambda: by_id(driver, box_id).is_displayed() and by_id(driver, box_id).text, timeout_s,
                      what=f"#{box_id}")


@pytest.fixture(scope="module")
def file_result(browser, serve_app, clips, artifacts):
    """pyannote's two-speaker sample, uploaded through the page with speakers and word timings."""
    open_page(browser, serve_app, API_KEYS[0])
    by_id(browser, "language").send_keys("en")
    by_id(browser, "diarize").click()
    by_id(browser, "file").send_keys(str(clips["sample"].path))
    by_id(browser, "transcribe").click()
    wait_until(lambda: by_id(browser, "result").is_displayed() or by_id(browser, "file-error").is_displayed(),
               PAGE_TIMEOUT_S, interval_s=0.5, what="the result")
    assert not by_id(browser, "file-error").is_displayed(), by_id(browser, "file-error").text
    wait_until(lambda: by_id(browser, "downloads").get_attribute("data-ready") == "true", 30, what="the downloads")
    save_page(browser, artifacts / "playground-file.png")
    json_link = all_of(browser, "#downloads a[data-format=json]")[0]
    return json.loads(blob_text(browser, json_link.get_attribute("href")))


def test_every_playground_file_ships_in_the_package():
    """A non-editable install carries the page: pyproject's package-data globs cover every file."""
    repo = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["deployments"]
    files = [p.relative_to(repo / "deployments").as_posix() for p in (repo / "deployments/playground").iterdir()]
    assert "playground/index.html" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_page_and_assets_are_served_without_a_key(serve_app):
    with httpx.Client(base_url=serve_app) as client:
        home = client.get("/")
        assert home.status_code == 307 and home.headers["location"] == "ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Content-Security-Policy" in page.text and "default-src 'self'" in page.text
        for asset, kind in [("playground.js", "javascript"), ("playground.css", "text/css"), ("capture-worklet.js", "javascript")]:
            response = client.get(f"/ui/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"], asset
        assert client.get("/ui/nothing.js").status_code == 404
        assert client.post("/v1/listen").status_code == 401  # the API still wants its key


def test_an_idempotent_answer_names_its_job(serve_app, clips):
    """The page's downloads rest on this: a synchronous answer given through a job (an
    Idempotency-Key without callback_url) carries the job's id, and the job shows the same result."""
    headers = {"Authorization": f"Token {API_KEYS[0]}", "Idempotency-Key": f"pg-test-{os.getpid()}-{id(clips)}"}
    with httpx.Client(base_url=serve_app, timeout=120, headers=headers) as client:
        answer = client.post("/v1/listen", files={"audio": ("fox.wav", clips["fox"].path.read_bytes())})
        assert answer.status_code == 200, answer.text
        job = client.get(f"/v1/jobs/{answer.headers['Hark-Job-Id']}").json()
    assert job["status"] == "completed" and job["result"] == answer.json()


def test_file_transcript_speakers_and_seeking(browser, file_result, clips):
    result = file_result
    turns = all_of(browser, "#transcript .turn")
    # Speaker turns as the words' speakers run, a colour class per speaker.
    labels = [t.get_attribute("data-speaker") for t in turns]
    assert len(set(labels)) == 2 and set(labels) == {w["speaker"] for w in result["words"]}
    assert all(any(c.startswith("spk-") for c in t.get_attribute("class").split()) for t in turns)
    assert {t.get_attribute("class") for t in turns if t.get_attribute("data-speaker") == "SPEAKER_00"} == {"turn spk-0"}
    # The transcript in the DOM is the API's, and it is the sample's speech.
    words = all_of(browser, "#transcript button.w")
    assert [w.text for w in words] == [w["word"] for w in result["words"] if w["start"] != w["end"] or w["word"].isalnum()]
    dom_text = " ".join(t.text.split("\n", 1)[1] for t in turns)
    assert wer(clips["sample"].text, dom_text) < 0.35
    low = all_of(browser, "#transcript button.w.low")
    assert len(low) == sum(1 for w in result["words"] if w["confidence"] < 0.6 and w["start"] != w["end"])
    # Figures.
    figure = {dd.get_attribute("data-figure"): dd.text for dd in all_of(browser, "#figures dd")}
    assert figure["language"] == "en" and figure["duration"] == f"{result['duration']:.1f} s"
    assert figure["job"].startswith("job_") and float(figure["real-time-factor"]) > 0
    # A click on a word moves the player to that word's start.
    word = words[len(words) // 2]
    start = float(word.get_attribute("data-start"))
    assert start > 5  # a word well inside the file, so that a seek is visible
    word.click()
    wait_until(lambda: browser.execute_script("return document.getElementById('player').readyState") >= 1, 10,
               what="the player's metadata")
    now = browser.execute_script("return document.getElementById('player').currentTime")
    assert start - 0.01 <= now < start + 1.0
    assert "now" in word.get_attribute("class")


def test_downloads_are_offered(browser, file_result):
    links = {a.get_attribute("data-format"): a for a in all_of(browser, "#downloads a")}
    assert set(links) == {"json", "srt", "vtt", "txt"}
    assert links["json"].get_attribute("download") == "sample.json"
    for fmt, ext in [("srt", "srt"), ("vtt", "vtt"), ("txt", "txt")]:
        assert links[fmt].get_attribute("download") == f"sample.{ext}"
        assert links[fmt].get_attribute("href").startswith("blob:"), links[fmt].get_attribute("title")
    assert json.loads(blob_text(browser, links["json"].get_attribute("href"))) == file_result


def test_subtitle_downloads_hold_the_transcript(browser, file_result):
    links = {a.get_attribute("data-format"): a.get_attribute("href") for a in all_of(browser, "#downloads a")}
    srt, vtt, txt = (blob_text(browser, links[f]) for f in ("srt", "vtt", "txt"))
    assert srt.lstrip().startswith("1\n") and " --> " in srt and "," in srt.split(" --> ")[0]
    assert vtt.startswith("WEBVTT") and " --> " in vtt
    first_word = next(w["word"] for w in file_result["words"] if w["start"] != w["end"])
    assert first_word in srt and first_word in vtt and first_word in txt
    assert not txt.lstrip().startswith("{")


def test_live_microphone_shows_final_words(browser, serve_app, clips, artifacts, microphone_wav):
    with wave.open(str(microphone_wav)) as mic:
        speech_end_s = mic.getnframes() / mic.getframerate() - MIC_TAIL_S / 2
    open_page(browser, serve_app, API_KEYS[0])
    by_id(browser, "live-language").send_keys("en")
    by_id(browser, "mic").click()
    assert by_id(browser, "mic").get_attribute("aria-pressed") == "true"
    status = by_id(browser, "live-status")
    wait_until(lambda: float(by_id(browser, "level").get_attribute("value")) > 0.05, 20, what="the level meter")
    # Stop once the microphone has captured the speech (before its loop starts again). The
    # transcript may still be on its way: a busy server can lag behind the microphone.
    wait_until(lambda: float(status.get_attribute("data-captured-s")) >= speech_end_s, 60, what="the speech")
    by_id(browser, "mic").click()  # stop: the stream is closed cleanly and the transcript kept
    assert by_id(browser, "mic").get_attribute("aria-pressed") == "false"
    wait_until(lambda: status.get_attribute("data-state") != "live", 120, what="the end of the stream")
    assert not by_id(browser, "live-error").is_displayed(), by_id(browser, "live-error").text
    assert status.get_attribute("data-state") == "done" and status.text.startswith("Stopped after")
    finals = by_id(browser, "finals").text
    assert wer(clips["beckett"].text, finals) <= 0.25, finals
    assert by_id(browser, "interim").text == ""
    assert by_id(browser, "mic").is_enabled() and by_id(browser, "level").get_attribute("value") == "0"
    save_page(browser, artifacts / "playground-live.png")


def test_bad_key_unsupported_file_and_rate_limit_show_the_api_error(browser, serve_app, clips, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not the samples you are looking for\n" * 50)
    with httpx.Client(base_url=serve_app, timeout=60) as client:
        refused = client.post("/v1/listen", headers={"Authorization": "Token nope"},
                              files={"audio": ("fox.wav", clips["fox"].path.read_bytes())}).json()
        unsupported = client.post("/v1/listen", headers={"Authorization": f"Token {API_KEYS[0]}"},
                                  files={"audio": ("notes.wav", not_audio.read_bytes())}).json()
        # 3 s of speech for a key with 1 s a day: refused before transcription, at no cost.
        limited = client.post("/v1/listen", headers={"Authorization": "Token pg-quota-key"},
                              files={"audio": ("fox.wav", clips["fox"].path.read_bytes())}).json()
    assert (refused["code"], unsupported["code"], limited["code"]) == ("UNAUTHORIZED", "UNSUPPORTED_FORMAT", "RATE_LIMITED")

    open_page(browser, serve_app, "nope")
    by_id(browser, "file").send_keys(str(clips["fox"].path))
    by_id(browser, "transcribe").click()
    shown = visible_error(browser, "file-error")
    assert shown.startswith(refused["error"]) and "UNAUTHORIZED" in shown and "401" in shown
    # The live stream's handshake is refused too; the page asks the API why.
    by_id(browser, "mic").click()
    shown = visible_error(browser, "live-error")
    assert shown.startswith(refused["error"]) and "UNAUTHORIZED" in shown

    open_page(browser, serve_app, API_KEYS[0])
    by_id(browser, "file").send_keys(str(not_audio))
    by_id(browser, "transcribe").click()
    shown = visible_error(browser, "file-error")
    assert shown.startswith(unsupported["error"]) and "UNSUPPORTED_FORMAT" in shown
    assert "wav, mp3, flac, ogg, m4a" in shown

    open_page(browser, serve_app, "pg-quota-key")
    by_id(browser, "file").send_keys(str(clips["fox"].path))
    by_id(browser, "transcribe").click()
    shown = visible_error(browser, "file-error")
    assert shown.startswith(limited["error"]) and "RATE_LIMITED" in shown and "429" in shown
    wait_s = int(shown.split("Try again in ")[1].split(" s.")[0])
    assert abs(wait_s - limited["retry_after"]) < 60


def test_phone_width_and_labelled_controls(browser, serve_app):
    open_page(browser, serve_app, API_KEYS[0])
    browser.set_window_size(390, 844)
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll('input, button, meter, progress, audio')].filter(el => {
              const labelled = el.labels && el.labels.length > 0;
              return !(labelled || el.getAttribute('aria-label') || (el.tagName === 'BUTTON' && el.textContent.trim())
                       || el.id === 'player');
            }).map(el => el.id || el.outerHTML);""")
        assert unlabelled == []
    finally:
        browser.set_window_size(1280, 1000)


def test_no_request_leaves_the_service(browser, serve_app, file_result):
    """Last in the module: every request of every test above, from the browser's own log."""
    open_page(browser, serve_app, "nope")
    by_id(browser, "mic").click()  # a stream (refused: this test needs its request only)
    visible_error(browser, "live-error")
    requests_of(browser)
    seen = browser.requests_seen
    origin = urlsplit(serve_app).netloc
    assert any(u.startswith(f"{serve_app}/v1/listen") for u in seen)
    assert any(u.startswith(f"ws://{origin}/v1/listen/stream") for u in seen)
    assert any(u.startswith("blob:") for u in seen)  # the player and downloads were seen too
    # Network requests only: chrome:// pages (the first tab's) and blob:/data: URLs stay inside the browser.
    outside = [u for u in seen if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != origin]
    assert outside == []
