"""The unmasking view: a step streamer that sees exactly what ``output_history`` records, its cells' exact
consistent-set sizes, and its three renderers (HTML in a real browser, GIF frames, the rich terminal view)."""

import io
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from browser import browser_page
from modeling_mdm_prime.tools.unmasking_view import RichUnmaskingStreamer, UnmaskingRecorder

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "mdm-prime-shakespeare-tiny"


@pytest.fixture(scope="module")
def reference():
    """The committed ℓ = 2 reference checkpoint, loaded the way users load it (its own remote code)."""
    model = AutoModel.from_pretrained(REFERENCE, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(REFERENCE, padding_side="left")


def _run(model, tokenizer, prompts, streamer, **kwargs):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return model.generate(
        **batch, max_new_tokens=16, seed=0, streamer=streamer, return_dict_in_generate=True, output_history=True,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("strategy", ["ancestral", "confidence", "threshold"])
def test_the_step_streamer_sees_exactly_the_states_of_return_history(reference, strategy):
    model, tokenizer = reference
    recorder = UnmaskingRecorder(model.codec, tokenizer)
    out = _run(model, tokenizer, ["ROMEO:", "JULIET: O Romeo"], recorder, strategy=strategy)
    assert recorder.ended and len(recorder) == len(out.history) + 1
    assert all(torch.equal(seen, kept) for seen, kept in zip(recorder.sub_ids[1:], out.history))
    first = recorder.states[0]
    assert first.step == 0 and first.nfe == 0
    generated = ~first.fixed.all(-1) & first.attention_mask
    assert bool((first.sub_ids[generated] == model.codec.mask_id).all())  # the initial canvas: all masked
    assert [s.step for s in recorder.states] == list(range(len(recorder)))
    assert recorder.states[-1].nfe == out.nfe
    # A step streamer does not change the result.
    assert torch.equal(out.sequences, _run(model, tokenizer, ["ROMEO:", "JULIET: O Romeo"], None,
                                           strategy=strategy).sequences)  # fmt: skip


def test_an_early_stop_shows_the_fill_pass_in_both(reference):
    model, tokenizer = reference
    recorder = UnmaskingRecorder(model.codec, tokenizer)
    out = _run(model, tokenizer, ["ROMEO:"], recorder, num_steps=16, step_callback=lambda state: state.step == 3)
    assert out.num_steps == 3 and len(out.history) == 4 and len(recorder) == 5
    assert recorder.states[-1].final_fill and not recorder.states[-2].final_fill
    assert all(torch.equal(seen, kept) for seen, kept in zip(recorder.sub_ids[1:], out.history))
    assert recorder.counts(-1)["masked"] == recorder.counts(-1)["partial"] == 0


def test_cells_count_the_consistent_tokens_exactly(reference):
    model, tokenizer = reference
    codec = model.codec
    recorder = UnmaskingRecorder(codec, tokenizer)
    _run(model, tokenizer, ["ROMEO:"], recorder)
    table = codec.digit_table()
    seen_partial = 0
    for index in range(len(recorder)):
        state = recorder.states[index]
        cells = recorder.cells(index)
        assert len(cells) == int(state.attention_mask[0].sum())
        for cell in cells:
            if cell.kind == "partial":
                seen_partial += 1
                # Enumeration: every token id whose digits agree with the known ones.
                agree = torch.ones(codec.vocab_size, dtype=torch.bool)
                for j, digit in enumerate(cell.digits):
                    if digit is not None:
                        agree &= table[:, j] == digit
                assert cell.consistent == int(agree.sum()) and 1 <= cell.consistent < codec.vocab_size
                first = agree.nonzero().flatten()[: len(cell.candidates)].tolist()
                assert list(cell.candidates) == [tokenizer.decode([i]) for i in first]
            elif cell.kind == "masked":
                assert cell.consistent == codec.vocab_size
            else:
                assert cell.consistent == 1 and cell.text is not None
    assert seen_partial > 0  # ℓ = 2 with per-digit reveals: partial tokens do occur
    # A token's completion step is the state where it first became complete, and the colours follow it.
    last = recorder.cells(-1)
    for cell, position in zip(last, recorder.states[-1].attention_mask[0].nonzero().flatten().tolist()):
        if cell.kind == "revealed":
            k = cell.revealed_at
            assert bool((recorder.sub_ids[k][0, position] != codec.mask_id).all())
            assert k == 0 or bool((recorder.sub_ids[k - 1][0, position] == codec.mask_id).any())


def test_a_batched_recording_shows_each_row_as_it_would_alone(reference):
    model, tokenizer = reference
    both = UnmaskingRecorder(model.codec, tokenizer, row=1)
    _run(model, tokenizer, ["ROMEO:", "JULIET: O Romeo"], both)
    alone = UnmaskingRecorder(model.codec, tokenizer)
    _run(model, tokenizer, ["JULIET: O Romeo"], alone)
    assert len(both) == len(alone)
    assert [both.frame_text(i) for i in range(len(both))] == [alone.frame_text(i) for i in range(len(alone))]
    with pytest.raises(ValueError, match="row=5, but generate\\(\\) runs 2 rows"):
        _run(model, tokenizer, ["ROMEO:", "JULIET:"], UnmaskingRecorder(model.codec, tokenizer, row=5))


def test_token_streamers_still_take_one_row(reference):
    from transformers import TextStreamer

    model, tokenizer = reference
    with pytest.raises(ValueError, match="token streamers handle one sequence at a time"):
        _run(model, tokenizer, ["ROMEO:", "JULIET:"], TextStreamer(tokenizer))
    with pytest.raises(ValueError, match="nothing recorded yet"):
        UnmaskingRecorder(model.codec, tokenizer).to_html("never.html")


class _HostileTokenizer:
    """Every token's text tries to break out of the page."""

    def decode(self, ids, skip_special_tokens=False):
        return f"</script><script>alert({ids[0]})</script><img src=x onerror=alert(1)>&amp;"


def test_the_html_page_in_a_real_browser(reference, tmp_path):
    model, tokenizer = reference
    recorder = UnmaskingRecorder(model.codec, tokenizer)
    _run(model, tokenizer, ["ROMEO:"], recorder)
    page_file = recorder.to_html(tmp_path / "view.html")
    last = len(recorder) - 1
    with browser_page() as page:
        page.goto(page_file.as_uri())
        status = page.locator("#status")
        assert status.get_attribute("data-step") == str(last)  # opens on the final step
        assert page.locator("#canvas .masked").count() == page.locator("#canvas .partial").count() == 0
        assert page.locator("#canvas .cell").count() == len(recorder.cells(-1))
        page.locator("#slider").fill("0")
        assert status.get_attribute("data-step") == "0"
        masked = recorder.counts(0)["masked"]
        assert page.locator("#canvas .masked").count() == masked == 16
        middle = next(i for i in range(len(recorder)) if recorder.counts(i)["partial"])
        page.locator("#slider").fill(str(middle))
        partial = page.locator("#canvas .partial")
        assert partial.count() == recorder.counts(middle)["partial"]
        first_partial = next(c for c in recorder.cells(middle) if c.kind == "partial")
        assert partial.first.get_attribute("title").startswith(f"{first_partial.consistent} tokens consistent")
        page.locator("#slider").fill("0")
        page.locator("#play").click()
        page.wait_for_function(f"document.getElementById('status').dataset.step === '{last}'", timeout=20_000)
        page.screenshot(path=str(tmp_path / "view.png"))
    assert (tmp_path / "view.png").stat().st_size > 0

    # Data never becomes markup: hostile token texts stay text, in the file and in the browser.
    hostile = UnmaskingRecorder(model.codec, _HostileTokenizer())
    _run(model, tokenizer, ["ROMEO:"], hostile)
    page_file = hostile.to_html(tmp_path / "hostile.html", title="<b>title</b>")
    source = page_file.read_text(encoding="utf-8")
    assert "</script><script>alert" not in source and "<img src=x" not in source and "<b>title" not in source
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', source, re.S).group(1))
    assert data["frames"][-1]["cells"][0][1] == hostile.cells(-1)[0].label
    with browser_page() as page:
        page.goto(page_file.as_uri())
        page.wait_for_timeout(300)
        assert page.dialogs == [] and page.locator("img").count() == 0
        assert page.locator("#canvas .cell").first.text_content() == hostile.cells(-1)[0].label


def test_gif_frames_and_the_terminal_view(reference, tmp_path):
    from PIL import Image
    from rich.console import Console

    model, tokenizer = reference
    out_console = io.StringIO()
    streamer = RichUnmaskingStreamer(model.codec, tokenizer, console=Console(file=out_console, width=300))
    out = _run(model, tokenizer, ["ROMEO:"], streamer)
    final = streamer.renderable(-1).plain
    assert final.splitlines()[1] == streamer.frame_text(-1)  # the terminal shows the recorded text
    assert tokenizer.decode(out.sequences[0]).replace("\n", "↵") in final
    assert streamer.frame_text(-1) in out_console.getvalue().replace("\n", "")
    # Partial cells read as digits and a count, e.g. "[_·10|45]", in the terminal.
    middle = next(i for i in range(len(streamer)) if streamer.counts(i)["partial"])
    assert re.search(r"\[(\d+|_)·(\d+|_)\|\d+\]", streamer.renderable(middle).plain)

    path = streamer.to_gif(tmp_path / "view.gif", every=2)
    with Image.open(path) as gif:
        assert gif.n_frames == len(range(0, len(streamer), 2)) + (0 if (len(streamer) - 1) % 2 == 0 else 1)
        gif.seek(0)
        first = gif.convert("RGB")
        gif.seek(gif.n_frames - 1)
        last = gif.convert("RGB")
    pngs = streamer.to_pngs(tmp_path / "frames")
    assert len(pngs) == len(streamer) and all(Image.open(p).size == first.size for p in pngs)
    grey, yellow = (200, 200, 200), (255, 236, 150)
    assert grey in {c for _, c in first.getcolors(1 << 16)}  # masked boxes at the start
    assert {grey, yellow}.isdisjoint({c for _, c in last.getcolors(1 << 16)})  # none left at the end
