"""The playground page at `/`: served without a key, and driven in headless Chromium (Playwright over
Debian's `chromium`) against a live server on a tiny random checkpoint. Its captions and answers are nonsense,
so every check compares what the page shows with what the API answers for the same request.

Screenshots go to test-artifacts/playground/. Without a browser the browser tests skip, saying why."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_live, set_config
from fastapi.testclient import TestClient
from PIL import Image

from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.server.app import STATIC, create_app
from xfusion_serve.server.state import ServerConfig

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
TIMEOUT_MS = 60_000  # two CPU cores shared with other work: a slow page, not a hung one


def test_the_page_and_its_files_are_public_and_use_only_the_api():
    app = create_app(ServerConfig(api_keys=["k"]))  # no lifespan, so no model: the page must not need one
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert {"/static/app.js", "/static/conversation.js", "/static/style.css"} <= set(assets)
    for asset in assets:  # served without the key, byte for byte
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert r.content == (STATIC / asset.removeprefix("/static/")).read_bytes()
    assert client.get("/static/app.js").headers["content-type"].split(";")[0] in ("text/javascript",
                                                                                "application/javascript")
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/v1/models").status_code == 401  # the API behind the page still wants the key
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code != 401
    assert "/" not in app.openapi()["paths"]  # the page is no API route (schemathesis fuzzes those)

    # The page calls only the public API's routes, and loads nothing from anywhere else.
    script = (STATIC / "app.js").read_text() + (STATIC / "conversation.js").read_text()
    called = set(re.findall(r'"(/v1/[\w/-]+)"', script))
    assert called == {"/v1/models", "/v1/generate-image", "/v1/caption", "/v1/chat", "/v1/images/edits"}
    assert called <= set(app.openapi()["paths"])
    for name in ("index.html", "app.js", "conversation.js", "style.css"):
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", (STATIC / name).read_text()), name


# ---- the browser ------------------------------------------------------------------------------------------

def _launch(playwright):
    """Debian's chromium (or the one XFUSION_CHROMIUM names), else a Playwright build if one was installed.
    -> a browser, or why none started."""
    tried = []
    candidates = [os.environ.get("XFUSION_CHROMIUM")] + [shutil.which(n) for n in
                                                         ("chromium", "chromium-browser", "google-chrome")]
    for path in dict.fromkeys(p for p in candidates if p):
        try:
            return playwright.chromium.launch(executable_path=path)
        except Exception as e:  # noqa: BLE001 - try the next one, then say why each failed
            tried.append(f"{path}: {str(e).strip().splitlines()[0]}")
    try:
        return playwright.chromium.launch()
    except Exception as e:  # noqa: BLE001
        tried.append(f"Playwright's own Chromium: {str(e).strip().splitlines()[0]}")
    return "; ".join(tried)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        launched = _launch(playwright)
        if isinstance(launched, str):
            pytest.skip(f"no headless Chromium could be started: `make install` installs Debian's chromium "
                        f"when it runs as root (tried {launched})")
        yield launched
        launched.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    crashes = []
    page.on("pageerror", lambda err: crashes.append(str(err)))
    page.on("console", lambda m: print("console:", m.text))  # shown by pytest when the test fails
    yield page
    shot(page, f"{request.node.name}-end")  # the state it ended in, failed or not
    context.close()
    assert not crashes, f"uncaught errors in the page: {crashes}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@contextmanager
def serving(checkpoint, **config):
    server, thread, url, _, _ = run_live(checkpoint, ServerConfig(served_model_name="tiny", **config))
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def start_and_finish(page, panel: str, action) -> None:
    """Runs `action` (which starts a run in a panel) and waits until the panel is done; fails with the
    panel's error message if it shows one."""
    page.evaluate("id => { document.getElementById(id).dataset.state = 'idle'; }", panel)
    action()
    page.wait_for_selector(f"#{panel}[data-state=done], #{panel}[data-state=error]")
    assert page.get_attribute(f"#{panel}", "data-state") == "done", page.text_content(f"#{panel} .error")
    assert page.is_hidden(f"#{panel} .error")


def sse(response: httpx.Response) -> list[dict]:
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def rgba(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGBA"))


# ---- the tests --------------------------------------------------------------------------------------------

def test_generate_streams_previews_and_a_full_progress_bar_then_shows_the_apis_images(page, random_checkpoint_dir):
    with serving(random_checkpoint_dir) as url:
        page.goto(url)
        page.wait_for_selector("#model-info:has-text('Model: tiny')")
        # Every image the page showed and then replaced (the previews), in order, per image slot.
        page.evaluate("""() => {
            window.replaced = [];
            const grid = document.getElementById("gen-images");
            new MutationObserver((records) => {
                for (const r of records) if (r.attributeName === "src" && r.oldValue)
                    window.replaced.push([[...grid.querySelectorAll("img")].indexOf(r.target), r.oldValue]);
            }).observe(grid, {subtree: true, attributes: true, attributeFilter: ["src"], attributeOldValue: true});
        }""")
        page.fill("#gen-prompt", "a small red circle at the top")
        page.fill("#gen-steps", "4")
        page.fill("#gen-guidance", "3")
        page.fill("#gen-seed", "5")
        page.fill("#gen-n", "2")
        with page.expect_request("**/v1/generate-image") as sent:
            start_and_finish(page, "generate", lambda: page.press("#gen-prompt", "Enter"))  # Enter submits
        body = sent.value.post_data_json
        assert body | {"preview_every": 0} == {"prompt": "a small red circle at the top", "steps": 4,
                                               "guidance_scale": 3, "seed": 5, "n": 2, "stream": True,
                                               "preview_every": 0}
        assert body["preview_every"] >= 1
        shot(page, "generate")

        # The same request through the API: the same previews, then the same images.
        events = sse(httpx.post(url + "/v1/generate-image", json=body, timeout=120))
        api_previews = [e["images"] for e in events if e["type"] == "step" and "images" in e]
        api_images = [d["b64_json"] for d in events[-1]["data"]]
        assert len(api_previews) == 4 // body["preview_every"] and len(api_images) == 2
        shown_previews = page.evaluate("window.replaced")
        for i in range(2):
            assert [src for slot, src in shown_previews if slot == i] == \
                   [f"data:image/png;base64,{p[i]}" for p in api_previews]

        finals = page.locator("#gen-images img.final")
        assert finals.count() == 2
        for i in range(2):
            img = finals.nth(i)
            assert img.get_attribute("src") == f"data:image/png;base64,{api_images[i]}"
            # Decoded, not just loaded: drawn to a canvas, its pixels are the API's image's pixels.
            width, height, pixels = img.evaluate("""async (img) => {
                await img.decode();  // loaded and decoded: drawing an undecoded image draws nothing
                const canvas = document.createElement("canvas");
                canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
                const ctx = canvas.getContext("2d");
                ctx.drawImage(img, 0, 0);
                return [img.naturalWidth, img.naturalHeight, Array.from(ctx.getImageData(0, 0, canvas.width,
                                                                                        canvas.height).data)];
            }""")
            expected = rgba(api_images[i])
            assert (height, width) == expected.shape[:2] and width > 0
            drawn = np.array(pixels, dtype=np.uint8).reshape(expected.shape)
            assert drawn[..., :3].std() > 0  # an image, not a blank canvas
            assert np.abs(drawn.astype(int) - expected).max() <= 1  # colour handling may round by one
        assert page.eval_on_selector("#gen-progress", "p => [p.value, p.max]") == [4, 4]
        assert page.text_content("#gen-status").startswith("Done")


def test_caption_of_a_dropped_or_chosen_image_is_the_apis_caption(page, random_checkpoint_dir, tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / f"shape-{i}.png")
        shape_sample(3, i)[1].save(files[-1])
    with serving(random_checkpoint_dir) as url:

        def api_caption(path: Path) -> str:
            r = httpx.post(url + "/v1/caption", files={"image": (path.name, path.read_bytes(), "image/png")},
                           timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["caption"]

        # Playwright turns on file chooser interception when a listener subscribes; subscribing inside
        # expect_file_chooser races the key press (a picker opened first is a real one, and no event comes).
        page.on("filechooser", lambda chooser: None)
        page.goto(url)
        # The keyboard way: focus the drop zone, Enter opens the file picker.
        page.focus("#drop-zone")
        with page.expect_file_chooser() as chooser:
            page.keyboard.press("Enter")
        start_and_finish(page, "caption", lambda: chooser.value.set_files(files[0]))
        expected = api_caption(files[0])
        assert expected.strip() and page.text_content("#cap-text") == expected
        assert page.eval_on_selector("#cap-image", "img => img.naturalWidth") == Image.open(files[0]).width
        shot(page, "caption-chosen")

        # Dropped onto the zone (a real drop event carrying the file).
        data = base64.b64encode(files[1].read_bytes()).decode()
        start_and_finish(page, "caption", lambda: page.evaluate("""([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"])
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", [data, files[1].name]))
        expected = api_caption(files[1])
        assert expected.strip() and page.text_content("#cap-text") == expected
        shot(page, "caption-dropped")

        # Space opens the picker too; a file that is no image gets the server's own words, readably.
        page.focus("#drop-zone")
        with page.expect_file_chooser() as chooser:
            page.keyboard.press(" ")
        (tmp_path / "notes.txt").write_text("not an image")
        chooser.value.set_files(tmp_path / "notes.txt")
        page.wait_for_selector("#caption[data-state=error]")
        alert = page.locator("#caption [role=alert]")
        assert alert.is_visible() and re.fullmatch(r"not a readable image \(\w+\) \(HTTP 400\)", alert.text_content())
        shot(page, "caption-error")


def test_chat_streams_the_apis_answer_and_keeps_the_conversation(page, random_checkpoint_dir):
    with serving(random_checkpoint_dir) as url:

        def api_answer(messages: list[dict]) -> str:
            r = httpx.post(url + "/v1/chat", json={"messages": messages}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        page.goto(url)
        page.fill("#chat-input", "the blue square")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))  # Enter sends
        first = api_answer([{"role": "user", "content": "the blue square"}])
        answers = page.locator("#chat-log .assistant .text")
        assert first.strip() and answers.nth(0).text_content() == first
        assert page.input_value("#chat-input") == ""

        # The second turn carries the first: the page sends the whole conversation.
        page.fill("#chat-input", "a large green triangle at the top")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        asked = [{"role": "user", "content": "the blue square"}, {"role": "assistant", "content": first},
                 {"role": "user", "content": "a large green triangle at the top"}]
        second = api_answer(asked)
        assert second != api_answer(asked[2:])  # so the answer tells whether the history was sent
        assert answers.count() == 2 and answers.nth(1).text_content() == second
        assert page.locator("#chat-log .user .text").all_text_contents() == [m["content"] for m in asked[::2]]

        # Shift+Enter writes a new line instead of sending.
        page.fill("#chat-input", "one")
        page.press("#chat-input", "Shift+Enter")
        assert page.input_value("#chat-input") == "one\n" and answers.count() == 2
        shot(page, "chat")


def test_a_keyed_server_shows_the_401_readably_then_works_with_the_key(page, random_checkpoint_dir):
    with serving(random_checkpoint_dir, api_keys=["sekret"]) as url:
        page.goto(url)  # the page itself needs no key
        missing = "missing or wrong API key (Authorization: Bearer KEY) (HTTP 401)"
        page.wait_for_selector("#server-error:visible")
        assert page.text_content("#server-error") == missing

        page.fill("#gen-prompt", "a red circle")
        page.fill("#gen-steps", "2")
        page.press("#gen-prompt", "Enter")
        page.wait_for_selector("#generate[data-state=error]")
        alert = page.locator("#generate [role=alert]")
        assert alert.is_visible() and alert.text_content() == missing
        assert page.locator("#gen-images img").count() == 0
        shot(page, "api-key-missing")

        page.fill("#api-key", "sekret")
        page.press("#api-key", "Tab")  # `change`: the page checks the key at once
        page.wait_for_selector("#model-info:has-text('Model: tiny')")
        assert page.is_hidden("#server-error")
        start_and_finish(page, "generate", lambda: page.press("#gen-prompt", "Enter"))
        assert page.locator("#gen-images img.final").count() == 1

        page.fill("#chat-input", "hello")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        r = httpx.post(url + "/v1/chat", json={"messages": [{"role": "user", "content": "hello"}]},
                       headers={"Authorization": "Bearer sekret"}, timeout=60)
        assert page.locator("#chat-log .assistant .text").text_content() == r.json()["choices"][0]["message"]["content"]
        shot(page, "api-key-given")

        # A wrong key: the same readable message, and the message typed is given back to send again.
        page.fill("#api-key", "wrong")
        page.fill("#chat-input", "again")
        page.press("#chat-input", "Enter")
        page.wait_for_selector("#chat[data-state=error]")
        assert page.text_content("#chat [role=alert]") == missing and page.input_value("#chat-input") == "again"
        assert page.locator("#chat-log .message").count() == 2


def test_conversation_with_pictures_image_answers_and_an_edit(page, random_checkpoint_dir, tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / f"picture-{i}.png")
        shape_sample(9, i)[1].save(files[-1])
    uris = ["data:image/png;base64," + base64.b64encode(f.read_bytes()).decode() for f in files]
    with serving(random_checkpoint_dir) as url:
        sent = []
        page.on("request", lambda r: sent.append(r) if r.url.endswith(("/v1/chat", "/v1/images/edits")) else None)

        def chat(body: dict) -> dict:
            r = httpx.post(url + "/v1/chat", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]

        page.goto(url)
        page.set_input_files("#chat-file", [str(f) for f in files])
        page.wait_for_selector("#chat-attached img >> nth=1")
        page.fill("#chat-input", "what are these")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in uris] + [
            {"type": "text", "text": "what are these"}]}
        assert sent[-1].post_data_json["messages"] == [first]  # both pictures, then the text (as edits have them)
        answer = chat({"messages": [first]})["content"]
        assert page.locator("#chat-log .assistant .text").nth(0).text_content() == answer
        assert page.locator("#chat-log .user img").count() == 2 and page.is_hidden("#chat-attached")

        # An image back: the whole conversation is its prompt.
        page.select_option("#chat-mode", "image")
        page.fill("#chat-seed", "3")
        page.fill("#chat-input", "draw one")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        history = [first, {"role": "assistant", "content": answer}, {"role": "user", "content": "draw one"}]
        drawn = chat({"messages": history, "modalities": ["image"], "seed": 3})["images"]
        shown = page.locator("#chat-log .assistant").nth(1).locator("img")
        assert shown.count() == 1 and shown.get_attribute("src") == drawn[0]["image_url"]["url"]

        # An edit of an attached picture, then a text turn whose history holds the model's images.
        page.select_option("#chat-mode", "edit")
        page.set_input_files("#chat-file", [str(files[0])])
        page.fill("#chat-seed", "4")
        page.fill("#chat-input", "make it blue")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        assert sent[-1].url.endswith("/v1/images/edits")
        r = httpx.post(url + "/v1/images/edits", files=[("image[]", ("p.png", files[0].read_bytes(), "image/png"))],
                       data={"prompt": "make it blue", "seed": "4"}, timeout=60)
        edited = page.locator("#chat-log .assistant").nth(2).locator("img")
        assert edited.get_attribute("src") == "data:image/png;base64," + r.json()["data"][0]["b64_json"]
        page.select_option("#chat-mode", "text")
        page.fill("#chat-input", "thanks")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        messages = sent[-1].post_data_json["messages"]
        assert len(messages) == 7 and messages[3]["images"] == drawn
        assert messages[5]["images"][0]["image_url"]["url"] == edited.get_attribute("src")
        shot(page, "conversation")


def test_a_checkpoint_that_says_what_it_draws_shows_its_words_before_its_image(page, random_checkpoint_dir, tmp_path):
    set_config(random_checkpoint_dir, image_answer={"text_first": True, "max_text_tokens": 4})
    shape_sample(9, 0)[1].save(tmp_path / "p.png")
    with serving(random_checkpoint_dir) as url:
        sent = []
        page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat") else None)
        page.goto(url)
        page.select_option("#chat-mode", "image")
        page.fill("#chat-seed", "3")
        page.fill("#chat-input", "green")  # the tiny model's greedy words before its image: "small left"
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        api = httpx.post(url + "/v1/chat", json={"messages": [{"role": "user", "content": "green"}],
                                                 "modalities": ["image"], "seed": 3}, timeout=60).json()
        said = api["choices"][0]["message"]["content"]
        answer = page.locator("#chat-log .assistant").nth(0)
        assert said and answer.locator(".text").text_content() == said
        assert answer.locator("img").get_attribute("src") == api["choices"][0]["message"]["images"][0]["image_url"]["url"]
        # An edit shows the words it was drawn after (revised_prompt), and the next turn's history keeps them.
        page.select_option("#chat-mode", "edit")
        page.set_input_files("#chat-file", [str(tmp_path / "p.png")])
        page.fill("#chat-input", "green")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        r = httpx.post(url + "/v1/images/edits", files=[("image[]", ("p.png", (tmp_path / "p.png").read_bytes(),
                                                                     "image/png"))],
                       data={"prompt": "green", "seed": "3"}, timeout=60).json()["data"][0]
        edited = page.locator("#chat-log .assistant").nth(1)
        assert r["revised_prompt"] != "green" and edited.locator(".text").text_content() == r["revised_prompt"]
        page.select_option("#chat-mode", "text")
        page.fill("#chat-input", "thanks")
        start_and_finish(page, "chat", lambda: page.press("#chat-input", "Enter"))
        messages = sent[-1].post_data_json["messages"]
        assert messages[1]["content"] == said and messages[3]["content"] == r["revised_prompt"]
