"""End to end in a real headless browser (Chromium from the distribution, driven by Playwright):
log in with a token, label five pairs by keyboard, undo one, export from the owner's page, train
``rlxf dpo`` for two steps on the export. A completion holding a script must stay inert text.

Skipped, with the reason, where Playwright or a Chromium binary is missing (``make sysdeps``
installs Debian's chromium when run as root). ``RLXF_LABELING_SCREENSHOT=PATH`` also saves the
screenshot of the labeling page there (docs/labeling.png is made this way).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest

from rlxf.labeling.accounts import add_user
from rlxf.labeling.items import push_items
from rlxf.labeling.schema import open_engine

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def chromium_path() -> str | None:
    return os.environ.get("RLXF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; the browser itself comes from the distribution)"
    if chromium_path() is None:
        return ("no Chromium binary: install Debian's package (make sysdeps does as root; apt-get install chromium) "
                "or point RLXF_CHROMIUM at one")
    return None


ITEMS = [{"prompt": "Which reply is safe to show?", "completions": ["plain text", XSS], "priority": 9},
         *({"prompt": f"{a}+{b}=", "completions": [str(a + b + 1), str(a + b)] if a % 2 else [str(a + b), str(a + b + 1)]}
           for a, b in [(3, 4), (12, 7), (25, 5), (8, 9)])]


def good_index(prompt: str, completions: list[str]) -> int:
    if "+" not in prompt:
        return completions.index("plain text")
    a, b = prompt.rstrip("=").split("+")
    return completions.index(str(int(a) + int(b)))


@pytest.mark.slow
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_label_five_pairs_by_keyboard_undo_export_and_train_dpo(tmp_path):
    from playwright.sync_api import sync_playwright

    from rlxf.cli import main
    from rlxf.labeling.server import make_server

    db = str(tmp_path / "labels.db")
    engine = open_engine(db)
    owner, labeler = add_user(engine, "lead", role="owner"), add_user(engine, "ann")
    push_items(engine, "default", ITEMS)
    engine.dispose()
    server = make_server(db)
    dialogs: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            undone = label_by_keyboard(page, server.url, labeler, tmp_path)
            export = export_from_owner_page(browser.new_page(), server.url, owner, tmp_path)
            browser.close()
    finally:
        server.stop()
    assert dialogs == []
    pairs = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(pairs) == 5 and all(p["labeler"] == "ann" and p["item_version"] == 1 for p in pairs)
    # the fifth label chose the wrong sum; it was undone and answered again, so every pair is right
    by_prompt = {p["prompt"]: p for p in pairs}
    assert undone == "8+9=" and by_prompt[undone]["chosen"] == "17"
    assert all(p["chosen"] == str(sum(map(int, k.rstrip("=").split("+")))) for k, p in by_prompt.items() if "+" in k)
    assert by_prompt["Which reply is safe to show?"]["rejected"] == XSS
    out = tmp_path / "dpo"
    assert main(["dpo", "--model", "tiny", "--dataset", str(export), "--max-steps", "2", "--batch-size", "2",
                 "--eval-holdout", "0", "--threads", "1", "--progress", "false", "--log-every", "1",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def label_by_keyboard(page, url: str, token: str, tmp_path) -> str:
    """Log in, label the five items (the fifth wrongly), undo it, label it again; returns its prompt.
    Waits use Playwright's locators: the page's CSP forbids the eval behind wait_for_function."""
    page.goto(url + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#work:not([hidden])")
    # the first item holds the script: shown as text, never run
    texts = page.locator(".completion-text").all_text_contents()
    assert texts[1] == XSS and page.locator("#completions img, #completions script").count() == 0
    page.screenshot(path=str(tmp_path / "labeling.png"))
    if os.environ.get("RLXF_LABELING_SCREENSHOT"):
        shutil.copy(tmp_path / "labeling.png", os.environ["RLXF_LABELING_SCREENSHOT"])
    last_prompt = None
    for done in range(1, 6):
        last_prompt = answer(page, done, wrong=last_prompt is not None and done == 5)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    page.wait_for_selector("#done:not([hidden])")
    from playwright.sync_api import expect

    page.keyboard.press("z")                                     # undo the last label
    expect(page.locator("#progress")).to_have_text(re.compile(r"^4 labelled"))
    assert page.text_content("#prompt") == last_prompt
    answer(page, 5, wrong=False)
    page.wait_for_selector("#done:not([hidden])")
    return last_prompt


def answer(page, done: int, *, wrong: bool) -> str:
    """Press the digit of the better completion (or the worse one), wait until it is stored."""
    from playwright.sync_api import expect

    page.wait_for_selector("#work:not([hidden])")
    prompt = page.text_content("#prompt")
    completions = page.locator(".completion-text").all_text_contents()
    index = good_index(prompt, completions)
    page.keyboard.press(str((1 - index if wrong else index) + 1))
    expect(page.locator("#progress")).to_have_text(re.compile(rf"^{done} labelled"))
    return prompt


def export_from_owner_page(page, url: str, token: str, tmp_path):
    page.goto(url + "/owner")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#owner:not([hidden]) #queues tbody tr")
    assert page.locator("#queues tbody td").nth(4).text_content() == "5"      # labels
    with page.expect_download() as download:
        page.click("#downloads a:text-is('pairs')")
    path = tmp_path / "pairs.jsonl"
    download.value.save_as(str(path))
    return path
