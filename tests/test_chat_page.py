"""The chat page at "/", driven in a real headless Chromium (Playwright): a question typed and sent, the answer
streamed in, the reasoning folded, tool calls shown, thinking on/off and the system prompt reaching the prompt, the
API key, the stop button aborting the request on the server, and nothing loaded from another origin.

Chromium: $GLM5_CHROMIUM, else one on PATH (Debian's `chromium`, which scripts/test.sh installs when it can), else
Playwright's own download. None found is a failure, not a skip: this test is the only check the page works.
"""

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from .server_util import TOK, ScriptedEngine, script, start, tiny_engine, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWER = "The answer is <b>4</b>."  # markup in model text must show as text
REASONING = "Two and two make four."
TOOLS = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
         '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]')
TOOL_OUTPUT = ("Let me check.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
               "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")


def chromium_path() -> str:
    env = os.environ.get("GLM5_CHROMIUM")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"GLM5_CHROMIUM={env} is not a file", pytrace=False)
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    with sync_playwright() as p:
        own = p.chromium.executable_path  # Playwright's download, where `playwright install chromium` worked
    if own and Path(own).is_file():
        return own
    pytest.fail("no Chromium for the chat-page tests: install Debian's `chromium` (scripts/test.sh does so when run "
                "as root: apt-get install chromium), or set GLM5_CHROMIUM=/path/to/chrome", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


def _open(page, url: str) -> list[str]:
    """Load the chat page; → the list of every URL the page requests (filled as it goes)."""
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    page.goto(url + "/")
    return seen


def _ask(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def _last(page):
    return page.locator(".msg.assistant").last


def _wait_finished(page):
    expect(_last(page).locator(".meta")).to_contain_text("finish:")
    expect(page.locator("#send")).to_be_enabled()


def _record_content_states(page):
    """Every distinct text the last answer's content shows, in order (a MutationObserver in the page)."""
    page.evaluate("""() => {
        window.__states = [];
        new MutationObserver(() => {
            const c = [...document.querySelectorAll('.msg.assistant .content')].pop();
            const t = c ? c.textContent : '';
            if (t && window.__states[window.__states.length - 1] !== t) window.__states.push(t);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def test_page_is_served_without_key_and_docs_stay_off():
    srv = start(ScriptedEngine(script("</think>x")), api_key="sekrit")
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert "v1/chat/completions" in r.text
        # no external asset: nothing with a scheme in src/href, no @import
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import""", r.text)
        assert c.get("/v1/models").status_code == 401
        for path in ("/docs", "/redoc"):  # FastAPI's pages load swagger-ui from a CDN
            assert c.get(path).status_code == 404
        assert c.get("/openapi.json").status_code == 200
    finally:
        srv.stop()


def test_chat_streams_the_answer_folds_the_reasoning_and_sends_the_key(page):
    eng = ScriptedEngine(script(REASONING + "</think>" + ANSWER), step_delay=0.03)
    srv = start(eng, api_key="sekrit")
    try:
        seen = _open(page, srv.url)
        expect(page.locator("#model")).to_contain_text("API key")
        _ask(page, "what is 2+2?")  # no key yet: the server's 401 is shown
        expect(_last(page).locator(".error")).to_contain_text("API key")
        page.fill("#key", "sekrit")
        page.dispatch_event("#key", "change")
        expect(page.locator("#model")).to_contain_text("tiny")

        page.fill("#system", "Answer briefly.")
        _record_content_states(page)
        _ask(page, "what is 2+2?")
        _wait_finished(page)
        last = _last(page)
        expect(last.locator(".content")).to_have_text(ANSWER)
        assert last.locator(".content b").count() == 0  # shown as text, not markup
        expect(last.locator(".meta")).to_contain_text("finish: stop")
        # streamed: the answer grew through several states, each a prefix of the next
        states = page.evaluate("window.__states")
        assert len(states) >= 3 and states[-1] == ANSWER, states
        assert all(b.startswith(a) for a, b in zip(states, states[1:])), states
        # the reasoning is there, folded; a click unfolds it
        details = last.locator("details.reasoning")
        assert details.evaluate("d => d.open") is False
        assert details.locator(".reasoning-text").text_content() == REASONING
        expect(details.locator(".reasoning-text")).to_be_hidden()
        details.locator("summary").click()
        expect(details.locator(".reasoning-text")).to_be_visible()

        prompt = TOK.decode(eng.prompts[-1])
        assert "Answer briefly." in prompt and "what is 2+2?" in prompt
        assert eng.prompts[-1][-1] == TOK.token_id("<think>")  # thinking on (the default)

        page.uncheck("#thinking")
        _ask(page, "and 3+3?")
        _wait_finished(page)
        assert eng.prompts[-1][-1] == TOK.token_id("</think>")  # thinking off
        assert "and 3+3?" in TOK.decode(eng.prompts[-1]) and "The answer is" in TOK.decode(eng.prompts[-1])
        assert all(u.startswith(srv.url + "/") for u in seen), seen  # nothing from another origin
    finally:
        srv.stop()


def test_tool_calls_are_shown(page):
    srv = start(ScriptedEngine(script(TOOL_OUTPUT), step_delay=0.01))
    try:
        _open(page, srv.url)
        page.fill("#tools", TOOLS)
        _ask(page, "weather in Paris?")
        _wait_finished(page)
        last = _last(page)
        expect(last.locator(".meta")).to_contain_text("finish: tool_calls")
        expect(last.locator(".tool-call .tool-name")).to_have_text("get_weather")
        args = last.locator(".tool-call .tool-args").text_content()
        assert '"city": "Paris"' in args and '"days": 3' in args, args
        expect(last.locator("details.reasoning .reasoning-text")).to_have_text("Let me check.", use_inner_text=False)
    finally:
        srv.stop()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_stop_button_aborts_the_request_on_the_server(page):
    eng = tiny_engine()
    srv = start(eng)
    max_tokens = 900  # at a tiny model's speed, seconds of generation: stopped long before it ends
    try:
        _open(page, srv.url)
        page.fill("#max-tokens", str(max_tokens))
        page.fill("#temperature", "1")
        _ask(page, "tell me a long story")
        last = _last(page)
        expect(page.locator("#stop")).to_be_enabled()
        page.wait_for_function("() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
                               " return m && (m.querySelector('.reasoning-text').textContent"
                               " + m.querySelector('.content').textContent).length > 0; }")
        page.click("#stop")
        expect(last.locator(".meta")).to_contain_text("finish: stopped")
        expect(page.locator("#stop")).to_be_disabled()
        c = httpx.Client(base_url=srv.url, timeout=30)

        def drained():
            text = c.get("/metrics").text
            return all(_metric(text, n) == 0 for n in ("glm5_requests_in_flight", "glm5_num_requests_running",
                                                       "glm5_num_requests_waiting")) \
                and 'glm5_kv_cache_blocks{state="used"} 0' in text

        wait_for(drained, timeout=20, what="the stopped request to leave the engine")
        text = c.get("/metrics").text
        assert _metric(text, "glm5_generation_tokens_total") < max_tokens
        assert "glm5_request_success_total{" not in text  # it was aborted, not answered
    finally:
        srv.stop()
