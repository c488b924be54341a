"""The chat page at / driven in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through Selenium):
type a message, read the streamed answer, a second turn with its history, the system prompt and temperature,
Stop, New chat, a phone-sized window, and the messages for a missing API key and a server that went away.

Skipped, with the reason, where Chromium or its driver is not installed (``.ci/run`` installs both). Set
``TINYGPT_SCREENSHOT=path.png`` to keep a screenshot of the page."""

import os
import shutil
import time

import pytest
from serve_support import live_server, tiny_checkpoint

from tinygpt.generate import SamplingConfig, generate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="headless Chromium not installed: apt-get install chromium chromium-driver "
                                       "(.ci/run does)")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-page"))


@pytest.fixture(scope="module")
def server(ckpt):
    srv = live_server(ckpt, max_batch=4)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1000,800", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def by_testid(driver, name):
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def open_page(driver, url):
    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: "context" in by_testid(d, "model").text or "(" in by_testid(d, "model").text)


def set_temperature(driver, value):
    driver.execute_script("const t = document.getElementById('temperature'); t.value = arguments[0];"
                          "t.dispatchEvent(new Event('input'));", str(value))


def say(driver, text):
    box = by_testid(driver, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def replies(driver):
    return driver.find_elements(By.CSS_SELECTOR, '.msg.assistant')


def wait_finished(driver, count, timeout=30):
    try:
        WebDriverWait(driver, timeout).until(
            lambda d: len(replies(d)) >= count and replies(d)[count - 1].get_attribute("data-finished"))
    except Exception:
        raise AssertionError(f"no finished reply #{count}; the page shows: {by_testid(driver, 'log').text!r}") from None
    return replies(driver)[count - 1]


def greedy(server, messages):
    tok = server.state.tokenizer
    prompt, _ = tok.render_chat(messages, add_generation_prompt=True)
    ids = generate(server.state.engine.model, [prompt],
                   SamplingConfig(temperature=0.0, max_new_tokens=server.state.block_size - len(prompt)),
                   eos_id=tok.eos_id, stop_sequences=[[tok.end_id]])[0]
    return tok.decode(ids, skip_special=True)


def slow_engine(server, seconds):
    engine = server.state.engine
    real = engine._step
    engine._step = lambda: (time.sleep(seconds), real())[1]
    return lambda: setattr(engine, "_step", real)


def test_a_conversation_streams_in_the_page(browser, server):
    open_page(browser, server.url)
    assert by_testid(browser, "model").text.startswith("tiny/sft")
    browser.find_element(By.ID, "settings-button").click()
    by_testid(browser, "system").send_keys("You are kind.")
    set_temperature(browser, 0)
    restore = slow_engine(server, 0.03)  # slow enough to watch the answer grow
    try:
        say(browser, "Hello!")
        seen = set()
        deadline = time.time() + 30
        while time.time() < deadline:
            r = replies(browser)
            if r:
                seen.add(r[0].find_element(By.CSS_SELECTOR, ".text").text)
                if r[0].get_attribute("data-finished"):
                    break
            time.sleep(0.01)
    finally:
        restore()
    first = wait_finished(browser, 1)
    history = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hello!"}]
    expected = greedy(server, history)
    assert first.find_element(By.CSS_SELECTOR, ".text").text == expected.strip()
    assert len([s for s in seen if s and s != expected.strip()]) >= 2, seen  # it arrived piece by piece
    # a second turn carries the first in its history
    say(browser, "Where did the dog go?")
    second = wait_finished(browser, 2)
    history += [{"role": "assistant", "content": expected}, {"role": "user", "content": "Where did the dog go?"}]
    assert second.find_element(By.CSS_SELECTOR, ".text").text == greedy(server, history).strip()
    assert [m.get_attribute("data-role") for m in browser.find_elements(By.CSS_SELECTOR, ".msg")] == \
        ["user", "assistant", "user", "assistant"]
    if os.environ.get("TINYGPT_SCREENSHOT"):
        browser.find_element(By.ID, "settings-button").click()  # settings closed: the conversation in view
        browser.save_screenshot(os.environ["TINYGPT_SCREENSHOT"])
    by_testid(browser, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_stop_ends_the_answer_and_frees_the_row(browser, server):
    open_page(browser, server.url)
    restore = slow_engine(server, 0.2)
    try:
        say(browser, "Tell me a long story.")
        WebDriverWait(browser, 20).until(lambda d: replies(d) and replies(d)[0].find_element(By.CSS_SELECTOR, ".text").text)
        by_testid(browser, "stop").click()
        reply = wait_finished(browser, 1)
        assert reply.get_attribute("data-finished") == "stopped" and "(stopped)" in reply.text
        deadline = time.time() + 5
        while server.state.engine.load()["active_rows"] and time.time() < deadline:
            time.sleep(0.02)
        assert server.state.engine.load()["active_rows"] == 0
    finally:
        restore()
    assert by_testid(browser, "send").text == "Send"


def test_readable_on_a_phone(browser, server):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server.url)
        say(browser, "Hello!")
        wait_finished(browser, 1)
        wide = browser.execute_script("return document.documentElement.scrollWidth > window.innerWidth")
        assert not wide  # nothing wider than the screen
        box = by_testid(browser, "input").rect
        assert box["y"] + box["height"] <= 844 and box["width"] > 200  # the input stays on screen and usable
    finally:
        browser.set_window_size(1000, 800)


def test_error_messages_for_a_key_and_a_server_gone(browser, ckpt):
    srv = live_server(ckpt, api_key="page-key")
    try:
        open_page(browser, srv.url)
        say(browser, "Hello!")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "needs an API key" in browser.find_element(By.CSS_SELECTOR, ".msg.error").text
        browser.find_element(By.ID, "settings-button").click()
        key = by_testid(browser, "api-key")
        key.send_keys("page-key")
        key.send_keys(Keys.TAB)  # "change" fires: the page reloads the model list with the key
        WebDriverWait(browser, 20).until(lambda d: by_testid(d, "model").text.startswith("tiny/sft"))
        say(browser, "Hello!")
        assert wait_finished(browser, 1).get_attribute("data-finished") in ("stop", "length")
    finally:
        srv.stop()
    say(browser, "Are you there?")  # the server is gone now
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.error")) == 2)
    assert "Cannot reach the server" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
