"""The chat page of `lmforge serve` (`/`) in headless Chromium, driven by selenium through the system's
/usr/bin/chromium and /usr/bin/chromedriver (Debian's `chromium` and `chromium-driver`; `.ci/run` installs
them): a streamed greedy reply equals the server's non-streamed answer, over two turns with a system prompt;
a missing API key is said plainly; Stop ends a long stream and frees the server's slot; the model picker
switches between per-request adapters."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
         "--window-size=1000,800")  # fmt: skip
KEY = "web-key"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs the system Chromium and its driver: apt-get install chromium chromium-driver",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
uvicorn = pytest.importorskip("uvicorn")
from live_server import serving  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# ---------------------------------------------------------------------------------------------- the server


class Pace:
    """A pause after every logits computation of the served model: a stream long enough to stop by hand."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, *_: object) -> None:
        if self.seconds:
            time.sleep(self.seconds)


def post(url: str, body: dict) -> dict:
    """The JSON answer to a POST with the key (standard library only)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def answer(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """The server's non-streamed greedy choice for what the page sends (temperature 0, top-p 1)."""
    body = {"model": model, "messages": messages, "temperature": 0, "top_p": 1, "max_tokens": max_tokens}
    return post(f"{url}/v1/chat/completions", body)["choices"][0]


def gauges(url: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def pace() -> Pace:
    return Pace()


@pytest.fixture(scope="module")
def server(tiny_model_dir, pace):
    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app

    engine = Engine.from_dir(tiny_model_dir, device="cpu")
    engine.model.lm_head.register_forward_hook(pace)
    yield from serving(create_app(engine, "tiny", api_key=KEY))


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # The driver's path given: selenium does not run Selenium Manager (which would download one).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def field(driver, id_: str):
    return driver.find_element(By.ID, id_)


def fill(driver, id_: str, text: str) -> None:
    """Type `text` into a field over whatever it holds (keys, so that its input events fire)."""
    element = field(driver, id_)
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE, text)


def open_page(driver, url: str, key: str | None = KEY, models: list[str] | None = None) -> None:
    """Load the page, type the API key (none: clear the stored one) and wait for the model picker."""
    driver.get(f"{url}/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    if key is not None:
        fill(driver, "api-key", key)
        wait(driver, lambda d: d.execute_script("return [...document.getElementById('model').options]"
                                                ".map(o => o.value)") == models)  # fmt: skip
    field(driver, "temperature").send_keys(Keys.HOME)  # the range's minimum: greedy
    assert field(driver, "temperature").get_property("value") == "0"
    assert field(driver, "temperature-value").text == "0"


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def last_reply(driver) -> tuple[str, str] | None:
    """The last assistant element's (data-state, text)."""
    return driver.execute_script(
        "const r = [...document.querySelectorAll('#transcript .assistant')].pop();"
        "return r ? [r.dataset.state, r.textContent] : null;"
    )


def ask(driver, text: str, *, enter: bool = False, timeout: float = 60) -> tuple[str, str]:
    """Type a message, send it (Enter or the button) and wait for the reply to end: its (state, text)."""
    replies = len(driver.find_elements(By.CSS_SELECTOR, "#transcript .assistant"))
    fill(driver, "message", text)
    if enter:
        field(driver, "message").send_keys(Keys.ENTER)
    else:
        field(driver, "send").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#transcript .assistant")) > replies)
    return wait(driver, lambda d: (r := last_reply(d)) and r[0] != "streaming" and r, timeout)


# ---------------------------------------------------------------------------------------------- the tests


def test_streamed_greedy_turns_equal_the_server_answer(browser, server):
    """Two turns with a system prompt, at temperature 0: each streamed reply is the server's non-streamed
    answer to the whole conversation so far; "New chat" empties the transcript."""
    open_page(browser, server, models=["tiny"])
    fill(browser, "system", "be brief")
    fill(browser, "max-tokens", "12")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    state, text = ask(browser, "the cat", enter=True)
    expected = answer(server, "tiny", messages, 12)["message"]["content"]
    assert state == "done" and text and text == expected

    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "a dog"}]
    state, text = ask(browser, "a dog")
    assert state == "done" and text and text == answer(server, "tiny", messages, 12)["message"]["content"]
    users = [
        e.get_property("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "#transcript .user")
    ]
    assert users == ["the cat", "a dog"]

    field(browser, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#transcript > *") == []
    fill(browser, "system", "")
    state, text = ask(browser, "a dog")  # a new conversation: only this turn is sent
    assert text == answer(server, "tiny", [{"role": "user", "content": "a dog"}], 12)["message"]["content"]
    browser.refresh()
    assert field(browser, "api-key").get_property("value") == KEY  # kept in localStorage


def test_a_missing_api_key_is_asked_for(browser, server):
    open_page(browser, server, key=None)
    wait(browser, lambda d: "API key" in field(d, "status").text)
    state, text = ask(browser, "hello")
    assert state == "error" and 'enter it in the "API key" field' in text
    assert field(browser, "send").is_enabled() and not field(browser, "stop").is_enabled()


def test_stop_ends_a_long_stream_and_frees_the_slot(browser, server, pace):
    messages = [{"role": "user", "content": "a dog"}]
    whole = answer(server, "tiny", messages, 100)  # unpaced: greedy runs the whole 100 tokens
    assert whole["finish_reason"] == "length", "the stop test wants a message the tiny model does not end"
    open_page(browser, server, models=["tiny"])
    fill(browser, "max-tokens", "100")
    pace.seconds = 0.1  # 100 tokens: 10 s or more
    try:
        fill(browser, "message", "a dog")
        field(browser, "send").click()
        wait(browser, lambda d: (r := last_reply(d)) and r[0] == "streaming" and r[1], 30)
        assert gauges(server)["lmforge_running_requests"] == "1"
        assert not field(browser, "send").is_enabled()
        start = time.perf_counter()
        field(browser, "stop").click()
        state, text = wait(browser, lambda d: (r := last_reply(d)) and r[0] != "streaming" and r, 5)
        assert state == "stopped" and time.perf_counter() - start < 2
        assert whole["message"]["content"].startswith(text) and text != whole["message"]["content"]
        wait(browser, lambda _: gauges(server)["lmforge_running_requests"] == "0", 10)
    finally:
        pace.seconds = 0.0
    assert field(browser, "send").is_enabled() and not field(browser, "stop").is_enabled()


def test_the_model_picker_switches_adapters(browser, tiny_model_dir, tiny_lora_dirs):
    """`#model` lists the base model and its adapters ("a (adapter of tiny)"); a reply with adapter a, then
    with b, is the server's non-streamed answer for that model id."""
    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app

    app = create_app(
        Engine.from_dir(tiny_model_dir, device="cpu"), "tiny", adapters=tiny_lora_dirs, api_key=KEY
    )
    for url in serving(app):
        open_page(browser, url, models=["tiny", "a", "b"])
        labels = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
        assert labels == ["tiny", "a (adapter of tiny)", "b (adapter of tiny)"]
        fill(browser, "max-tokens", "12")
        messages = [{"role": "user", "content": "the cat"}]
        expected = {m: answer(url, m, messages, 12)["message"]["content"] for m in ("tiny", "a", "b")}
        assert len(set(expected.values())) == 3, f"the adapters should change the greedy reply: {expected}"
        for model in ("a", "b"):
            field(browser, "new-chat").click()
            Select(field(browser, "model")).select_by_value(model)
            assert field(browser, "model").get_property("value") == model
            state, text = ask(browser, "the cat")
            assert state == "done" and text == expected[model]
