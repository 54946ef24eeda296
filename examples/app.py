"""A Gradio demo of sub-token unmasking: continue a prompt or fill ``[MASK]`` holes, watch the canvas while the model
unmasks it (partially revealed tokens in yellow with their known digits and how many tokens are still consistent),
then replay every step and download the whole history as one HTML file.

    pip install -e ".[demo]"
    python examples/app.py                                   # http://127.0.0.1:7860
    python examples/app.py --model_name_or_path outputs/smollm2-mdm --port 7861

The default model is the adapted SmolLM2 (``outputs/smollm2-mdm``, docs/guides/adaptation.md) when it has been
built, else the committed tiny reference checkpoint. As a Hugging Face Space: docs/guides/demo.md has the header.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime.tools.cli import add_demo_model_argument
from modeling_mdm_prime.tools.serving import TemplateError, infill_template
from modeling_mdm_prime.tools.unmasking_view import UnmaskingRecorder

REPO = Path(__file__).resolve().parents[1]
MODES = ["continue the prompt", "fill [MASK] holes"]
STRATEGIES = ["ancestral", "confidence", "threshold"]
MAX_SESSIONS = 32  # recordings kept for the replay slider (oldest dropped first)


class Demo:
    """The model, and the recordings of the last generations (the replay slider reads them)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.recordings: dict[str, UnmaskingRecorder] = {}
        self.pages = Path(tempfile.mkdtemp(prefix="mdm-prime-app-"))  # one HTML page per kept recording
        self.lock = threading.Lock()  # one generate() at a time: one model

    def canvas(self, mode: str, text: str, max_new_tokens: int) -> dict:
        if mode == MODES[1]:
            template = infill_template(self.tokenizer, text)
            return {"input_ids": torch.tensor([template.ids]), "infill_mask": torch.tensor([template.holes])}
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "max_new_tokens": int(max_new_tokens)}

    def run(self, mode, text, max_new_tokens, strategy, steps, temperature, seed, block_length):
        """A generator for Gradio: yields the live canvas every ~0.1 s, then the result and the replay controls."""
        try:
            inputs = self.canvas(mode, text or "", max_new_tokens)
        except TemplateError as error:
            raise gr.Error(str(error)) from error
        settings = {"strategy": strategy, "seed": int(seed), "return_dict_in_generate": True}
        if steps:
            settings["num_steps"] = int(steps)
        if block_length:
            settings["block_length"] = int(block_length)
        if temperature == 0:
            settings["do_sample"] = False
        else:
            settings["temperature"] = float(temperature)
        recorder = UnmaskingRecorder(self.model.codec, self.tokenizer)
        outcome: dict = {}

        def work():
            try:
                with self.lock:
                    outcome["out"] = self.model.generate(**inputs, streamer=recorder, **settings)
            except Exception as error:  # noqa: BLE001 - shown to the user below
                outcome["error"] = error

        worker = threading.Thread(target=work)
        worker.start()
        shown = 0
        idle = gr.update()
        while worker.is_alive():
            time.sleep(0.1)
            if len(recorder) > shown:
                shown = len(recorder)
                yield recorder.frame_html(shown - 1), idle, idle, idle, idle, idle
        worker.join()
        if "error" in outcome:
            raise gr.Error(str(outcome["error"]))
        out = outcome["out"]
        key = uuid.uuid4().hex
        self.recordings[key] = recorder
        while len(self.recordings) > MAX_SESSIONS:
            oldest = next(iter(self.recordings))
            del self.recordings[oldest]
            shutil.rmtree(self.pages / oldest, ignore_errors=True)
        (self.pages / key).mkdir()
        page = recorder.to_html(self.pages / key / "unmasking.html")
        answer = self.tokenizer.decode(out.sequences[0], skip_special_tokens=True)
        info = f"steps: {out.num_steps} · network calls: {out.nfe} · seed: {int(seed)}"
        replay = gr.update(minimum=0, maximum=len(recorder) - 1, value=len(recorder) - 1, step=1, interactive=True)
        yield recorder.frame_html(-1), answer, info, replay, key, str(page)

    def replay(self, index, key):
        recorder = self.recordings.get(key)
        if recorder is None:
            return gr.update()
        return recorder.frame_html(min(int(index), len(recorder) - 1))


def build_demo(model, tokenizer) -> gr.Blocks:
    demo_state = Demo(model, tokenizer)
    ell = model.config.num_sub_tokens
    with gr.Blocks(title="MDM-Prime: watch sub-token unmasking") as demo:
        gr.Markdown(
            f"## MDM-Prime: watch sub-token unmasking\nEvery token is {ell} sub-token(s); a yellow cell is a token "
            "with some digits known (shown as `digit·_`, with the number of tokens still consistent), the colour of a "
            "revealed token goes from blue (early) to red (late)."
        )
        with gr.Row():
            with gr.Column(scale=2):
                mode = gr.Radio(MODES, value=MODES[0], label="mode", elem_id="mode")
                text = gr.Textbox(label="prompt, or template with [MASK] / [MASK:n] holes", lines=3, elem_id="prompt")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                max_new_tokens = gr.Slider(1, 256, value=32, step=1, label="new tokens (continue)")
                strategy = gr.Dropdown(STRATEGIES, value="ancestral", label="strategy")
                steps = gr.Slider(0, 512, value=0, step=1, label="steps (0: one per token)")
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature (0: greedy)")
                seed = gr.Number(value=0, precision=0, label="seed")
                block_length = gr.Number(value=0, precision=0, label="block length (0: one block)")
        live = gr.HTML(label="canvas", elem_id="live")
        answer = gr.Textbox(label="result", elem_id="result", interactive=False)
        info = gr.Textbox(label="run", elem_id="info", interactive=False)
        history = gr.Slider(0, 1, value=0, step=1, label="replay: step", interactive=False, elem_id="history")
        download = gr.File(label="the whole history as one HTML file", elem_id="download")
        key = gr.State("")
        run.click(
            demo_state.run,
            inputs=[mode, text, max_new_tokens, strategy, steps, temperature, seed, block_length],
            outputs=[live, answer, info, history, key, download],
        )
        # .input: only the user's moves replay (the update after a run sets the slider without an event).
        history.input(demo_state.replay, inputs=[history, key], outputs=[live], show_progress="hidden")
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_model_argument(p, REPO)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    demo = build_demo(model, tokenizer)
    # System fonts: the default theme would ask Google Fonts for its typeface, which an offline machine cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=theme, footer_links=[])


if __name__ == "__main__":
    main()
