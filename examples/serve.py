"""An OpenAI-compatible server for an MDM-Prime model (FastAPI + uvicorn): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (the tokenizer's chat template), ``stream=true`` as server-sent events.

    pip install -e ".[serve]"
    python examples/serve.py --model_name_or_path checkpoints/mdm-prime-shakespeare-tiny --port 8000
    # any OpenAI client:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="mdm-prime-shakespeare-tiny", prompt="ROMEO:", max_tokens=32, seed=0,
                              extra_body={"steps": 32, "strategy": "confidence"})

What is different from an autoregressive server (docs/guides/serving.md has the whole contract):

* Diffusion settings are request fields (extensions of the OpenAI schema, sent with ``extra_body``): ``steps``,
  ``strategy``, ``block_length``, ``threshold``, ``top_k``; ``infill=true`` makes each prompt a template with
  ``[MASK]`` / ``[MASK:n]`` holes; OpenAI's ``suffix`` is honoured (the holes sit between prompt and suffix);
  ``response_format={"type": "json_schema", ...}`` fills a JSON template whose values are typed holes, so the
  answer always parses (structured output by infilling); ``return_steps=true`` adds ``mdm_prime`` (steps, network
  calls, seed) to a response, and one chunk per denoising step to a stream.
* A streamed chunk carries text that is *final*: every token before it is decided. Diffusion decides tokens in any
  order, so without ``block_length`` most text arrives near the end; with it, block by block.
* Concurrent requests with the same settings are answered by one ``generate()`` call per tick. A request with a
  ``seed`` gets exactly what ``model.generate`` gives it alone, whoever else is being served.
* Unknown fields, and OpenAI fields a diffusion LM cannot honour (``logprobs``, penalties, ``logit_bias``,
  ``best_of``), are refused with a 400 that names them; so are requests over the limits below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime.tools.cli import add_demo_model_argument, option_strings
from modeling_mdm_prime.tools.serving import (
    BatchingEngine,
    Job,
    Settings,
    TemplateError,
    completion_template,
    infill_template,
    json_schema_template,
    truncate_at_stop,
)

logger = logging.getLogger("mdm_prime.serve")
REPO = Path(__file__).resolve().parents[1]


class Limits(BaseModel):
    max_tokens: int = 512  # per answer
    max_batch_size: int = 16  # rows per generate() call, and per request (prompts × n)
    request_timeout: float = 300.0  # seconds from arrival to the last byte


class DiffusionFields(BaseModel):
    """The request fields every endpoint takes: OpenAI's sampling fields and this server's extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**62)
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # Accepted only at their neutral values: a diffusion LM has no next-token log-probabilities or penalties.
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Extensions.
    steps: int | None = Field(default=None, ge=1, le=4096)
    strategy: Literal["ancestral", "confidence", "threshold"] | None = None
    block_length: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    tokens_per_value: int = Field(default=6, ge=1, le=64)
    return_steps: bool = False


class CompletionRequest(DiffusionFields):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = None
    infill: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(DiffusionFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def create_app(model, tokenizer, model_id: str, limits: Limits, tick_s: float = 0.02) -> FastAPI:
    """The FastAPI application: one engine, one model."""
    engine = BatchingEngine(model, tokenizer, max_batch_size=limits.max_batch_size, tick_s=tick_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app = FastAPI(title="MDM-Prime OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, f"malformed JSON body: {errors[0].get('ctx', {}).get('error', 'not JSON')}")
        unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:
            return error_response(
                400, f"unknown field(s) {unknown}; see docs/guides/serving.md for the fields this server takes",
                param=unknown[0],
            )  # fmt: skip
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}", param=where or None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health():
        return {"status": "ok", "generate_calls": engine.calls, "rows_served": engine.rows_served}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                             "owned_by": "modeling_mdm_prime"}]}  # fmt: skip

    def check_common(body: DiffusionFields) -> tuple[int, Settings, list[str]]:
        if body.model != model_id:
            raise APIError(404, f"model {body.model!r} not found; this server serves {model_id!r}", "model",
                           "not_found_error")  # fmt: skip
        # Accepted only at their neutral values (None, 0, False, {}): a diffusion LM has no next-token distribution.
        refused = [name for name in ("logprobs", "logit_bias", "presence_penalty", "frequency_penalty")
                   if getattr(body, name) not in (None, {}) and getattr(body, name) != 0]  # fmt: skip
        if getattr(body, "best_of", None) not in (None, 1):
            refused.append("best_of")
        if refused:
            raise APIError(400, f"{refused} not supported by a diffusion LM (no next-token distribution)", refused[0])
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = max_tokens if max_tokens is not None else (16 if isinstance(body, CompletionRequest) else 128)
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                           "max_tokens")  # fmt: skip
        if body.strategy != "threshold" and body.threshold is not None:
            raise APIError(400, "threshold applies to strategy='threshold'", "threshold")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"at most 4 stop strings, got {len(stop)}", "stop")
        settings = Settings(
            num_steps=body.steps, strategy=body.strategy, block_length=body.block_length, threshold=body.threshold,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
            constrained=body.response_format is not None and body.response_format.get("type") == "json_schema",
        )  # fmt: skip
        return max_tokens, settings, stop

    def schema_of(body: DiffusionFields) -> dict | None:
        fmt = body.response_format
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("json_schema"), dict):
            raise APIError(400, "response_format must be {'type': 'json_schema', 'json_schema': {'schema': {...}}}"
                           " or {'type': 'text'}", "response_format")  # fmt: skip
        if not isinstance(fmt["json_schema"].get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema is required: the JSON schema to fill",
                           "response_format")  # fmt: skip
        return fmt["json_schema"]["schema"]

    def build(prefix_ids: list[int], body: DiffusionFields, max_tokens: int, prompt_text: str | None = None):
        schema = schema_of(body)
        try:
            if schema is not None:
                return json_schema_template(tokenizer, engine.token_classes, schema, body.tokens_per_value, prefix_ids)
            if getattr(body, "infill", False):
                return infill_template(tokenizer, prompt_text)
            return completion_template(tokenizer, prefix_ids, max_tokens, getattr(body, "suffix", None))
        except TemplateError as error:
            raise APIError(400, str(error), "response_format" if schema is not None else "prompt") from error

    def check_rows(templates: list) -> None:
        if len(templates) > limits.max_batch_size:
            raise APIError(400, f"{len(templates)} sequences (prompts × n) is over this server's limit of "
                           f"{limits.max_batch_size}", "n")  # fmt: skip
        longest = max(len(t.ids) for t in templates)
        if longest > model.config.max_position_embeddings:
            raise APIError(400, f"prompt plus answer is {longest} tokens, more than the model's "
                           f"{model.config.max_position_embeddings}", "max_tokens")  # fmt: skip

    async def run(job: Job):
        try:
            return await asyncio.wait_for(engine.submit(job), limits.request_timeout)
        except TimeoutError as error:
            raise APIError(504, f"the request did not finish within {limits.request_timeout} s", None,
                           "timeout_error") from error  # fmt: skip

    def usage(templates, results) -> dict:
        prompt = sum(sum(not h for h in t.holes) for t in templates)
        completion = sum(len(r.ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish(result, stop: list[str]) -> tuple[str, str]:
        text, stopped = truncate_at_stop(result.text, stop)
        return text, "stop" if (stopped or result.finished) else "length"

    def extension(results) -> dict:
        return {"nfe": [r.nfe for r in results], "num_steps": [r.num_steps for r in results],
                "seed": [r.seed for r in results]}  # fmt: skip

    def respond(body: DiffusionFields, kind: str, templates, results, stop: list[str], content) -> dict:
        """A non-streamed response: one choice per row, ``content(index, text)`` its text field."""
        choices = []
        for i, result in enumerate(results):
            text, reason = finish(result, stop)
            choices.append({"index": i, **content(i, text), "finish_reason": reason, "logprobs": None})
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        response = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                    "model": model_id, "choices": choices, "usage": usage(templates, results)}  # fmt: skip
        if body.return_steps:
            response["mdm_prime"] = extension(results)
        return response

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        max_tokens, settings, stop = check_common(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        if body.infill:
            # The template's holes give the length and the place of the answer: nothing else may.
            clashes = [name for name in ("max_tokens", "suffix", "response_format") if getattr(body, name) is not None]
            if clashes:
                raise APIError(400, f"infill=true fills the prompt's [MASK] holes; {clashes} do not apply to it",
                               clashes[0])  # fmt: skip
        templates = []
        for prompt in prompts:
            template = build(tokenizer(prompt)["input_ids"], body, max_tokens, prompt)
            templates += [template] * body.n
        check_rows(templates)
        echo = [p for p in prompts for _ in range(body.n)] if body.echo else None
        job = Job(templates, settings, asyncio.get_running_loop().create_future())
        if body.stream:
            return stream(job, body, stop, "text_completion", echo)
        results = await run(job)
        return respond(body, "text_completion", templates, results, stop,
                       lambda i, text: {"text": (echo[i] if echo else "") + text})  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        max_tokens, settings, stop = check_common(body)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        templates = [build(prefix_ids, body, max_tokens)] * body.n
        check_rows(templates)
        job = Job(templates, settings, asyncio.get_running_loop().create_future())
        if body.stream:
            return stream(job, body, stop, "chat.completion.chunk", None)
        results = await run(job)
        return respond(body, "chat.completion", templates, results, stop,
                       lambda i, text: {"message": {"role": "assistant", "content": text}})  # fmt: skip

    def stream(job: Job, body: DiffusionFields, stop: list[str], kind: str, echo: list[str] | None):
        """Server-sent events: a chunk per piece of final text (and per step with return_steps), then one chunk
        per choice with its finish_reason, then ``data: [DONE]``."""
        job.events = asyncio.Queue()
        job.step_events = body.return_steps
        chat = kind == "chat.completion.chunk"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        started = int(time.time())
        rows = len(job.templates)
        sent, stopped = [""] * rows, [False] * rows

        def chunk(index: int, text: str | None, reason: str | None = None, extra: dict | None = None,
                  role: str | None = None) -> str:  # fmt: skip
            if chat:
                delta = ({"role": role} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            payload = {"id": ident, "object": kind, "created": started, "model": model_id, "choices": [choice]}
            if extra:
                payload["mdm_prime"] = extra
            return f"data: {json.dumps(payload)}\n\n"

        def text_delta(index: int, full: str) -> str:
            """The new part of ``full`` after what was sent, held back where a stop string may be starting."""
            cut, hit = truncate_at_stop(full, stop)
            if hit:
                stopped[index] = True
            else:
                hold = max((len(s) - 1 for s in stop), default=0)
                cut = cut[: len(cut) - hold] if hold and not stopped[index] else cut
            new = cut[len(sent[index]) :] if cut.startswith(sent[index]) else ""
            sent[index] += new
            return new

        async def events():
            totals = [""] * rows
            if chat:
                for i in range(rows):
                    yield chunk(i, "", role="assistant")
            elif echo:
                for i in range(rows):
                    yield chunk(i, echo[i])

            def on_delta(index: int, text: str, info: dict | None) -> str | None:
                totals[index] += text
                new = "" if stopped[index] else text_delta(index, totals[index])
                return chunk(index, new, extra=info) if new or info else None

            task = asyncio.create_task(asyncio.wait_for(engine.submit(job), limits.request_timeout))
            while True:
                getter = asyncio.create_task(job.events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                kind_, index, text, info = getter.result()
                if kind_ == "error":
                    break
                if (out := on_delta(index, text, info)) is not None:
                    yield out
            while not job.events.empty():  # events queued before the result
                kind_, index, text, info = job.events.get_nowait()
                if kind_ == "delta" and (out := on_delta(index, text, info)) is not None:
                    yield out
            try:
                results = task.result()
            except Exception as error:  # noqa: BLE001 - the client hears of it in the stream
                message = "the request timed out" if isinstance(error, TimeoutError) else str(error)
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            for i, result in enumerate(results):
                text, reason = finish(result, stop)
                if not stopped[i]:
                    stopped[i] = True
                    rest = text[len(sent[i]) :] if text.startswith(sent[i]) else ""
                    if rest:
                        yield chunk(i, rest)
                yield chunk(i, None if chat else "", reason, extension([result]) if body.return_steps else None)
            if (body.stream_options or {}).get("include_usage"):
                payload = {"id": ident, "object": kind, "created": started, "model": model_id, "choices": [],
                           "usage": usage(job.templates, results)}  # fmt: skip
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_demo_model_argument(p, REPO)
    p.add_argument("--model_id", default=None, help="the name clients use (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(*option_strings("max_tokens"), type=int, default=Limits().max_tokens, help="answer length limit")
    p.add_argument(*option_strings("max_batch_size"), type=int, default=Limits().max_batch_size,
                   help="rows per generate() call and per request")  # fmt: skip
    p.add_argument(*option_strings("request_timeout"), type=float, default=Limits().request_timeout,
                   help="seconds a request may take")  # fmt: skip
    p.add_argument(*option_strings("tick_ms"), type=float, default=20.0, help="how long a request waits for others")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True,
                                      dtype=getattr(torch, args.dtype)).to(args.device).eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_id = args.model_id or Path(args.model_name_or_path).name
    limits = Limits(
        max_tokens=args.max_tokens, max_batch_size=args.max_batch_size, request_timeout=args.request_timeout
    )
    app = create_app(model, tokenizer, model_id, limits, tick_s=args.tick_ms / 1000)
    logger.info("serving %s as %r on http://%s:%d/v1", args.model_name_or_path, model_id, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
