"""Serving a diffusion LM: templates with holes, JSON-schema templates with typed holes, and a batching engine that
answers concurrent requests with one ``generate()`` call per group and tick. ``examples/serve.py`` puts an
OpenAI-compatible HTTP API in front of it; ``examples/app.py`` uses the templates. Not shipped as remote code.

Every request is a *template*: token ids, the positions to fill (holes), and optionally each hole's allowed
vocabulary. A completion is its prompt followed by ``max_tokens`` holes (the same canvas, and the same random
streams, as ``generate(prompt, max_new_tokens=max_tokens)``); an infill is text with ``[MASK]`` / ``[MASK:n]``
holes; OpenAI's ``suffix`` is the text after the holes; a structured request is a JSON template whose values are
holes restricted to tokens that keep it valid JSON of the schema's types.

Batched = alone. Requests with the same settings are stacked (left padding) into one call. Each row's noise is
keyed by the call's seed, its own template and how many earlier rows of the call have the same template, so a row
with a seed gets exactly what ``generate`` gives it alone, whoever else is served, as long as no other row of the
call has the same template: the engine puts such duplicates into separate calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

HOLE = re.compile(r"\[MASK(?::(\d+))?\]")
MAX_HOLE = 1024
FREE, STRING, INTEGER_FIRST, INTEGER_REST, BOOLEAN = range(5)
SUPPORTED_TYPES = ("string", "integer", "boolean")
INTEGER_TOKENS = 2


def default_model_path(repo: str | Path) -> Path:
    """The demos' model: the adapted SmolLM2 (``outputs/smollm2-mdm``, docs/guides/adaptation.md) when it has
    been built, else the committed tiny reference checkpoint."""
    adapted = Path(repo) / "outputs" / "smollm2-mdm"
    return adapted if (adapted / "config.json").is_file() else Path(repo) / "checkpoints" / "mdm-prime-shakespeare-tiny"


class TemplateError(ValueError):
    """A template or schema the server cannot fill; the message says what was expected."""


@dataclass
class Template:
    """One row to fill.

    Args:
        ids: token ids; holes hold any id (the model replaces them).
        holes: per position, True where the model fills it.
        answer: the positions whose text is the answer (the holes of a completion; the whole JSON of a structured
            request).
        set_ids: per position, the index of its allowed vocabulary (``FREE`` = any token).
    """

    ids: list[int]
    holes: list[bool]
    answer: list[int]
    set_ids: list[int] | None = None

    def __post_init__(self):
        if not any(self.holes):
            raise TemplateError("the template has no hole to fill: add max_tokens > 0 or a [MASK] to the text.")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _filler(tokenizer) -> int:
    """The id that stands in a hole or in padding before generation (any valid id would do)."""
    return tokenizer.pad_token_id or 0


def completion_template(tokenizer, prompt_ids: list[int], max_tokens: int, suffix: str | None = None) -> Template:
    """``prompt`` then ``max_tokens`` holes (then ``suffix``, OpenAI's infill field); the answer is the holes."""
    suffix_ids = _encode(tokenizer, suffix) if suffix else []
    ids = list(prompt_ids) + [_filler(tokenizer)] * max_tokens + suffix_ids
    holes = [False] * len(prompt_ids) + [True] * max_tokens + [False] * len(suffix_ids)
    return Template(ids, holes, list(range(len(prompt_ids), len(prompt_ids) + max_tokens)))


def infill_template(tokenizer, text: str) -> Template:
    """Text with holes: ``[MASK]`` is one token to fill, ``[MASK:n]`` is n tokens. The answer is the whole filled
    text."""
    ids: list[int] = []
    holes: list[bool] = []
    start, found = 0, 0
    for match in HOLE.finditer(text):
        count = int(match.group(1) or 1)
        if not 1 <= count <= MAX_HOLE:
            raise TemplateError(f"[MASK:{count}] in the infill template: a hole has 1 to {MAX_HOLE} tokens.")
        piece = _encode(tokenizer, text[start : match.start()])
        ids += piece + [_filler(tokenizer)] * count
        holes += [False] * len(piece) + [True] * count
        start, found = match.end(), found + 1
    if not found:
        raise TemplateError("the infill template has no hole: write [MASK] (one token) or [MASK:n] (n tokens).")
    tail = _encode(tokenizer, text[start:])
    ids, holes = ids + tail, holes + [False] * len(tail)
    return Template(ids, holes, list(range(len(ids))))


class TokenClasses:
    """The allowed vocabularies of typed holes, from each token's text as it reads after another token (so a
    SentencePiece token's leading space counts): ``token_sets`` ``(5, C)`` bool, rows FREE, STRING (no ``"``,
    backslash or control character), INTEGER_FIRST (digits, first not 0), INTEGER_REST (digits), BOOLEAN
    (``true`` / ``false``). Special tokens are in no typed set."""

    def __init__(self, tokenizer, vocab_size: int):
        anchor = _encode(tokenizer, "a")[:1] or [0]
        base = tokenizer.decode(anchor)
        # A model's vocabulary may be padded past the tokenizer's: those ids decode to nothing and join no set.
        texts = tokenizer.batch_decode([anchor + [i] for i in range(min(vocab_size, len(tokenizer)))])
        texts += [""] * (vocab_size - len(texts))
        texts = [t[len(base) :] if t.startswith(base) else t for t in texts]
        special = set(tokenizer.all_special_ids)
        rows: list[list[bool]] = [[True] * vocab_size] + [[False] * vocab_size for _ in range(4)]
        for i, t in enumerate(texts):
            if i in special or not t:
                continue
            digits = t.isascii() and t.isdigit()
            rows[STRING][i] = not any(c in '"\\' or ord(c) < 0x20 or c == "\x7f" for c in t)
            rows[INTEGER_REST][i] = digits
            rows[INTEGER_FIRST][i] = digits and t[0] != "0"
            rows[BOOLEAN][i] = t in ("true", "false")
        self.token_sets = torch.tensor(rows, dtype=torch.bool)

    def check(self, kind: int, name: str) -> None:
        if not bool(self.token_sets[kind].any()):
            raise TemplateError(f"this tokenizer has no single token for {name} values; use a string property.")


def json_schema_template(
    tokenizer, classes: TokenClasses, schema: dict, tokens_per_value: int = 6, prefix_ids: list[int] = ()
) -> Template:
    """A JSON object template for a flat object schema: fixed keys and punctuation, each value a hole whose
    tokens are restricted so that any filling parses as JSON with the schema's types.

    Supported: ``{"type": "object", "properties": {name: {"type": "string" | "integer" | "boolean"}}}`` with every
    property filled in order. A string value is exactly ``tokens_per_value`` tokens (no quote, backslash or
    control character); an integer is ``INTEGER_TOKENS`` digit tokens (no leading zero); a boolean is one token.
    Keywords that would constrain values further (``minimum``, ``maxLength``, ``pattern``, ``enum``, nested
    objects, arrays) are refused rather than ignored.
    """
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise TemplateError('response_format needs a JSON schema {"type": "object", "properties": {...}}.')
    allowed_keys = {"type", "properties", "required", "additionalProperties", "title", "description", "$schema"}
    if extra := sorted(set(schema) - allowed_keys):
        raise TemplateError(f"schema keywords not supported by infilling: {extra}.")
    if not schema["properties"]:
        raise TemplateError("the schema has no properties to fill.")
    if not 1 <= tokens_per_value <= 64:
        raise TemplateError(f"tokens_per_value must be in [1, 64], got {tokens_per_value}.")
    ids, holes, set_ids = list(prefix_ids), [False] * len(prefix_ids), [FREE] * len(prefix_ids)
    start = len(ids)

    def text(piece: str) -> None:
        new = _encode(tokenizer, piece)
        ids.extend(new)
        holes.extend([False] * len(new))
        set_ids.extend([FREE] * len(new))

    def hole(kinds: list[int]) -> None:
        ids.extend([_filler(tokenizer)] * len(kinds))
        holes.extend([True] * len(kinds))
        set_ids.extend(kinds)

    for n, (name, prop) in enumerate(schema["properties"].items()):
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind not in SUPPORTED_TYPES:
            raise TemplateError(
                f"property {name!r}: type {kind!r} is not supported; expected one of {SUPPORTED_TYPES}."
            )
        if extra := sorted(set(prop) - {"type", "title", "description"}):
            raise TemplateError(f"property {name!r}: keywords not supported by infilling: {extra}.")
        text(("{" if n == 0 else ", ") + json.dumps(name) + ": ")
        if kind == "string":
            classes.check(STRING, "string")
            text('"')
            hole([STRING] * tokens_per_value)
            text('"')
        elif kind == "integer":
            classes.check(INTEGER_FIRST, "integer")
            hole([INTEGER_FIRST] + [INTEGER_REST] * (INTEGER_TOKENS - 1))
        else:
            classes.check(BOOLEAN, "boolean")
            hole([BOOLEAN])
    text("}")
    return Template(ids, holes, list(range(start, len(ids))), set_ids)


@dataclass(frozen=True)
class Settings:
    """The generation settings a group of requests shares (hashable: the batching key)."""

    num_steps: int | None = None
    strategy: str | None = None
    block_length: int | None = None
    threshold: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    constrained: bool = False

    def generate_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.temperature == 0:
            out["do_sample"] = False
        else:
            out.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            if self.top_k is not None:
                out["top_k"] = self.top_k
        for name in ("num_steps", "strategy", "block_length", "threshold"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class RowResult:
    """One filled template: ``ids`` the answer's token ids (cut before a generated EOS), its text, ``finished``
    True if the model ended it with EOS; ``nfe`` the network calls that scored the row, ``num_steps`` the call's
    denoising steps, ``seed`` the call's seed."""

    ids: list[int]
    text: str
    finished: bool
    nfe: int
    num_steps: int
    seed: int


@dataclass
class Job:
    """One request: its templates (rows), settings, and where results and stream events go."""

    templates: list[Template]
    settings: Settings
    future: asyncio.Future
    events: asyncio.Queue | None = None  # stream: ("delta", row, text, step_info), or ("error", None, message, None)
    step_events: bool = False  # also an event for every denoising step, with its counts
    loop: asyncio.AbstractEventLoop | None = None


@dataclass
class _Row:
    job: Job
    index: int  # row of its job
    template: Template


class _StreamRows:
    """A step streamer over one ``generate`` call: after each step, each streaming row's answer grows by the
    tokens that are final, i.e. decided with every answer position before them decided (block decoding
    finalises a block at a time), cut after the first EOS."""

    def __init__(self, rows: list[_Row], offsets: list[int], codec, tokenizer, eos: set[int]):
        self.rows, self.offsets, self.codec, self.tokenizer, self.eos = rows, offsets, codec, tokenizer, eos
        self.done = [0] * len(rows)  # answer positions already final
        self.sent = [""] * len(rows)
        self.stopped = [False] * len(rows)

    def put_step(self, state) -> None:
        y = state.sub_ids
        for r, row in enumerate(self.rows):
            if row.job.events is None:
                continue
            positions = [self.offsets[r] + p for p in row.template.answer]
            in_hole = [row.template.holes[p] for p in row.template.answer]
            digits = y[r, positions]
            decided = (digits != self.codec.mask_id).all(-1).tolist()
            end = self.done[r]
            while end < len(positions) and decided[end] and not self.stopped[r]:
                end += 1
            step_info = None
            if row.job.step_events and state.step > 0:
                masked = digits == self.codec.mask_id
                step_info = {
                    "step": state.step,
                    "nfe": state.nfe,
                    "masked_tokens": int(masked.all(-1).sum()),
                    "partial_tokens": int((masked.any(-1) & ~masked.all(-1)).sum()),
                }
            delta = ""
            if end > self.done[r]:
                tokens = self.codec.decode(digits[:end]).tolist()
                hits = [i for i, t in enumerate(tokens) if t in self.eos and in_hole[i]]  # as in the results
                if hits:
                    tokens, self.stopped[r] = tokens[: hits[0]], True
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if not self.stopped[r] and text.endswith("\ufffd"):
                    text = text[:-1]  # an incomplete UTF-8 sequence: wait for its next bytes
                if text.startswith(self.sent[r]):
                    delta = text[len(self.sent[r]) :]
                    self.sent[r] = text
                self.done[r] = end
            if delta or step_info:
                row.job.loop.call_soon_threadsafe(row.job.events.put_nowait, ("delta", row.index, delta, step_info))

    def end(self) -> None:
        pass


class BatchingEngine:
    """Collects requests for ``tick_s`` seconds, then runs one ``generate()`` per group of equal settings (at most
    ``max_batch_size`` rows; no two rows of one call with the same template), in a worker thread so the server
    keeps accepting requests. One call runs at a time: the model is one.

    Args:
        model: an MDM-Prime model. tokenizer: its tokenizer.
        max_batch_size: rows per ``generate`` call. tick_s: how long the first request of a tick waits for others.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 16, tick_s: float = 0.02):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.tick_s = max_batch_size, tick_s
        self.queue: asyncio.Queue[Job] | None = None
        self.calls = 0  # generate() calls made
        self.rows_served = 0
        self._lock = threading.Lock()
        self._classes: TokenClasses | None = None
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos = {int(e) for e in eos if e is not None}

    @property
    def token_classes(self) -> TokenClasses:
        if self._classes is None:
            self._classes = TokenClasses(self.tokenizer, self.model.config.vocab_size)
        return self._classes

    async def submit(self, job: Job) -> list[RowResult]:
        if self.queue is None:
            raise RuntimeError("the engine is not running: await engine.run() in the server's event loop first.")
        job.loop = asyncio.get_running_loop()
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        """The batching loop (a task of the server's event loop)."""
        self.queue = asyncio.Queue()
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.tick_s)
            while not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            jobs = [job for job in jobs if not job.future.done()]  # timed out or cancelled while queued
            for batch in self.plan(jobs):
                try:
                    results = await asyncio.to_thread(self._generate, batch)
                except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
                    logger.exception("generate() failed")
                    for job in {id(r.job): r.job for r in batch}.values():
                        if not job.future.done():
                            job.future.set_exception(error)
                        if job.events is not None:
                            job.events.put_nowait(("error", None, str(error), None))
                    continue
                self._deliver(batch, results)

    def plan(self, jobs: list[Job]) -> list[list[_Row]]:
        """Group jobs by settings, in arrival order, whole jobs per call (a job's duplicate rows are its
        ``num_return_sequences``-like copies and must share a call; a job larger than ``max_batch_size`` runs
        alone). A job whose template is already in the call from another job goes to another call: its random
        stream would otherwise depend on that job."""
        groups: dict[Settings, list[tuple[list[_Row], set]]] = {}
        for job in jobs:
            keys = {(tuple(t.ids), tuple(t.holes)) for t in job.templates}
            calls = groups.setdefault(job.settings, [])
            call = next(
                (c for c in calls if len(c[0]) + len(job.templates) <= self.max_batch_size and keys.isdisjoint(c[1])),
                None,
            )
            if call is None:
                call = ([], set())
                calls.append(call)
            call[0].extend(_Row(job, i, t) for i, t in enumerate(job.templates))
            call[1].update(keys)
        return [rows for calls in groups.values() for rows, _ in calls]

    def _generate(self, rows: list[_Row]) -> list[RowResult]:
        """One ``generate`` call: left-pad the templates, fill them, cut each answer at its first EOS."""
        with self._lock:
            length = max(len(r.template.ids) for r in rows)
            offsets = [length - len(r.template.ids) for r in rows]
            ids = torch.full((len(rows), length), _filler(self.tokenizer), dtype=torch.long)
            real = torch.zeros(len(rows), length, dtype=torch.bool)
            holes = torch.zeros(len(rows), length, dtype=torch.bool)
            set_ids = torch.zeros(len(rows), length, dtype=torch.long)
            for i, (row, off) in enumerate(zip(rows, offsets)):
                t = row.template
                ids[i, off:] = torch.tensor(t.ids)
                real[i, off:] = True
                holes[i, off:] = torch.tensor(t.holes)
                if t.set_ids is not None:
                    set_ids[i, off:] = torch.tensor(t.set_ids)
            settings = rows[0].job.settings
            kwargs = settings.generate_kwargs()
            if settings.constrained:
                kwargs.update(token_sets=self.token_classes.token_sets, token_set_ids=set_ids)
            streaming = any(r.job.events is not None for r in rows)
            streamer = _StreamRows(rows, offsets, self.model.codec, self.tokenizer, self.eos) if streaming else None
            seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            device = self.model.device
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=real.long().to(device),
                infill_mask=holes.to(device),
                seed=seed,
                streamer=streamer,
                return_dict_in_generate=True,
                **kwargs,
            )
            self.calls += 1
            self.rows_served += len(rows)
        results = []
        for i, (row, off) in enumerate(zip(rows, offsets)):
            answer = out.sequences[i, [off + p for p in row.template.answer]].tolist()
            hits = [k for k, t in enumerate(answer) if t in self.eos and row.template.holes[row.template.answer[k]]]
            finished = bool(hits)
            if hits:
                answer = answer[: hits[0]]
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            results.append(RowResult(answer, text, finished, int(out.row_nfe[i]), out.num_steps, seed))
        return results

    @staticmethod
    def _deliver(rows: list[_Row], results: list[RowResult]) -> None:
        """Hand each job its rows' results; a job's rows are all in one call, in order (:meth:`plan`)."""
        by_job: dict[int, tuple[Job, list[RowResult]]] = {}
        for row, result in zip(rows, results):
            by_job.setdefault(id(row.job), (row.job, []))[1].append(result)
        for job, found in by_job.values():
            if not job.future.done():  # not timed out meanwhile
                job.future.set_result(found)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the first occurrence of any stop string; (text, whether one was found)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
