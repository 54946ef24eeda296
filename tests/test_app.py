"""``examples/app.py`` (Gradio) in a real process, used through a real browser: headless Chromium (Debian's) driven
by Playwright. It types a prompt, generates, checks the result against a lone ``generate`` call and the step count,
replays step 0, fills a template's holes, and writes a screenshot (``$MDM_PRIME_ARTIFACTS`` or the test's folder)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModel, AutoTokenizer

from browser import browser_page

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(REPO / "examples" / "app.py"), "--model_name_or_path", str(REFERENCE),
               "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited: {process.stdout.read()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not start within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


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
