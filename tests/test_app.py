"""``examples/app.py`` (Gradio) in a real process, used through a real browser: headless Chromium (Debian's) driven
by Playwright. It types a prompt, generates, checks the result against a lone ``generate`` call and the step count,
replays step 0, fills a template's holes, and writes a screenshot (``$MDM_PRIME_ARTIFACTS`` or the test's folder)."""

import os
import sys
from pathlib import Path

import pytest
from transformers import AutoModel, AutoTokenizer

from browser import browser_page
from conftest import free_port, http_process

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    command = [sys.executable, str(REPO / "examples" / "app.py"), "--model_name_or_path", str(REFERENCE),
               "--port", str(port)]  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    with http_process(command, url):
        yield url


def _wait_for_run(page, previous: str = "") -> str:
    page.wait_for_function(
        "([prev]) => { const t = document.querySelector('#info textarea');"
        " return t && t.value.startsWith('steps') && t.value !== prev; }",
        arg=[previous],
        timeout=120_000,
    )
    return page.locator("#info textarea").input_value()


@pytest.mark.slow
def test_the_demo_in_a_real_browser(app_url, tmp_path):
    model = AutoModel.from_pretrained(REFERENCE, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=32, seed=0, strategy="ancestral", temperature=1.0)
    with browser_page(viewport=(1100, 1300)) as page:
        page.goto(app_url)
        page.locator("#prompt textarea").fill("ROMEO:")
        page.locator("#generate").click()
        info = _wait_for_run(page)
        assert info.startswith("steps: 32 · network calls: ")
        assert page.locator("#result textarea").input_value() == tokenizer.decode(expected[0], skip_special_tokens=True)
        status = page.locator("#live .mdm-status")
        assert status.get_attribute("data-step") == "32" and "masked 0 · partial 0" in status.text_content()
        artifacts = Path(os.environ.get("MDM_PRIME_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(artifacts / "app.png"), full_page=True)

        # Replay: step 0 is the prompt and 32 masked tokens.
        page.locator("#history input[type=range]").fill("0")
        page.wait_for_function("document.querySelector('#live .mdm-status').dataset.step === '0'", timeout=30_000)
        assert page.locator("#live .mdm-masked").count() == 32 and page.locator("#live .mdm-revealed").count() == 0

        # Infill: the template's text stays, its holes are filled.
        page.get_by_label("fill [MASK] holes").check()
        page.locator("#prompt textarea").fill("ROMEO: [MASK:4] my love [MASK:3].")
        page.locator("#generate").click()
        _wait_for_run(page, info)
        result = page.locator("#result textarea").input_value()
        assert result.startswith("ROMEO:") and " my love" in result and result.endswith(".")
    assert (artifacts / "app.png").stat().st_size > 10_000
