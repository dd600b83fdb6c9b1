"""The web page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
type a prompt, click Generate, see the images, click Variations, see more. Skips where those are missing."""

import os
import shutil
import tempfile

import pytest

from egaku.server.app import LiveServer, ServeOptions, create_app

pytest.importorskip("selenium", reason="the page test needs the selenium package (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="the page test needs Debian's chromium and chromium-driver "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(style_lora_dir):
    from egaku.models.loading import load_pipeline

    # one LoRA for the tiny model ("style"), for the page's LoRA rows
    app = create_app({"tiny": load_pipeline("tiny", "cpu", "float32")},
                     ServeOptions(model=["tiny"], lora_dir=str(style_lora_dir)), api_key="")
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager must not phone home (no network here)
    profile = tempfile.mkdtemp(prefix="egaku-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def loaded_images(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('#gallery .card img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length")


def test_prompt_generate_and_variations(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    # the page asks the server for its models and samplers first
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 3)
    for field, value in (("steps", "2"), ("n", "2"), ("seed", "21"), ("clip-skip", "2")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys("a red circle on a blue background")
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda d: loaded_images(d) == 2)
    assert not browser.find_element(By.ID, "error").is_displayed()
    params = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#gallery .params")]
    assert "a red circle on a blue background" in params[0] and "Seed: 21" in params[0] and "Seed: 22" in params[1]
    assert "Clip skip: 2" in params[0]  # sent as the API's clip_skip and returned with the image's parameters
    assert browser.find_element(By.CSS_SELECTOR, "#gallery img").get_property("naturalWidth") == 64

    browser.find_element(By.CSS_SELECTOR, "#gallery .card .variations").click()
    wait.until(lambda d: loaded_images(d) == 4)
    assert not browser.find_element(By.ID, "error").is_displayed()
    newest = browser.find_elements(By.CSS_SELECTOR, "#gallery .params")[0].text
    assert "Strength: 0.6" in newest and "a red circle on a blue background" in newest
    assert "done" in browser.find_element(By.ID, "status").text


def test_the_steps_field_starts_at_the_servers_default_within_its_limit(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from egaku.models.loading import load_pipeline

    app = create_app({"tiny": load_pipeline("tiny", "cpu", "float32")},
                     ServeOptions(model=["tiny"], max_steps=10), api_key="")
    with LiveServer(app) as live:
        browser.get(live.url + "/")
        WebDriverWait(browser, 60).until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 3)
        steps = browser.find_element(By.ID, "steps")
        assert (steps.get_attribute("value"), steps.get_attribute("max")) == ("10", "10")  # 20 would be refused


def test_variations_and_upscale_send_the_settings_changed_since_generating(server, browser):
    """A card's Variations and Upscale send the form's steps, sampler, guidance, negative prompt, clip skip and LoRAs
    where the user changed them after the last Generate (an emptied one too: an emptied guidance is the model's
    default), and those win over the ones stored in the image; left as they were, the image's own are reused, as
    docs/serve.md says a variation does. (Was: always sent, so the last Generate's replaced the image's; the negative
    prompt, clip skip and LoRAs were sent whenever filled; an emptied guidance was left out, so the image's was
    reused.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 3)

    def set_form(steps: str, sampler: str, negative: str, clip_skip: str, lora: bool, guidance: str = "") -> None:
        for field, value in (("steps", steps), ("n", "1"), ("negative", negative), ("clip-skip", clip_skip),
                             ("guidance", guidance)):
            element = browser.find_element(By.ID, field)
            element.clear()
            if value:
                element.send_keys(value)
        Select(browser.find_element(By.ID, "sampler")).select_by_value(sampler)
        rows = browser.find_elements(By.CSS_SELECTOR, ".lora-row")
        if lora and not rows:
            browser.find_element(By.ID, "add-lora").click()  # the folder's one LoRA, at weight 0.8
        elif not lora:
            for row in rows:
                row.find_element(By.TAG_NAME, "button").click()  # its "x"

    def newest_params() -> str:
        assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
        return browser.find_elements(By.CSS_SELECTOR, "#gallery .params")[0].text

    set_form("4", "lms", "dull", "1", lora=True, guidance="9")
    browser.find_element(By.ID, "prompt").send_keys("a green square")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d) == 1)
    made = newest_params()
    assert "Negative prompt: dull" in made and "Steps: 4, Sampler: LMS, CFG: 9," in made and "LoRAs: style:0.8" in made
    assert "Clip skip" not in made

    set_form("5", "ddim", "", "2", lora=False)  # none of it what the image was made with; three fields emptied
    source = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    source.find_element(By.CSS_SELECTOR, ".variations").click()
    wait.until(lambda d: loaded_images(d) == 2)
    varied = newest_params()
    assert "Steps: 5, Sampler: DDIM, CFG: 7.5," in varied and "Strength: 0.6" in varied and "a green square" in varied
    assert "Clip skip: 2" in varied and "Negative prompt" not in varied and "LoRAs" not in varied
    source.find_element(By.CSS_SELECTOR, ".upscale").click()
    wait.until(lambda d: loaded_images(d) == 3)
    upscaled = newest_params()
    assert "Steps: 5, Sampler: DDIM, CFG: 7.5," in upscaled and "Strength: 0.3" in upscaled
    assert "Upscaled from: 64x64" in upscaled
    assert "Clip skip: 2" in upscaled and "Negative prompt" not in upscaled and "LoRAs" not in upscaled

    set_form("5", "ddim", "murky", "2", lora=False)
    browser.find_element(By.ID, "generate").click()  # the form as it is: 5 steps, DDIM, "murky", clip skip 2
    wait.until(lambda d: loaded_images(d) == 4)
    made = newest_params()
    assert "Negative prompt: murky" in made and "Steps: 5, Sampler: DDIM," in made and "Clip skip: 2" in made
    source.find_element(By.CSS_SELECTOR, ".variations").click()  # nothing changed since: the first image's own
    wait.until(lambda d: loaded_images(d) == 5)
    varied = newest_params()
    assert "Negative prompt: dull" in varied and "Steps: 4, Sampler: LMS, CFG: 9," in varied
    assert "LoRAs: style:0.8" in varied
    assert "Clip skip" not in varied
