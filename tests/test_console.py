"""The web console (issue 13) in real headless Chromium (Debian's, driven by Playwright through its
`executable_path`).

Two parts. Without a stack: the console's static files are served by the console router alone, and its pure
modules (SSE parser, stage fractions, exact seeds, the usage chart's days) run in the browser itself. With the
dev stack (real nats-server, moto S3 over HTTP, both functions on tiny models, the gateway over HTTP): sign in,
submit, watch progress, play and download the video, cancel, see a validation message beside its field, be refused
with a wrong key. Screenshots go to a temporary directory (printed) and the finished video's page to
docs/console.png. Chromium missing is a failure, never a skip: .ci/run installs it."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest
import pytest_asyncio

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 375, "height": 740}


def chromium_executable() -> str:
    """Debian's chromium; its absence fails the test with what to do (CI installs it in .ci/run)."""
    path = Path("/usr/bin/chromium")
    found = str(path) if path.exists() else shutil.which("chromium")
    if not found:
        pytest.fail("chromium is not installed: `apt-get install chromium` (Debian; .ci/run does this in CI)")
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    from playwright.async_api import async_playwright

    executable = chromium_executable()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go (test artifacts)."""
    path = tmp_path_factory.mktemp("console-screenshots")
    print(f"console screenshots: {path}")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def console_only():
    """The console router alone, served over HTTP by hypercorn: its base URL."""
    from fastapi import FastAPI

    from turboflow.eventing.asgi import serve_asgi
    from turboflow.gateway.console import router

    app = FastAPI()
    app.include_router(router)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(serve_asgi(app, "127.0.0.1", port, stop, sock=sock))
    yield f"http://127.0.0.1:{port}"
    stop.set()
    await task


async def no_horizontal_scroll(page) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    viewport = await page.evaluate("window.innerWidth")
    assert width <= viewport, f"{page.url}: the page is {width}px wide in a {viewport}px viewport"


# ---- static part: no stack ----------------------------------------------------------------------------------------


async def test_console_files_are_served_with_their_types_and_a_strict_policy(console_only):
    import httpx

    async with httpx.AsyncClient(base_url=console_only) as http:
        root = await http.get("/console")
        assert root.status_code == 308 and root.headers["location"] == "console/"
        page = await http.get("/console/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        module = await http.get("/console/app.js")
        assert module.headers["content-type"].startswith("text/javascript")
        for bad in (
            "/console/../console.py",
            "/console/%2e%2e/console.py",
            "/console/nope.js",
            "/console/.hidden.js",
            "/console/app.py",
            "/console/sub/app.js",
        ):
            assert (await http.get(bad)).status_code == 404, bad


async def test_console_modules_in_the_browser(browser, console_only):
    """The pure parts of the console, run where they run: Chromium."""
    page = await browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"{console_only}/console/")
    results = await page.evaluate(
        """async () => {
        const { parseSse } = await import("./sse.js");
        const { stageFractions } = await import("./stages.js");
        const { parseJson, toJson } = await import("./api.js");
        const { fillDays, barChart } = await import("./chart.js");
        const { fieldName } = await import("./create.js");
        const enc = new TextEncoder();
        const bytes = [
          enc.encode("event: queued\\r"), enc.encode("\\nid: 1\\ndata: {\\"a\\""), enc.encode(":1}\\n\\n: ping\\n\\n"),
          enc.encode("event: progress\\ndata: x\\ndata: y\\n\\n"),
          // a two-byte character split between chunks
          ...((b) => [b.slice(0, 7), b.slice(7)])(enc.encode("data: \\u00e9t\\u00e9\\r\\n\\r\\n")),
          enc.encode("data: never finished"),
        ];
        const body = new ReadableStream({ start(c) { bytes.forEach((b) => c.enqueue(b)); c.close(); } });
        const sse = [];
        for await (const m of parseSse(body)) sse.push(m);
        const running = stageFractions(
          { task: "t2v", status: "running", progress: { stage: "diffusion", step: 1, of: 4 } });
        const done = stageFractions({ task: "i2v", status: "completed", progress: null });
        const seedText = '{"seed":9223372036854775807,"n":3}';
        const seed = parseJson(seedText);
        const days = fillDays([{ day: "2024-02-29", gpu_seconds: 2.5, requests: 1 }], "2024-02-27", "2024-03-01");
        const chart = barChart(days);
        return {
          sse,
          running: running.map((s) => [s.name, s.fraction]),
          done: done.map((s) => [s.name, s.fraction]),
          seedType: typeof seed.seed, seedBack: toJson(seed), small: typeof seed.n,
          days: days.map((d) => [d.day, d.gpu_seconds]),
          bars: [...chart.querySelectorAll("rect")].map((r) => Number(r.getAttribute("height"))),
          fields: ["prompt", "/num_frames", "body.seed", "request.image", ""].map(fieldName),
        };
    }"""
    )
    await page.close()
    assert errors == []
    assert results["sse"] == [
        {"event": "queued", "data": '{"a":1}', "id": "1"},
        {"event": "progress", "data": "x\ny", "id": "1"},
        {"event": "message", "data": "été", "id": "1"},
    ]
    assert results["running"] == [["text_encode", 1], ["diffusion", 0.25], ["vae_decode", 0], ["upload", 0]]
    assert results["done"] == [[s, 1] for s in ("text_encode", "vae_encode", "diffusion", "vae_decode", "upload")]
    assert (results["seedType"], results["small"]) == ("bigint", "number")
    assert results["seedBack"] == '{"seed":9223372036854775807,"n":3}'
    assert results["days"] == [["2024-02-27", 0], ["2024-02-28", 0], ["2024-02-29", 2.5], ["2024-03-01", 0]]
    assert results["bars"][2] > 0 and results["bars"][:2] + results["bars"][3:] == [0, 0, 0]
    assert results["fields"] == ["prompt", "num_frames", "seed", "image", None]


async def test_every_control_has_a_label(browser, console_only):
    """Inputs, selects, text areas and buttons of every view (hidden ones included) have an accessible name, and
    every aria-describedby points at an element that exists."""
    page = await browser.new_page()
    await page.goto(f"{console_only}/console/")
    problems = await page.evaluate(
        r"""() => {
        const out = [];
        for (const el of document.querySelectorAll("input, select, textarea, button, progress")) {
          const named = el.labels?.length || el.getAttribute("aria-label")
            || (el.tagName === "BUTTON" && el.textContent.trim());
          if (!named) out.push(`unlabelled ${el.tagName} #${el.id}`);
        }
        for (const el of document.querySelectorAll("[aria-describedby]")) {
          for (const id of el.getAttribute("aria-describedby").split(/\s+/)) {
            if (!document.getElementById(id)) out.push(`#${el.id} described by missing #${id}`);
          }
        }
        return out;
    }"""
    )
    await page.close()
    assert problems == []


async def test_sign_in_page_fits_a_phone_and_works_by_keyboard(browser, console_only, shots):
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    await page.goto(f"{console_only}/console/")
    key = page.get_by_label("API key")
    await key.wait_for()
    # the key field has focus on arrival; Tab reaches the button
    assert await page.evaluate("document.activeElement.id") == "api-key"
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Sign in"
    await page.keyboard.press("Enter")
    assert await page.locator("#api-key-error").text_content() == "Enter an API key."
    assert await key.get_attribute("aria-invalid") == "true"
    await no_horizontal_scroll(page)
    await page.screenshot(path=shots / "sign-in-375.png", full_page=True)
    await context.close()


# ---- end to end: the dev stack with tiny models ---------------------------------------------------------------------

FPS = 16
# Small enough for 2 CPU cores, big enough to have every stage: 640x480, 5 frames (0.31 s), 2 rCM steps.
SMALL = {"resolution": "480p", "aspect_ratio": "4:3", "num_frames": "5", "num_steps": "2", "seed": "7"}
# Long enough on tiny models to still be queued or running when the cancel button is pressed.
LONG = {"resolution": "480p", "aspect_ratio": "4:3", "num_frames": "81", "num_steps": "4"}
# Page functions are given as arrow functions: a bare expression would be eval()ed, which the console's
# Content-Security-Policy forbids (as it should).
# Records every state the video page shows, so a test can see progress that has already gone by.
RECORD_STATES = """
window.__seen = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => {
    const status = document.querySelector("#v-status")?.textContent || "";
    const bars = [...document.querySelectorAll("#v-progress progress")].map((p) => [p.id.slice(2), p.value]);
    const clock = document.querySelector("#v-clock")?.textContent || "";
    window.__seen.push({ status, bars, clock, queue: document.querySelector("#v-queue")?.textContent || "" });
  }).observe(document.querySelector("#view-video"), { subtree: true, childList: true, characterData: true });
});
"""


def as_json(fields: dict) -> dict:
    """Form values (strings) as the API's JSON: numbers for the numeric fields."""
    return {k: v if k in ("resolution", "aspect_ratio") else int(v) for k, v in fields.items()}


def png_bytes(size=(96, 64)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dev(tiny_t2v_dir, tiny_i2v_dir, moto_s3, tmp_path_factory):
    import uuid

    from turboflow.eventing.devstack import DevConfig
    from turboflow.gateway.devstack import GatewayDevStack

    cfg = DevConfig(
        s3_endpoint=moto_s3,
        bucket=f"console-{uuid.uuid4().hex[:8]}",
        models={"t2v": tiny_t2v_dir, "i2v": tiny_i2v_dir},
        delivery={"timeout": 120.0, "retry": 2, "backoff_delay": 0.2},
        log_dir=tmp_path_factory.mktemp("console-dev"),
        notify_interval=0.2,
    )
    async with GatewayDevStack(cfg) as stack:
        await stack.wait_ready(timeout=180)
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def finished_video(dev) -> dict:
    """A completed T2V request made through the API (usage and the phone-sized pages need one)."""
    import httpx

    body = {"task": "t2v", "prompt": "a finished video", **as_json(SMALL)}
    async with httpx.AsyncClient(base_url=dev.url, headers={"Authorization": f"Bearer {dev.api_key}"}) as api:
        created = await api.post("/v1/videos", json=body)
        assert created.status_code == 201, created.text
        for _ in range(600):
            video = (await api.get(f"/v1/videos/{created.json()['id']}")).json()
            if video["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.2)
    assert video["status"] == "completed", video
    return video


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser, dev):
    """A desktop-sized page of a fresh browser context (its own sessionStorage), not yet signed in."""
    context = await browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    await context.add_init_script(RECORD_STATES)
    page = await context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    await page.goto(f"{dev.url}/console/")
    yield page
    await context.close()
    assert page.errors == [], page.errors


async def sign_in(page, key: str) -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()


async def shown_or_explained(page, locator) -> None:
    """Wait for `locator` to be visible; when it is not, fail with what the page showed instead (its route, the
    visible section and error texts, script errors): a timeout alone says nothing of why."""
    try:
        await locator.wait_for()
    except Exception as e:
        state = await page.evaluate(
            """() => ({
              hash: location.hash,
              sections: [...document.querySelectorAll("main > section")].filter((s) => !s.hidden).map((s) => s.id),
              errors: [...document.querySelectorAll("[id$='-error']")].map((n) => [n.id, n.textContent]).filter(
                ([, text]) => text),
            })"""
        )
        pytest.fail(f"{locator} never showed: {type(e).__name__}; page: {state}; script errors: {page.errors}")


async def fill_form(page, prompt: str, fields: dict) -> None:
    await page.get_by_label("Prompt").fill(prompt)
    for name, value in fields.items():
        control = page.locator(f"#f-{name}")
        if await control.evaluate("el => el.tagName") == "SELECT":
            await control.select_option(value)
        else:
            await control.fill(value)


async def opened_video(page) -> str:
    """After Generate: the new video's id (its page opened), or a failure with what the form says."""
    handle = await page.wait_for_function(
        """() => location.hash.startsWith("#/videos/") ? location.hash
          : document.querySelector("#create-error").textContent ? "error" : false""",
        timeout=30_000,
    )
    opened = await handle.json_value()
    if opened == "error":
        form = await page.locator("#create-form").inner_text()
        pytest.fail(f"the request was not created: {form}")
    return opened.rsplit("/", 1)[1]


async def wait_status(page, statuses: set[str], timeout_s: float = 120) -> str:
    await page.wait_for_function(
        "s => s.includes(document.querySelector('#v-status').textContent)",
        arg=sorted(statuses),
        timeout=timeout_s * 1e3,
    )
    return await page.locator("#v-status").text_content()


async def test_a_wrong_key_is_refused_with_the_apis_message(page, dev, shots):
    import httpx

    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{dev.url}/v1/videos", headers={"Authorization": "Bearer tf_nope_wrong"})
    assert answer.status_code == 401
    await sign_in(page, "tf_nope_wrong")
    error = page.locator("#api-key-error")
    await error.wait_for()
    assert await error.text_content() == answer.json()["detail"]
    assert await page.locator("#nav").is_hidden()
    assert await page.evaluate("sessionStorage.getItem('turboflow.apiKey')") is None
    await page.screenshot(path=shots / "wrong-key.png")


async def test_submit_watch_play_download_reproduce(page, dev, shots):
    await sign_in(page, dev.api_key)
    await page.locator("#view-new").wait_for()
    await fill_form(page, "a red fox in the snow", SMALL)
    assert await page.locator("#f-num_frames-seconds").text_content() == "5 frames ≈ 0.3 s at 16 fps"
    await page.locator("#f-seed").press("Enter")  # the keyboard submits the form
    video_id = await opened_video(page)
    assert await wait_status(page, {"completed", "failed", "cancelled"}) == "completed"

    seen = await page.evaluate("window.__seen")
    running = [s for s in seen if s["status"] == "running" and s["clock"].startswith("Elapsed")]
    assert running, f"no progress was shown while running: {seen}"
    assert any(0 < dict(s["bars"]).get("text_encode", 0) for s in running)
    finished = dict((await page.evaluate("window.__seen"))[-1]["bars"])
    assert finished == {"text_encode": 1, "diffusion": 1, "vae_decode": 1, "upload": 1}

    # the player has the video: decodable (readyState >= 2) and frames / fps long, within a frame
    await page.wait_for_function("() => document.querySelector('#v-player').readyState >= 2", timeout=30_000)
    duration = await page.evaluate("document.querySelector('#v-player').duration")
    assert abs(duration - 5 / FPS) <= 1 / FPS, duration
    facts = await page.locator("#v-facts").inner_text()
    assert "Seed\n7" in facts.replace("\t", "\n") and "GPU-seconds" in facts

    # the download link gives the mp4 itself (an ISO BMFF file whose sha256 the page shows)
    import hashlib

    link = page.get_by_role("link", name="Download mp4")
    assert await link.get_attribute("download") == f"{video_id}.mp4"
    body = await (await page.request.get(await link.get_attribute("href"))).body()
    assert body[4:8] == b"ftyp" and hashlib.sha256(body).hexdigest() in facts

    # a frame from the middle of the video for the screenshot, controls at rest
    await page.locator("#v-player").evaluate(
        """v => new Promise((done) => {
          v.pause();
          v.addEventListener("seeked", done, { once: true });
          v.currentTime = 0.15;
        })"""
    )
    await page.screenshot(path=shots / "completed.png", full_page=True)
    docs = Path(__file__).resolve().parents[1] / "docs" / "console.png"
    await page.screenshot(path=docs, full_page=True)

    # "reproduce" opens the form filled with this request's input
    await page.get_by_role("button", name="Reproduce").click()
    await page.locator("#view-new").wait_for()
    assert await page.get_by_label("Prompt").input_value() == "a red fox in the snow"
    for name, value in SMALL.items():
        assert await page.locator(f"#f-{name}").input_value() == value, name


async def test_image_to_video_with_a_preview(page, dev, shots):
    await sign_in(page, dev.api_key)
    await page.get_by_label("Image to video").check()
    image = page.get_by_label("Image", exact=True)
    await image.set_input_files({"name": "cat.png", "mimeType": "image/png", "buffer": png_bytes()})
    preview = page.get_by_role("img", name="Preview of the chosen image")
    await preview.wait_for()
    await page.wait_for_function("() => document.querySelector('#f-image-preview').naturalWidth === 96")
    await fill_form(page, "the cat turns its head", {**SMALL, "num_frames": "5"})
    await page.get_by_role("button", name="Generate").click()
    await opened_video(page)
    assert await wait_status(page, {"completed", "failed", "cancelled"}) == "completed"
    assert "s3://" in await page.locator("#v-input").text_content()  # the uploaded image, as its object
    await page.wait_for_function("() => document.querySelector('#v-player').readyState >= 2", timeout=30_000)
    await page.screenshot(path=shots / "i2v-completed.png", full_page=True)


async def test_an_invalid_input_shows_the_apis_message_beside_its_field(page, dev, shots):
    await sign_in(page, dev.api_key)
    await fill_form(page, "too long", {"num_frames": "999", "num_steps": "2"})
    await page.get_by_role("button", name="Generate").click()
    message = page.locator("#f-num_frames-error")
    await message.wait_for()
    frames = page.get_by_label("Frames")
    assert await frames.get_attribute("aria-invalid") == "true"
    assert "f-num_frames-error" in await frames.get_attribute("aria-describedby")
    assert "241" in await message.text_content()  # the schema's maximum, as the API words it
    assert await page.evaluate("document.activeElement.id") == "f-num_frames"
    assert page.url.endswith("#/new") or page.url.endswith("/console/")  # nothing was created
    await page.screenshot(path=shots / "invalid-input.png", full_page=True)


async def test_cancel_from_the_page(page, dev, shots):
    await sign_in(page, dev.api_key)
    await fill_form(page, "a long take of the sea", LONG)
    await page.get_by_role("button", name="Generate").click()
    await opened_video(page)
    await page.get_by_role("button", name="Cancel").click()
    assert await wait_status(page, {"completed", "failed", "cancelled"}) == "cancelled"
    assert await page.get_by_role("button", name="Cancel").is_hidden()
    assert (await page.locator("#v-error").text_content()).startswith("Cancelled")
    assert await page.locator("#v-result").is_hidden()
    await page.screenshot(path=shots / "cancelled.png", full_page=True)


async def test_history_filters_and_pages(page, dev):
    import httpx

    # two requests of its own, cancelled at once through the API (no device time), so that this test stands alone
    async with httpx.AsyncClient(base_url=dev.url, headers={"Authorization": f"Bearer {dev.api_key}"}) as api:
        for prompt in ("history one", "history two"):
            body = {"task": "t2v", "prompt": prompt, **as_json(LONG)}
            created = await api.post("/v1/videos", json=body)
            assert created.status_code == 201, created.text
            assert (await api.post(f"/v1/videos/{created.json()['id']}/cancel")).status_code in (200, 202)
    await sign_in(page, dev.api_key)
    await page.get_by_role("link", name="History").click()
    cards = page.locator("#h-list li")
    await shown_or_explained(page, cards.first)
    assert await cards.count() >= 2
    await page.get_by_label("Status").select_option("cancelled")
    await page.wait_for_url("**#/history?status=cancelled")
    await page.wait_for_function("() => document.querySelectorAll('#h-list li').length > 0")
    assert set(await page.locator("#h-list .badge").all_text_contents()) == {"cancelled"}

    await page.goto(f"{dev.url}/console/#/history?limit=1")
    await page.wait_for_function("() => document.querySelectorAll('#h-list li').length === 1")
    first = await cards.first.inner_text()
    await page.get_by_role("link", name="Next page").click()
    await page.wait_for_function(
        """first => {
          const li = document.querySelectorAll('#h-list li');
          return li.length === 1 && li[0].innerText !== first;
        }""",
        arg=first,
    )
    assert await page.get_by_role("link", name="First page").is_visible()


async def test_usage_chart_shows_todays_gpu_seconds(page, dev, finished_video, shots):
    await sign_in(page, dev.api_key)
    await page.get_by_role("link", name="Usage").click()
    chart = page.get_by_role("img", name="GPU-seconds per day")
    await chart.wait_for()
    bars = page.locator("#u-chart rect")
    heights = [float(h) for h in await bars.evaluate_all("rs => rs.map(r => r.getAttribute('height'))")]
    assert len(heights) == 30 and heights[-1] > 0  # today is the last day; the completed videos used GPU time
    assert "GPU-seconds over" in await page.locator("#u-total").text_content()
    await page.screenshot(path=shots / "usage.png", full_page=True)


async def test_main_pages_fit_a_375px_screen(browser, dev, finished_video, shots):
    context = await browser.new_context(viewport=PHONE)
    page = await context.new_page()
    await page.goto(f"{dev.url}/console/")
    await sign_in(page, dev.api_key)
    await page.locator("#view-new").wait_for()
    await page.get_by_label("Image to video").check()  # the longest form
    await no_horizontal_scroll(page)
    await page.screenshot(path=shots / "new-375.png", full_page=True)
    for route, ready in (("history", "#h-list li"), ("usage", "#u-chart svg")):
        await page.goto(f"{dev.url}/console/#/{route}")
        await page.locator(ready).first.wait_for()
        await no_horizontal_scroll(page)
        await page.screenshot(path=shots / f"{route}-375.png", full_page=True)
    await page.goto(f"{dev.url}/console/#/videos/{finished_video['id']}")
    assert await wait_status(page, {"completed", "failed", "cancelled"}) == "completed"
    await page.wait_for_function("() => document.querySelector('#v-player').readyState >= 2", timeout=30_000)
    await no_horizontal_scroll(page)
    await page.screenshot(path=shots / "video-375.png", full_page=True)
    await context.close()
