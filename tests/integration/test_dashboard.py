"""The dashboard page in headless Chromium against the embedded stack, with really recorded sessions.

One stack and one browser for the module: `oneoff-audit record` (a real subprocess, `--tty never`)
files a small session and one whose log is over the inline limit; the assembler files them; the
page served by the stack lists them, replays the small one and offers the big one as a download
whose link returns exactly the stored object. A token restricted to another app sees the denial.
Screenshots go to build/dashboard-timeline.png and build/dashboard-replay.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import expect

from oneoff_audit import keys
from oneoff_audit.aws import client
from oneoff_audit.ids import new_session_id

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
CLI = str(Path(sys.executable).parent / "oneoff-audit")
CHROMIUM = "/usr/bin/chromium"
STATIC = ROOT / "layers" / "oneoff_audit" / "oneoff_audit" / "static"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP = "dash-app"
OTHER_APP = "other-app"
LIVE_APP = "dash-live"  # the still-running session: kept off APP's timeline, which the first test lists
WAIT_MS = 15_000

SMALL_PROGRAM = r"""
import sys
typed = sys.stdin.readline()
print("hello from the dashboard test", flush=True)
print("you typed: " + typed.strip(), flush=True)
print("caf\u00e9 \u20ac done", flush=True)
sys.stderr.write("a warning on stderr\n")
"""
SMALL_INPUT = b"select 1;\n"
# ~1.4 MB of output: the plaintext log is well over the 1 MiB inline limit
BIG_PROGRAM = r"""
import sys
line = "row %06d " + "x" * 60 + "\n"
for i in range(20000):
    sys.stdout.write(line % i)
sys.exit(3)
"""


@dataclass
class Recorded:
    stack: object
    small: str
    big: str
    restricted_token: str


def _api(stack, path: str, token: str | None = None) -> tuple[int, object]:
    request = urllib.request.Request(stack.api_url + path,
                                     headers={"Authorization": f"Bearer {token or stack.admin_token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _record(stack, program: str, stdin: bytes, actor: str) -> str:
    session_id = new_session_id()
    proc = subprocess.run(
        [CLI, "record", "--app", APP, "--actor-id", actor.lower().replace(" ", "."), "--actor-name", actor,
         "--target", "region=test", "--target", "container=one-off.7", "--tty", "never",
         "--session-id", session_id, "--", sys.executable, "-c", program],
        input=stdin, capture_output=True, env={**os.environ, **stack.env()}, timeout=60,
    )
    assert proc.returncode in (0, 3), proc.stderr.decode("utf-8", "replace")
    return session_id


def _wait_filed(stack, session_id: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    status, body = _api(stack, f"/apps/{APP}/sessions/{session_id}")
    while status == 202 and time.monotonic() < deadline:
        time.sleep(0.2)
        status, body = _api(stack, f"/apps/{APP}/sessions/{session_id}")
    assert status == 200, (status, body)


@pytest.fixture(scope="module")
def recorded() -> Iterator[Recorded]:
    """The embedded stack (`oneoff-audit local`, its own moto server), with a small and a big session filed.

    The stack gets a moto server of its own (s3_port=0): `local.start` cannot attach to the session's
    shared one (moto's server thread fails to bind the busy port and `start()` waits forever).
    """
    from oneoff_audit import local
    from oneoff_audit.aws import reset_clients

    if not (STATIC / "vendor" / "asciinema-player.min.js").is_file():
        pytest.fail("the vendored player is missing: run `make setup` (it installs asciinema-player from npm)")
    saved = dict(os.environ)
    restricted = "restricted-" + new_session_id().lower()
    stack = local.start(port=0, s3_port=0, bucket=f"dash-{new_session_id().lower()}",
                        tokens={restricted: {"sub": "u-other", "name": "Other team", "custom:audit_apps": OTHER_APP}})
    try:
        small = _record(stack, SMALL_PROGRAM, SMALL_INPUT, "Dana Small")
        big = _record(stack, BIG_PROGRAM, b"", "Bo Big")
        _wait_filed(stack, small)
        _wait_filed(stack, big)
        yield Recorded(stack, small, big, restricted)
    finally:
        stack.stop()
        os.environ.clear()
        os.environ.update(saved)
        reset_clients()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory) -> Iterator[object]:
    """Debian's Chromium driven by Playwright, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (it installs Debian's chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, accept_downloads=False,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context):
    """A new tab (its own sessionStorage, so its own token); page errors and CSP violations fail the test."""
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    tab.set_default_timeout(WAIT_MS)
    yield tab
    tab.close()
    assert errors == []


def _goto(page, stack, route: str, token: str | None = None) -> None:
    """Open the dashboard at ``route`` (e.g. ``/apps/x``), handing it the token in the fragment."""
    page.goto(f"{stack.dashboard_url(token)}&{route}")


def _open_app(page, url: str, app: str) -> None:
    page.goto(url)
    page.fill("#app-input", app)
    page.press("#app-input", "Enter")


def test_timeline_lists_the_recorded_sessions_newest_first(recorded, page):
    stack = recorded.stack
    _open_app(page, stack.dashboard_url(), APP)
    page.wait_for_selector("#timeline-rows tr")
    assert "token=" not in page.url  # the token left the address bar (kept in sessionStorage)
    rows = page.locator("#timeline-rows tr")
    assert [rows.nth(i).get_attribute("data-session") for i in range(rows.count())] == [recorded.big, recorded.small]
    big, small = rows.nth(0), rows.nth(1)
    assert small.locator(".badge").all_inner_texts() == ["succeeded"]
    assert big.locator(".badge").all_inner_texts() == ["failed"]
    assert big.locator("td[data-label=Exit]").inner_text() == "code 3"
    assert "Dana Small" in small.locator("td[data-label=Actor]").inner_text()
    assert "container=one-off.7" in small.locator("td[data-label=Target]").inner_text()
    assert small.locator("td[data-label=Command] code").inner_text().startswith(sys.executable + " -c ")
    assert big.locator("td[data-label=Size]").inner_text().endswith("MiB")
    # the status filter is applied by the API
    page.select_option("#f-status", "failed")
    page.click("#filters button[type=submit]")
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-session") == recorded.big
    page.click("#filters button[type=reset]")
    expect(rows).to_have_count(2)
    BUILD.mkdir(exist_ok=True)
    page.screenshot(path=str(BUILD / "dashboard-timeline.png"), full_page=True)
    # a phone-sized window: rows become cards, nothing wider than the screen
    page.set_viewport_size({"width": 360, "height": 780})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    assert small.locator("td[data-label=Status]").is_visible()
    page.screenshot(path=str(BUILD / "dashboard-narrow.png"), full_page=True)


def test_small_session_shows_its_output_and_replays(recorded, page):
    stack = recorded.stack
    _goto(page, stack, f"/apps/{APP}")
    # keyboard only: the row's link takes focus and Enter opens the session, whose heading gets focus
    link = page.locator(f"#timeline-rows tr[data-session='{recorded.small}'] a")
    link.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#session-title")).to_be_focused()
    page.wait_for_selector("#log-inline:not([hidden])")
    transcript = page.locator("#transcript")
    assert "hello from the dashboard test\nyou typed: select 1;\ncafé € done\n" in transcript.inner_text()
    assert transcript.locator("span.e").text_content() == "a warning on stderr\n"
    assert transcript.locator("span.i").text_content() == "select 1;↵\n"  # stdin, marked apart from output
    assert page.locator("#input-list .typed").all_inner_texts() == ["select 1;↵"]
    assert page.locator("#integrity-summary").inner_text().startswith("Complete:")
    assert "Dana Small (dana.small)" in page.locator("#meta").inner_text()
    # replay at 16x: the terminal shows the output
    page.select_option("#speed", "16")
    page.click("#player .ap-playback-button")
    screen = page.locator("#player .ap-term-text")
    expect(screen).to_contain_text("café € done")
    screen = screen.inner_text()
    assert "hello from the dashboard test" in screen
    assert "you typed: select 1;" in screen
    page.screenshot(path=str(BUILD / "dashboard-replay.png"), full_page=True)
    # another speed rebuilds the player at the same moment of the session: the screen stays as it was
    page.select_option("#speed", "2")
    expect(page.locator("#player .ap-term-text")).to_contain_text("café € done")
    # the access audit lists this very view of the log
    page.locator("#access summary").click()
    viewed = page.locator("#access-rows tr", has_text="viewed the log")
    expect(viewed).not_to_have_count(0)
    assert "Local auditor (local-admin), admin" in viewed.first.inner_text()


def test_big_session_offers_a_download_that_returns_the_stored_file(recorded, page, tmp_path):
    stack = recorded.stack
    _goto(page, stack, f"/apps/{APP}/sessions/{recorded.big}")
    link = page.locator("#download-link")
    link.wait_for(state="visible")
    assert page.locator("#log-inline").is_hidden()
    stored = client("s3").get_object(Bucket=stack.resources.bucket, Key=keys.log_key(APP, recorded.big))["Body"].read()
    assert link.inner_text() == f"Download encrypted log ({len(stored) / (1 << 20):.1f} MiB)"
    assert link.get_attribute("download") == f"{recorded.big}.jsonl.enc"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        downloaded = response.read()
    assert downloaded == stored
    facts = page.locator("#download-facts").inner_text()
    assert hashlib.sha256(stored).hexdigest() in facts
    assert f"{len(stored)} bytes (encrypted)" in facts
    _, details = _api(stack, f"/apps/{APP}/sessions/{recorded.big}")
    assert page.locator("#decrypt-command").inner_text() == (
        f"oneoff-audit decrypt {recorded.big}.jsonl.enc -o {recorded.big}.jsonl --app {APP} --session {recorded.big}\n"
        f"oneoff-audit verify {recorded.big}.jsonl --sha256 {details['integrity']['plaintext_sha256']}")
    assert page.locator("#download-expiry").inner_text().startswith("link valid for")
    # the commands shown are the ones to run: they decrypt and verify the downloaded file
    (tmp_path / f"{recorded.big}.jsonl.enc").write_bytes(downloaded)
    run = subprocess.run(["bash", "-e", "-c", page.locator("#decrypt-command").inner_text()], cwd=tmp_path,
                         env={**os.environ, **stack.env(), "PATH": f"{Path(CLI).parent}:{os.environ['PATH']}"},
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    plaintext = (tmp_path / f"{recorded.big}.jsonl").read_bytes()
    assert hashlib.sha256(plaintext).hexdigest() == details["integrity"]["plaintext_sha256"]


def test_running_session_is_shown_as_recording_until_it_is_filed(recorded, page):
    stack = recorded.stack
    session_id = new_session_id()
    proc = subprocess.Popen(
        [CLI, "record", "--app", LIVE_APP, "--actor-id", "late.runner", "--tty", "never", "--session-id", session_id,
         "--", sys.executable, "-c", "import sys; print('started', flush=True); sys.stdin.read(); print('finished')"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **stack.env()},
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        deadline = time.monotonic() + 15
        while _api(stack, f"/apps/{LIVE_APP}/sessions/{session_id}") != (202, {"status": "recording"}):
            assert time.monotonic() < deadline, "the session never showed up as recording"
            time.sleep(0.1)
        _goto(page, stack, f"/apps/{LIVE_APP}/sessions/{session_id}")
        pending = page.locator("#session-problem .problem[data-problem='202']")
        pending.wait_for()
        assert pending.locator("h2").inner_text() == "Still recording"
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        # the page checks again by itself and shows the filed session
        expect(page.locator("#transcript")).to_contain_text("started\nfinished", timeout=30_000)
        assert page.locator("#session-problem").inner_text() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_token_for_another_app_sees_the_denial(recorded, page):
    stack = recorded.stack
    _open_app(page, stack.dashboard_url(recorded.restricted_token), APP)
    denial = page.locator("#timeline-problem .problem[data-problem='403']")
    denial.wait_for()
    assert denial.locator("h2").inner_text() == "Access denied"
    assert f"Your token may not read the app “{APP}”." in denial.inner_text()
    assert page.locator("#timeline").is_hidden()
    # the same for a session of that app, whether it exists or not
    page.goto(f"{stack.api_url}/#/apps/{APP}/sessions/{recorded.small}")
    page.locator("#session-problem .problem[data-problem='403']").wait_for()
    assert page.locator("#session-body").is_hidden()
    # its own app: an empty timeline, not an error
    _open_app(page, f"{stack.api_url}/#/", OTHER_APP)
    page.locator("#timeline-empty").wait_for(state="visible")


def test_unknown_session_is_shown_as_not_found(recorded, page):
    stack = recorded.stack
    missing = new_session_id()
    _goto(page, stack, f"/apps/{APP}/sessions/{missing}")
    problem = page.locator("#session-problem .problem[data-problem='404']")
    problem.wait_for()
    assert problem.locator("h2").inner_text() == "Not found"
    assert f"There is no session “{missing}” in the app “{APP}”." in problem.inner_text()


def test_static_files_are_served_and_nothing_else(recorded):
    stack = recorded.stack

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(stack.api_url + path, timeout=10) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read()

    status, ctype, body = get("/")
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    assert body == (STATIC / "index.html").read_bytes()
    status, ctype, body = get("/static/app.js")
    assert (status, ctype, body) == (200, "text/javascript; charset=utf-8", (STATIC / "app.js").read_bytes())
    status, ctype, body = get("/static/vendor/asciinema-player.css")
    assert (status, ctype) == (200, "text/css; charset=utf-8")
    for path in ("/static/../local.py", "/static/%2e%2e/local.py", "/static/..%2flocal.py", "/static/vendor/.installed",
                 "/static/", "/static/vendor", "/static//etc/passwd", "/static/nope.js", "/index.htm"):
        status, ctype, body = get(path)
        assert status in (401, 404), path  # 404 from the static files, or the API's 401 for no token
        assert b"import " not in body and b"root:" not in body
    # everything else is the API's: JSON, and no answer without a token
    status, ctype, body = get(f"/apps/{APP}/sessions")
    assert status == 401 and ctype.startswith("application/json")
