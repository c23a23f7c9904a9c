"""The web chat page at / in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Load the page, attach an image through the file input (and by paste and drop), ask, watch the answer stream in,
stop a long answer (the engine request must be aborted), see a server error shown, and check that Markdown from the
model cannot inject HTML. Screenshots are saved under the test's tmp_path (their paths are printed). The engine is
the fake test double: this tests the page, not the model. scripts/test.sh installs Chromium and sets
FASTLLAVA_REQUIRE_BROWSER=1, so in CI a missing browser is a failure, never a silent skip; a developer without
Chromium gets a skip with the reason (the page's JS-free contract is checked in test_server_situations.py).
"""

from __future__ import annotations

import io
import os
import shutil

import pytest
from PIL import Image

from fastllava.server import ServerSettings, create_app
from server_fake_engine import FakeEngine, FakeProcessor, LiveServer

CHROMIUM = os.environ.get("FASTLLAVA_CHROMIUM", "/usr/bin/chromium")
if not shutil.which(CHROMIUM):
    if os.environ.get("FASTLLAVA_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"no Chromium at {CHROMIUM}: the browser tests are required here (apt-get install chromium)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_upload_ask_stream_stop(browser, tmp_path):
    engine = FakeEngine(step_delay=0.03)
    image_path = tmp_path / "red.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    image_path.write_bytes(buf.getvalue())
    app = create_app(ServerSettings(model_name="tiny-llava"), lambda: (engine, FakeProcessor()))
    with LiveServer(app) as live:
        live.wait_ready()
        page = browser.new_page(viewport={"width": 900, "height": 700})
        script_errors = []  # uncaught JavaScript exceptions (failed image loads and HTTP errors are expected)
        page.on("pageerror", lambda e: script_errors.append(str(e)))
        page.goto(live.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        # predicates as arrow functions: a bare expression needs eval, which the page's CSP forbids when polled
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-llava'")

        # attach the image, ask, and watch the answer stream in
        page.set_input_files("#file-input", str(image_path))
        page.wait_for_selector("#attachments .attachment img")
        page.click("#toggle-settings")
        page.fill("#max-tokens", "12")
        page.fill("#temperature", "0")
        page.fill("#prompt", "What colour is the square?")
        page.click("#send")
        page.wait_for_function("""() => { const b = document.querySelector('.msg.assistant.streaming');
                                          return b && b.textContent.trim().length > 0; }""")  # partial answer
        page.wait_for_selector(".msg.assistant:not(.streaming)")
        answer = page.inner_text(".msg.assistant")
        assert answer.strip() and "stopped at the token limit" in answer
        assert page.locator(".msg.user img.msg-image").count() == 1
        assert page.inner_text(".msg.user").strip() == "What colour is the square?"
        content = engine.conversations[-1][-1]["content"]
        assert [p["type"] for p in content] == ["image", "text"] and content[0]["image"].size == (64, 48)

        # a second turn resends the conversation (with its image), and Stop aborts a long answer
        page.fill("#max-tokens", "400")
        page.fill("#prompt", "Tell me a long story")
        page.click("#send")
        page.wait_for_function("""() => { const b = document.querySelectorAll('.msg.assistant')[1];
                                          return b && b.textContent.trim().split(' ').length > 3; }""")
        page.screenshot(path=str(tmp_path / "chat-streaming.png"))
        page.click("#stop")
        page.wait_for_selector("#send:not([hidden])")
        assert "(stopped)" in page.locator(".msg.assistant").nth(1).inner_text()
        second = engine.conversations[-1]
        assert [m["role"] for m in second] == ["user", "assistant", "user"]
        assert second[0]["content"][0]["type"] == "image"
        deadline = __import__("time").monotonic() + 5
        while (engine.live or not engine.aborted) and __import__("time").monotonic() < deadline:
            page.wait_for_timeout(20)
        assert engine.aborted and not engine.live  # the server aborted the generation

        # a server-side error is shown to the user (an image URL the server refuses to fetch)
        page.fill("#image-url", "http://127.0.0.1:9/secret.png")
        page.click("#add-url")
        page.fill("#prompt", "and this one?")
        page.click("#send")
        page.wait_for_selector("#error:not([hidden])")
        assert "422" in page.inner_text("#error") and "allowed" in page.inner_text("#error")

        # an image can also be pasted or dropped onto the page
        page.click("#attachments .remove")  # drop the refused URL from the composer
        page.evaluate("""async () => {
            const canvas = document.createElement('canvas'); canvas.width = 8; canvas.height = 8;
            const blob = await new Promise(resolve => canvas.toBlob(resolve, 'image/png'));
            const file = (name) => new File([blob], name, {type: 'image/png'});
            const pasted = new DataTransfer(); pasted.items.add(file('pasted.png'));
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: pasted, bubbles: true}));
            const dropped = new DataTransfer(); dropped.items.add(file('dropped.png'));
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: dropped, bubbles: true, cancelable: true}));
        }""")
        page.wait_for_function("() => document.querySelectorAll('#attachments .attachment').length === 2")
        assert sorted(page.eval_on_selector_all("#attachments img", "els => els.map(e => e.alt)")) == \
            ["dropped.png", "pasted.png"]

        # Markdown is rendered, and model output cannot inject HTML
        html = page.evaluate("renderMarkdown('**bold** and `x<y`\\n\\n- a\\n- b\\n\\n<img src=x onerror=alert(1)>"
                             "\\n[ok](https://example.com) [bad](javascript:alert(1))')")
        assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html and "<li>a</li>" in html
        assert "<img" not in html and "&lt;img" in html and 'href="javascript' not in html
        assert 'href="https://example.com"' in html

        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        print("screenshots:", tmp_path / "chat.png", tmp_path / "chat-streaming.png")
        assert not script_errors, script_errors
        page.close()


def test_page_asks_for_the_api_key_when_needed(browser):
    app = create_app(ServerSettings(api_key="k3y"), lambda: (FakeEngine(), FakeProcessor()))
    with LiveServer(app) as live:
        live.wait_ready()
        page = browser.new_page()
        page.goto(live.url + "/")
        page.wait_for_selector("#settings:not([hidden])")  # opened because a key is needed
        page.fill("#prompt", "hello")
        page.click("#send")
        page.wait_for_selector("#error:not([hidden])")
        assert "401" in page.inner_text("#error")
        assert page.input_value("#prompt") == "hello" and page.locator(".msg.user").count() == 0
        page.fill("#api-key", "k3y")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.streaming)")
        assert page.inner_text(".msg.assistant").strip()
        page.close()
