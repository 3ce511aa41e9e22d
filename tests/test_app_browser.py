"""app.py in a real browser: Debian's headless Chromium driven by Selenium through chromium-driver.

One app per module (every tab's tiny model, as tests/test_app.py); in each tab the test sets the inputs or uploads an
image, presses the button, waits for the output image, checks that it equals the file infer.py writes for the same
settings, and saves a screenshot (to ``$APP_SCREENSHOT_DIR`` when set, e.g. docs/images for the docs; else a temporary
folder). A bad upload must show its message in the page and the next request must succeed; a double click must run one
job. Without Chromium, chromedriver or Selenium the tests skip and say why, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import infer
from tests.app_models import app_argv, assert_same_picture, build_models, start_app, use_tiny_ram, write_uploads

WAIT = 120  # s: a request on two busy CPU cores


def browser_or_reason() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, or why the browser tests cannot run here."""
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed (pip install -r requirements-app.txt)"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does)"
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = browser_or_reason()
    if isinstance(found, str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser tests must run in CI: {found}")
        print(f"skipping the browser tests: {found}")
        pytest.skip(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    models = build_models(tmp_path_factory.getbasetemp() / "app_models")
    uploads = write_uploads(tmp_path_factory.mktemp("browser_uploads"))
    tiny_ram = use_tiny_ram()
    demo, url = start_app(app_argv(models, tmp_path_factory.mktemp("browser_app_output")))
    options = Options()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)  # --no-sandbox: the tests run as root
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.get(url)
    shots = Path(os.environ.get("APP_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    yield {"driver": driver, "url": url, "demo": demo, "models": models, "uploads": uploads, "shots": shots}
    driver.quit()
    demo.close()
    tiny_ram.undo()


def find(driver, css: str, timeout: float = WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def tab_button(driver):  # the page draws its tabs once its script has run
        return next((button for button in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if button.text == name), None)

    WebDriverWait(driver, WAIT).until(tab_button).click()


def type_into(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    field = find(driver, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def image_after(driver, css: str, previous: str | None = None, timeout: float = WAIT) -> str:
    """The ``src`` of the image in ``css`` once there is one (other than ``previous``)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, f"{css} img")]
        sources = [src for src in sources if src and "/gradio_api/file=" in src and src != previous]
        if sources:
            return sources[0]
        time.sleep(0.3)
    raise AssertionError(f"no output image in {css} after {timeout} s")


def upload_file(driver, css: str, path: Path) -> None:
    """Choose ``path`` in the upload widget ``css`` and wait until the server holds it (the preview names the file)."""
    from selenium.webdriver.common.by import By

    find(driver, f"{css} input[type=file]").send_keys(str(path))
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if any((img.get_attribute("src") or "").endswith("/" + path.name) for img in driver.find_elements(By.CSS_SELECTOR, f"{css} img")):
            return
        time.sleep(0.2)
    raise AssertionError(f"the upload of {path.name} never finished")


def page_shows(driver, text: str, timeout: float = WAIT) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.find_element(By.TAG_NAME, "body").text:
            return
        time.sleep(0.3)
    raise AssertionError(f"the page never showed {text!r}")


def fetched(url: str, folder: Path, name: str) -> Path:
    import httpx

    path = folder / name
    path.write_bytes(httpx.get(url, timeout=30).content)
    return path


def screenshot(browser, tab: str, *, keep_messages: bool = False, height: int = 1000) -> None:
    """``app_<tab>.png``: the top of the page, ``height`` px, earlier error messages hidden unless kept; a palette PNG."""
    from PIL import Image

    driver = browser["driver"]
    driver.set_window_size(1280, height)
    driver.execute_script("window.scrollTo(0, 0)")
    hide = "document.querySelectorAll('[class*=toast]').forEach(element => element.style.visibility = arguments[0])"
    if not keep_messages:
        driver.execute_script(hide, "hidden")
    path = browser["shots"] / f"app_{tab}.png"
    driver.save_screenshot(str(path))
    driver.execute_script(hide, "")
    driver.set_window_size(1280, 1000)
    with Image.open(path) as picture:
        small = picture.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def test_ddpm_tab_grid_equals_infer_and_a_double_click_runs_once(browser, tmp_path):
    driver, tab = browser["driver"], browser["demo"].app_tabs["ddpm"]
    open_tab(driver, "Pixel DDPM")
    type_into(driver, "#ddpm_steps input", 4)
    type_into(driver, "#ddpm_seed input", 11)
    type_into(driver, "#ddpm_count input[type=number]", 9)
    jobs = tab.jobs
    button = find(driver, "#ddpm_sample")
    button.click()
    button.click()  # while the first runs: ignored (trigger_mode "once")
    source = image_after(driver, "#ddpm_grid")
    time.sleep(1)
    assert tab.jobs == jobs + 1
    infer.main(infer.parse_args(["ddpm", "--model", str(browser["models"]["ddpm"]), "--num_inference_steps", "4", "--seed", "11",
                                 "--num_samples", "9", "--device", "cpu", "--output_dir", str(tmp_path)]))
    assert_same_picture(fetched(source, tmp_path, "grid.png"), tmp_path / "ddpm_samples.png")
    screenshot(browser, "ddpm")


def test_phaseformer_tab_bad_uploads_then_output_equals_infer(browser, tmp_path):
    driver, uploads = browser["driver"], browser["uploads"]
    open_tab(driver, "Phaseformer")
    find(driver, "#phaseformer_input input[type=file]").send_keys(str(uploads["heavy"]))  # over --max_upload_mb 1
    page_shows(driver, 'exceed the maximum allowed size of 976.6 Kb: "heavy.png"')  # Gradio's page refuses to send it
    for case, message in (("text", "is not an image this app can read"), ("sixteen_bit", "16-bit")):
        upload_file(driver, "#phaseformer_input", uploads[case])
        find(driver, "#phaseformer_run").click()
        page_shows(driver, message)
        clear = driver.find_elements("css selector", "#phaseformer_input button[aria-label='Clear']")
        if clear:
            clear[0].click()
            time.sleep(0.5)
    upload_file(driver, "#phaseformer_input", uploads["rgb"])
    find(driver, "#phaseformer_run").click()
    source = image_after(driver, "#phaseformer_L")
    page_shows(driver, "UCIQE")
    infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(browser["models"]["phaseformer"]), "--input",
                                 str(uploads["rgb"]), "--output_dir", str(tmp_path), "--device", "cpu"]))
    assert_same_picture(fetched(source, tmp_path, "L.png"), tmp_path / "L/photo.png")
    screenshot(browser, "phaseformer", keep_messages=True)  # the refusals, shown in the page


def test_user_tab_samples_equal_infer(browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser["driver"]
    open_tab(driver, "User generation")
    type_into(driver, "#user_ids textarea, #user_ids input", "2 3")
    type_into(driver, "#user_per_user input[type=number]", 2)
    type_into(driver, "#user_steps input", 3)
    type_into(driver, "#user_seed input", 4)
    find(driver, "#user_run").click()
    image_after(driver, "#user_gallery")
    page_shows(driver, "classifier says user")
    infer.main(infer.parse_args(["user", "--dit_checkpoint", str(browser["models"]["dit"]), "--vavae_path",
                                 str(browser["models"]["vavae"]), "--vavae_config", "tiny", "--user_ids", "2", "3",
                                 "--num_samples_per_user", "2", "--num_inference_steps", "3", "--seed", "4",
                                 "--guidance_scale", str(browser["demo"].app_tabs["user"].model.bundle.sampling["guidance_scale"]),
                                 "--output_dir", str(tmp_path), "--device", "cpu"]))
    sources = []
    for img in driver.find_elements(By.CSS_SELECTOR, "#user_gallery img"):
        if img.get_attribute("src") not in sources:
            sources.append(img.get_attribute("src"))
    assert len(sources) == 4
    assert_same_picture(fetched(sources[0], tmp_path, "first.png"), tmp_path / "user_02/generated_000.png")
    assert_same_picture(fetched(sources[-1], tmp_path, "last.png"), tmp_path / "user_03/generated_001.png")
    screenshot(browser, "user")


def test_seesr_tab_tags_then_two_checkpoints_equal_infer(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, models, uploads = browser["driver"], browser["models"], browser["uploads"]
    open_tab(driver, "SeeSR")
    upload_file(driver, "#seesr_input", uploads["lr"])
    find(driver, "#seesr_get_tags").click()
    deadline = time.monotonic() + WAIT
    while not find(driver, "#seesr_tags textarea").get_attribute("value") and time.monotonic() < deadline:
        time.sleep(0.3)
    tags = find(driver, "#seesr_tags textarea").get_attribute("value")
    assert tags  # RAM + DAPE's tags, shown for editing
    type_into(driver, "#seesr_steps input", 5)
    type_into(driver, "#seesr_seed input", 3)
    compare = find(driver, "#seesr_compare input")
    compare.click()
    compare.send_keys(Keys.CONTROL, "a")
    compare.send_keys("seesr_b", Keys.ENTER)
    find(driver, "#seesr_run").click()
    first = image_after(driver, "#seesr_output")
    second = image_after(driver, "#seesr_second")
    page_shows(driver, f"{tags}, ,clean, high-resolution, 8k")
    for name, source in (("seesr", first), ("seesr_b", second)):
        output = tmp_path / name
        infer.main(infer.parse_args(["seesr", "--pretrained_model_path", str(models["sd2"]), "--seesr_model_path", str(models[name]),
                                     "--image_path", str(uploads["lr"]), "--output_dir", str(output), "--ram_path", str(models["ram"]),
                                     "--ram_ft_path", str(models["dape"]), "--process_size", "64", "--seed", "3",
                                     "--num_inference_steps", "5", "--device", "cpu"]))
        assert_same_picture(fetched(source, tmp_path, f"{name}.png"), output / "sample00/frog.png")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#seesr_slider img")) >= 1
    screenshot(browser, "seesr", height=1500)
