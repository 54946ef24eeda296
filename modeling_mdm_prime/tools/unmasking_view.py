"""Watch sub-token unmasking: a step streamer for ``generate(streamer=...)`` and three renderers of what it saw.

Partial masking is what this view is built around. In MDM-Prime a token of ℓ sub-tokens goes through states no
other diffusion LM has: some digits known, the others masked, so the token is already narrowed to the ids that
agree with the known digits. Every cell of the canvas is one of

==============  ======================================================================================================
``prompt``      a fixed position (prompt, template text, conditioning): shown as its text
``masked``      every digit masked
``partial``     some digits known: shown as the digits (``17·_``), the number of token ids still consistent with them,
                and (HTML tooltip, terminal) the first few of those tokens
``revealed``    every digit known: shown as the token's text, coloured by the step that completed it
==============  ======================================================================================================

    recorder = UnmaskingRecorder(model.codec, tokenizer)
    model.generate(**batch, max_new_tokens=64, streamer=recorder, seed=0)
    recorder.to_html("unmasking.html")      # one self-contained file: step slider and play button
    recorder.to_gif("unmasking.gif")        # PIL frames
    print(recorder.frame_text(-1))          # plain text of the last step

``RichUnmaskingStreamer`` is the same recorder drawing a live ``rich`` view in the terminal while ``generate`` runs.

The recorder's states are exactly what ``output_history`` returns (``recorder.sub_ids[1:]`` equals
``out.history``), preceded by the initial canvas. Nothing here is shipped with a checkpoint.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..generation_mdm_prime import MDMPrimeSamplerState

PROMPT, MASKED, PARTIAL, REVEALED = "prompt", "masked", "partial", "revealed"
NUM_CANDIDATES = 5


@dataclass(frozen=True)
class Cell:
    """One position of one recorded step.

    Args:
        kind: ``prompt``, ``masked``, ``partial`` or ``revealed``.
        digits: the ℓ digits, ``None`` where masked.
        text: the token's text (prompt and revealed cells), else ``None``.
        consistent: how many token ids agree with the known digits (1 once revealed, C when fully masked).
        candidates: the texts of the first few consistent tokens (partial cells).
        revealed_at: the step that completed the token (``0`` for prompt cells, ``None`` while not complete).
    """

    kind: str
    digits: tuple[int | None, ...]
    text: str | None
    consistent: int
    candidates: tuple[str, ...]
    revealed_at: int | None

    @property
    def label(self) -> str:
        """The cell's text in the view: the token, or its digits with ``_`` for masked ones."""
        if self.text is not None:
            return visible(self.text)
        return "·".join("_" if d is None else str(d) for d in self.digits)


def visible(text: str) -> str:
    """Whitespace made visible in a one-line view: newlines as ↵, tabs as →."""
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "→")


class UnmaskingRecorder:
    """A step streamer: ``generate(streamer=UnmaskingRecorder(model.codec, tokenizer))`` records the canvas
    after every step, for any batch size; the renderers show one row of it.

    Args:
        codec: the model's :class:`SubTokenCodec` (``model.codec``).
        tokenizer: turns token ids into text (``decode([id])``); without one, ids are shown.
        row: the row of the batch that the renderers show.
    """

    def __init__(self, codec, tokenizer=None, row: int = 0):
        # Duck-typed: a model loaded with trust_remote_code has its own copy of the SubTokenCodec class.
        if not all(hasattr(codec, name) for name in ("mask_id", "vocab_size", "num_sub_tokens", "consistency_mask")):
            raise TypeError(f"codec must be the model's SubTokenCodec (model.codec), got {type(codec).__name__}.")
        if row < 0:
            raise ValueError(f"row must be >= 0, got {row}.")
        self.codec, self.tokenizer, self.row = codec, tokenizer, int(row)
        self.states: list[MDMPrimeSamplerState] = []
        self.ended = False
        # Per state, (L,): the index of the state since which each position of the shown row has been complete
        # (-1: not complete). Kept per state because a corrector may re-mask a revealed token.
        self._complete_since: list[torch.Tensor] = []
        self._texts: dict[int, str] = {}
        self._consistent: dict[tuple[int, ...], tuple[int, tuple[str, ...]]] = {}

    # The step-streamer protocol of MDMPrimeGenerationMixin.generate ------------------------------------------

    def put_step(self, state: MDMPrimeSamplerState) -> None:
        """Record one state (the tensors are copied to the CPU: the loop may reuse its own)."""
        if self.ended:
            raise RuntimeError("this recorder already saw a whole generation; make a new one for the next call.")
        if self.row >= state.sub_ids.shape[0]:
            raise ValueError(f"row={self.row}, but generate() runs {state.sub_ids.shape[0]} rows.")
        self.states.append(
            MDMPrimeSamplerState(
                step=state.step,
                t=state.t.detach().cpu().clone(),
                s=state.s.detach().cpu().clone(),
                sub_ids=state.sub_ids.detach().cpu().clone(),
                nfe=state.nfe,
                fixed=None if state.fixed is None else state.fixed.detach().cpu().clone(),
                attention_mask=None if state.attention_mask is None else state.attention_mask.detach().cpu().clone(),
                final_fill=state.final_fill,
            )
        )
        complete = (self.states[-1].sub_ids[self.row] != self.codec.mask_id).all(-1)
        before = self._complete_since[-1] if self._complete_since else torch.full_like(complete, -1, dtype=torch.long)
        index = len(self.states) - 1
        since = torch.where(before >= 0, before, torch.full_like(before, index))
        self._complete_since.append(torch.where(complete, since, torch.full_like(before, -1)))

    def end(self) -> None:
        self.ended = True

    # What was recorded ------------------------------------------------------------------------------------------

    @property
    def sub_ids(self) -> list[torch.Tensor]:
        """Every recorded ``(B, L, ℓ)`` canvas: the initial one, then one per step (= ``output_history``)."""
        return [state.sub_ids for state in self.states]

    def __len__(self) -> int:
        return len(self.states)

    def _require_states(self) -> None:
        if not self.states:
            raise ValueError("nothing recorded yet: pass this recorder to generate(streamer=...) first.")

    def token_text(self, token_id: int) -> str:
        if token_id not in self._texts:
            if self.tokenizer is None:
                self._texts[token_id] = f"<{token_id}>"
            else:
                self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._texts[token_id]

    def _consistent_set(self, digits: tuple[int, ...]) -> tuple[int, tuple[str, ...]]:
        """(number of token ids consistent with ``digits`` (mask id where unknown), first few of their texts)."""
        if digits not in self._consistent:
            allowed = self.codec.consistency_mask(torch.tensor([digits]), check=False)[0]
            ids = allowed.nonzero().flatten()
            texts = tuple(self.token_text(int(i)) for i in ids[:NUM_CANDIDATES])
            self._consistent[digits] = (int(ids.numel()), texts)
        return self._consistent[digits]

    def cells(self, index: int) -> list[Cell]:
        """The row's real positions after recorded state ``index`` (negative counts from the end)."""
        self._require_states()
        state = self.states[index]
        number = range(len(self.states))[index]
        row = self.row
        real = state.attention_mask[row] if state.attention_mask is not None else None
        positions = real.nonzero().flatten().tolist() if real is not None else range(state.sub_ids.shape[1])
        since = self._complete_since[number].tolist()
        mask_id = self.codec.mask_id
        # One pass over the row, as Python lists: token ids x = Σ_j y^j b^(ℓ-1-j) where every digit is known.
        sub_ids = state.sub_ids[row]
        tokens = (sub_ids.clamp(max=mask_id - 1) * torch.tensor(self.codec.place_values)).sum(-1).tolist()
        fixed = state.fixed[row].all(-1).tolist() if state.fixed is not None else [False] * len(tokens)
        digit_rows = sub_ids.tolist()
        out = []
        for position in positions:
            digits = tuple(digit_rows[position])
            known = tuple(None if d == mask_id else d for d in digits)
            if all(d is not None for d in known):
                kind = PROMPT if fixed[position] else REVEALED
                when = 0 if fixed[position] else since[position]
                out.append(Cell(kind, known, self.token_text(tokens[position]), 1, (), when))
            elif all(d is None for d in known):
                out.append(Cell(MASKED, known, None, self.codec.vocab_size, (), None))
            else:
                count, candidates = self._consistent_set(digits)
                out.append(Cell(PARTIAL, known, None, count, candidates, None))
        return out

    def frame_text(self, index: int) -> str:
        """One recorded state as plain text: tokens, ``[17·_ |222]`` for partial cells, ``[_·_]`` for masked."""
        parts = []
        for cell in self.cells(index):
            if cell.kind in (PROMPT, REVEALED):
                parts.append(cell.label)
            elif cell.kind == PARTIAL:
                parts.append(f"[{cell.label} |{cell.consistent}]")
            else:
                parts.append(f"[{cell.label}]")
        return "".join(parts)

    def counts(self, index: int) -> dict[str, int]:
        """How many cells of each kind after state ``index``."""
        found = {PROMPT: 0, MASKED: 0, PARTIAL: 0, REVEALED: 0}
        for cell in self.cells(index):
            found[cell.kind] += 1
        return found

    # Renderers ------------------------------------------------------------------------------------------------

    def frame_html(self, index: int) -> str:
        """One recorded state as an HTML fragment with inline styles (for a web page or a Gradio ``gr.HTML``):
        every text is escaped, so a token's text is shown, never interpreted."""
        self._require_states()
        state = self.states[index]
        last = max(len(self.states) - 1, 1)
        spans = []
        for cell in self.cells(index):
            label = html.escape(cell.label)
            if cell.kind == PROMPT:
                style, title = "background:#eee", "prompt"
            elif cell.kind == MASKED:
                style, title = "background:#ccc;color:#777", "masked"
            elif cell.kind == PARTIAL:
                style = "background:#ffec96;border:1px dashed #c89600;color:#5a4600"
                title = f"{cell.consistent} tokens consistent"
                label += f"<sub>{cell.consistent}</sub>"
            else:
                r, g, b = _step_rgb(cell.revealed_at, last)
                style, title = (
                    f"color:rgb({r},{g},{b});border-bottom:2px solid rgb({r},{g},{b})",
                    (f"revealed at step {cell.revealed_at}"),
                )
            spans.append(
                f'<span class="mdm-{cell.kind}" title="{html.escape(title)}" style="{style};padding:1px 2px;'
                f'border-radius:3px;white-space:pre">{label}</span>'
            )
        counts = self.counts(index)
        header = (
            f'<div class="mdm-status" data-step="{state.step}">step {state.step} · NFE {state.nfe} · masked '
            f"{counts[MASKED]} · partial {counts[PARTIAL]} · revealed {counts[REVEALED]}</div>"
        )
        body = "".join(spans)
        return f'{header}<div style="font-family:monospace;display:flex;flex-wrap:wrap;gap:4px 2px">{body}</div>'

    def to_html(self, path: str | os.PathLike, title: str = "MDM-Prime unmasking") -> Path:
        """Write one self-contained HTML file (no network): the canvas at every step, a slider and a play button.
        The recorded text enters the page only as JSON data read by the page's script through ``textContent``
        (never as markup), so no token can inject HTML or script."""
        self._require_states()
        frames = []
        for index, state in enumerate(self.states):
            cells = [[c.kind, c.label, c.revealed_at, c.consistent, list(c.candidates)] for c in self.cells(index)]
            frames.append({"step": state.step, "nfe": state.nfe, "final_fill": state.final_fill, "cells": cells})
        data = {
            "title": title,
            "num_sub_tokens": self.codec.num_sub_tokens,
            "base": self.codec.base,
            "vocab_size": self.codec.vocab_size,
            "last_step": len(self.states) - 1,
            "frames": frames,
        }
        page = _HTML_PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json(data))
        path = Path(path)
        path.write_text(page, encoding="utf-8")
        return path

    def to_frames(self, width: int = 720, font_size: int = 16, every: int = 1) -> list:
        """PIL images of the recorded states (every ``every``-th, and always the last)."""
        from PIL import Image, ImageDraw, ImageFont

        self._require_states()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        font = ImageFont.load_default(size=font_size)
        indices = list(range(0, len(self.states), every))
        if indices[-1] != len(self.states) - 1:
            indices.append(len(self.states) - 1)
        last = max(len(self.states) - 1, 1)
        layouts = [self._layout(self.cells(i), font, width, font_size) for i in indices]
        height = max(bottom for _, bottom in layouts) + font_size + 16
        images = []
        for i, (boxes, _) in zip(indices, layouts):
            image = Image.new("RGB", (width, height), "white")
            draw = ImageDraw.Draw(image)
            state = self.states[i]
            draw.text((8, 4), f"step {state.step}  ·  NFE {state.nfe}", fill=(60, 60, 60), font=font)
            for (x0, y0, x1, y1), cell in boxes:
                fill, ink, outline = _pil_colors(cell, last)
                draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline)
                draw.text((x0 + 2, y0 + 1), _pil_label(cell), fill=ink, font=font)
            images.append(image)
        return images

    def to_pngs(self, folder: str | os.PathLike, **frame_kwargs) -> list[Path]:
        """Write :meth:`to_frames` as ``folder/frame_0000.png``, ... (in order; with ``every`` > 1 a frame is not
        a step: the image's header names its step)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, image in enumerate(self.to_frames(**frame_kwargs)):
            paths.append(folder / f"frame_{number:04d}.png")
            image.save(paths[-1])
        return paths

    def to_gif(self, path: str | os.PathLike, duration_ms: int = 120, **frame_kwargs) -> Path:
        """Write an animated GIF of :meth:`to_frames` (the last frame held for a second)."""
        frames = self.to_frames(**frame_kwargs)
        durations = [duration_ms] * (len(frames) - 1) + [1000]
        path = Path(path)
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)
        return path

    @staticmethod
    def _layout(cells: list[Cell], font, width: int, font_size: int):
        """Boxes of the cells, wrapped into lines of ``width`` pixels, and the bottom of the last line."""
        x, y, pad = 8, font_size + 12, 3
        line = font_size + 8
        boxes = []
        for cell in cells:
            w = int(font.getlength(_pil_label(cell))) + 2 * pad
            if x + w > width - 8 and x > 8:
                x, y = 8, y + line
            boxes.append(((x, y, x + w, y + line - 3), cell))
            x += w + 2
        return boxes, y + line


class RichUnmaskingStreamer(UnmaskingRecorder):
    """The recorder, drawing a live view in the terminal while ``generate`` runs (``rich``).

    Args:
        console: a ``rich.console.Console`` (default: a new one on standard output).
        refresh_per_second: how often the live view redraws.
    """

    def __init__(self, codec, tokenizer=None, row: int = 0, console=None, refresh_per_second=8):
        super().__init__(codec, tokenizer, row)
        from rich.console import Console
        from rich.live import Live

        self.console = console if console is not None else Console()
        self._live = Live(console=self.console, refresh_per_second=refresh_per_second, transient=False)

    def put_step(self, state: MDMPrimeSamplerState) -> None:
        super().put_step(state)
        if len(self.states) == 1:
            self._live.start()
        self._live.update(self.renderable(-1))

    def end(self) -> None:
        super().end()
        if self.states:
            self._live.update(self.renderable(-1))
            self._live.stop()

    def renderable(self, index: int):
        """A ``rich.text.Text`` of one recorded state: prompt plain, partial cells as digits + consistent count,
        revealed tokens coloured from blue (early) to red (late)."""
        from rich.text import Text

        state = self.states[index]
        last = max(len(self.states) - 1, 1)
        text = Text()
        text.append(f"step {state.step} · NFE {state.nfe}\n", style="dim")
        for cell in self.cells(index):
            if cell.kind == PROMPT:
                text.append(cell.label, style="bold")
            elif cell.kind == REVEALED:
                r, g, b = _step_rgb(cell.revealed_at, last)
                text.append(cell.label, style=f"rgb({r},{g},{b})")
            elif cell.kind == PARTIAL:
                text.append(f"[{cell.label}|{cell.consistent}]", style="black on yellow")
            else:
                text.append("[" + cell.label + "]", style="dim")
        return text


def _step_rgb(step: int | None, last: int) -> tuple[int, int, int]:
    """Blue (early) to red (late): the colour of the step that completed a token."""
    f = 0.0 if step is None else min(max(step / last, 0.0), 1.0)
    return int(40 + 200 * f), 80, int(220 - 180 * f)


def _pil_label(cell: Cell) -> str:
    if cell.kind == PARTIAL:
        return f"{cell.label} |{cell.consistent}"
    if cell.kind == MASKED:
        return cell.label
    # The default font has no glyphs for most non-Latin text: keep the box, show what it can.
    return cell.label.encode("latin-1", "replace").decode("latin-1")


def _pil_colors(cell: Cell, last: int):
    if cell.kind == PROMPT:
        return (235, 235, 235), (0, 0, 0), None
    if cell.kind == MASKED:
        return (200, 200, 200), (120, 120, 120), None
    if cell.kind == PARTIAL:
        return (255, 236, 150), (90, 70, 0), (200, 150, 0)
    r, g, b = _step_rgb(cell.revealed_at, last)
    return (255, 255, 255), (r, g, b), (r, g, b)


def _script_json(data) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` survive, so the
    data can never close the script element or open another."""
    text = json.dumps(data, ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text


# The page: CSS and a small script; the data arrive as JSON and become DOM text nodes only.
_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#canvas { font-family: ui-monospace, monospace; display: flex; flex-wrap: wrap; gap: 4px 2px; max-width: 60em; }
.cell { padding: 1px 2px; border-radius: 3px; white-space: pre; }
.prompt { background: #eee; }
.masked { background: #ccc; color: #777; }
.partial { background: #ffec96; border: 1px dashed #c89600; color: #5a4600; }
.partial sub { font-size: 70%; color: #8a6d00; }
.revealed { border-bottom: 2px solid; }
#controls { margin: 1em 0; display: flex; gap: 1em; align-items: center; }
#slider { width: 30em; }
#legend span { margin-right: 1em; }
</style>
</head>
<body>
<h2 id="title"></h2>
<div id="controls">
  <button id="play" type="button">play</button>
  <input id="slider" type="range" min="0" value="0" step="1">
  <span id="status"></span>
</div>
<div id="legend">
  <span class="cell prompt">prompt</span><span class="cell masked">_·_ masked</span>
  <span class="cell partial">17·_ <sub>n</sub> partial: known digits, n tokens still consistent</span>
  <span class="cell revealed" style="border-color:#2850dc;color:#2850dc">early</span>
  <span class="cell revealed" style="border-color:#e85028;color:#e85028">late</span>
</div>
<div id="canvas"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const slider = document.getElementById("slider");
const canvas = document.getElementById("canvas");
const status = document.getElementById("status");
const play = document.getElementById("play");
document.getElementById("title").textContent = data.title;
slider.max = String(data.last_step);
function color(step) {
  const f = data.last_step > 0 ? Math.min(Math.max(step / data.last_step, 0), 1) : 0;
  return "rgb(" + Math.round(40 + 200 * f) + ",80," + Math.round(220 - 180 * f) + ")";
}
function show(index) {
  const frame = data.frames[index];
  canvas.replaceChildren();
  for (const [kind, label, revealedAt, consistent, candidates] of frame.cells) {
    const span = document.createElement("span");
    span.className = "cell " + kind;
    span.textContent = label;
    if (kind === "revealed") {
      span.style.color = color(revealedAt);
      span.style.borderColor = color(revealedAt);
      span.title = "revealed at step " + revealedAt;
    } else if (kind === "partial") {
      const sub = document.createElement("sub");
      sub.textContent = String(consistent);
      span.appendChild(sub);
      span.title = consistent + " tokens consistent, e.g. " + candidates.map((c) => JSON.stringify(c)).join(", ");
    }
    canvas.appendChild(span);
  }
  const counts = {prompt: 0, masked: 0, partial: 0, revealed: 0};
  for (const cell of frame.cells) counts[cell[0]] += 1;
  const fill = frame.final_fill ? " (fill)" : "";
  status.textContent = "step " + frame.step + " / " + data.frames[data.last_step].step + fill
    + " · NFE " + frame.nfe + " · masked " + counts.masked + " · partial " + counts.partial
    + " · revealed " + counts.revealed;
  status.dataset.step = String(frame.step);
  slider.value = String(index);
}
let timer = null;
function stop() { clearInterval(timer); timer = null; play.textContent = "play"; }
play.addEventListener("click", () => {
  if (timer !== null) { stop(); return; }
  if (Number(slider.value) >= data.last_step) show(0);
  play.textContent = "pause";
  timer = setInterval(() => {
    const next = Number(slider.value) + 1;
    if (next > data.last_step) { stop(); return; }
    show(next);
  }, 150);
});
slider.addEventListener("input", () => { stop(); show(Number(slider.value)); });
show(data.last_step);
</script>
</body>
</html>
"""

__all__ = ["Cell", "RichUnmaskingStreamer", "UnmaskingRecorder", "visible"]
