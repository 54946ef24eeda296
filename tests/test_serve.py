"""``examples/serve.py`` in a real process on loopback, driven by the official ``openai`` client and raw HTTP:
completions and chat, streaming, concurrent requests batched without changing anyone's answer, structured output
by infilling, and clear 4xx errors after which the server keeps serving. Plus the serving library's pieces:
constrained generation (``token_sets``), typed token classes, JSON templates and the batching plan."""

import asyncio
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from conftest import GPT2_TOKENIZER, free_port, http_process, load_benchmark, tiny_model
from modeling_mdm_prime.tools.serving import (
    BOOLEAN,
    FREE,
    INTEGER_FIRST,
    INTEGER_REST,
    STRING,
    BatchingEngine,
    Job,
    Settings,
    TemplateError,
    TokenClasses,
    completion_template,
    infill_template,
    json_schema_template,
)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
MODEL_ID = "tiny-chat"
# A minimal chat template for the reference tokenizer (it has none): the server must use the tokenizer's own.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / MODEL_ID
    shutil.copytree(REFERENCE, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    command = [sys.executable, str(REPO / "examples" / "serve.py"), "--model_name_or_path", str(checkpoint),
               "--port", str(port), "--max_tokens", "64", "--max_batch_size", "8", "--tick_ms", "200"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with http_process(command, base + "/health"):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same model in this process, for what a lone generate() call gives."""
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def _alone(local, prefix_ids: list[int], max_tokens: int, seed: int, **kwargs) -> str:
    model, tokenizer = local
    out = model.generate(torch.tensor([prefix_ids]), max_new_tokens=max_tokens, seed=seed, **kwargs)
    new = out[0, len(prefix_ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_completion_and_chat_equal_a_lone_generate_call(client, local):
    _, tokenizer = local
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    extensions = {"steps": 8, "strategy": "confidence", "return_steps": True}
    out = client.completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=16, seed=3, extra_body=extensions)
    expected = _alone(local, tokenizer("ROMEO:")["input_ids"], 16, 3, num_steps=8, strategy="confidence")
    assert out.choices[0].text == expected and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(tokenizer("ROMEO:")["input_ids"])
    assert out.model_extra["mdm_prime"]["num_steps"] == [8] and out.model_extra["mdm_prime"]["seed"] == [3]

    messages = [{"role": "user", "content": "Speak, JULIET."}]
    chat = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, seed=1)
    prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prefix.endswith("ASSISTANT:")
    expected = _alone(local, tokenizer(prefix, add_special_tokens=False)["input_ids"], 12, 1)
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"


def test_streams_carry_final_text_that_adds_up_to_the_answer(client, server):
    settings = dict(model=MODEL_ID, prompt="JULIET:", max_tokens=16, seed=5, extra_body={"block_length": 4})
    whole = client.completions.create(**settings).choices[0].text
    chunks = list(client.completions.create(stream=True, **settings))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == whole
    assert sum(bool(t) for t in texts) >= 2  # block decoding finalises text block by block, before the end
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    chat = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Hark"}], max_tokens=10, seed=2)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    pieces = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == whole
    assert pieces[-1].usage.completion_tokens >= 1 and pieces[-1].choices == []

    # return_steps: one event per denoising step (with the counts of masked and partly revealed tokens).
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={**{k: v for k, v in settings.items() if k != "extra_body"}, "stream": True,
                            "return_steps": True, "steps": 16}) as response:  # fmt: skip
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    steps = [e["mdm_prime"]["step"] for e in events if "step" in e.get("mdm_prime", {})]
    assert steps == list(range(1, 17))
    masked = [e["mdm_prime"]["masked_tokens"] for e in events if "step" in e.get("mdm_prime", {})]
    assert masked[-1] == 0 and masked == sorted(masked, reverse=True)


def test_concurrent_requests_are_batched_and_each_gets_its_lone_answer(client, server, local):
    _, tokenizer = local
    prompts = ["ROMEO:", "JULIET:", "NURSE: Madam", "MERCUTIO: Why", "ROMEO:", "ROMEO:"]
    # Four prompts share seed 0 (one call); the fifth repeats the first request exactly, so it must go to another
    # call; the sixth has its own seed (its own group).
    seeds = [0, 0, 0, 0, 0, 9]
    before = httpx.get(server + "/health").json()["generate_calls"]

    def ask(i):
        return (
            client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=12, seed=seeds[i]).choices[0].text
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    calls = httpx.get(server + "/health").json()["generate_calls"] - before
    expected = [_alone(local, tokenizer(p)["input_ids"], 12, s) for p, s in zip(prompts, seeds)]
    assert answers == expected
    assert answers[0] == answers[4] != answers[5]
    # Three calls when all six arrive within one tick (200 ms); one more if a request misses it.
    assert 3 <= calls <= 4

    # One request, several prompts and n: choices in OpenAI's order, each its lone answer.
    out = client.completions.create(model=MODEL_ID, prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=8, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    model, _ = local
    for p, prompt in enumerate(["ROMEO:", "JULIET:"]):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        both = model.generate(ids, max_new_tokens=8, seed=7, num_return_sequences=2)
        for j in range(2):
            new = both[j, ids.shape[1] :].tolist()
            new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
            assert out.choices[2 * p + j].text == tokenizer.decode(new, skip_special_tokens=True)


def test_structured_output_infill_and_suffix(client, local):
    _, tokenizer = local
    for seed in range(3):
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        extensions = {"tokens_per_value": 4, "response_format": fmt}
        out = client.completions.create(model=MODEL_ID, prompt="A player: ", seed=seed, extra_body=extensions)
        value = json.loads(out.choices[0].text)
        assert list(value) == ["name", "age"] and isinstance(value["name"], str) and isinstance(value["age"], int)
        assert value["age"] > 0
    with pytest.raises(openai.BadRequestError, match="keywords not supported by infilling: \\['minimum'\\]"):
        bad = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 3}}}
        client.completions.create(model=MODEL_ID, prompt="x", extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "p", "schema": bad}}})  # fmt: skip

    out = client.completions.create(model=MODEL_ID, prompt="ROMEO: [MASK:3] thy [MASK:2]!", seed=0,
                                    extra_body={"infill": True})  # fmt: skip
    template = infill_template(tokenizer, "ROMEO: [MASK:3] thy [MASK:2]!")
    fixed = tokenizer.decode([i for i, h in zip(template.ids, template.holes) if not h][:3])
    assert out.choices[0].text.startswith(fixed) and " thy" in out.choices[0].text

    out = client.completions.create(model=MODEL_ID, prompt="ROMEO: O", suffix=" love.", max_tokens=5, seed=0)
    model, _ = local
    t = completion_template(tokenizer, tokenizer("ROMEO: O")["input_ids"], 5, " love.")
    filled = model.generate(torch.tensor([t.ids]), infill_mask=torch.tensor([t.holes]), seed=0)[0]
    assert out.choices[0].text == tokenizer.decode(filled[t.answer].tolist(), skip_special_tokens=True)


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(client, server):
    raw = httpx.post(server + "/v1/completions", content=b'{"model": "tiny-chat", "prompt": ',
                     headers={"content-type": "application/json"})  # fmt: skip
    assert raw.status_code == 400 and "malformed JSON" in raw.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown field\\(s\\) \\['temprature'\\]"):
        client.completions.create(model=MODEL_ID, prompt="x", extra_body={"temprature": 0.5})
    with pytest.raises(openai.BadRequestError, match="max_tokens=65 is over this server's limit of 64"):
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="\\['logprobs'\\] not supported by a diffusion LM"):
        client.completions.create(model=MODEL_ID, prompt="x", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="9 sequences \\(prompts × n\\) is over this server's limit of 8"):
        client.completions.create(model=MODEL_ID, prompt="x", n=9)
    with pytest.raises(openai.BadRequestError, match="infill template has no hole"):
        client.completions.create(model=MODEL_ID, prompt="no holes", extra_body={"infill": True})
    with pytest.raises(openai.BadRequestError, match="infill=true fills the prompt's \\[MASK\\] holes; \\['suffix'\\]"):
        client.completions.create(model=MODEL_ID, prompt="a [MASK] b", suffix="c", extra_body={"infill": True})
    with pytest.raises(openai.BadRequestError, match="response_format.json_schema.schema is required"):
        client.completions.create(model=MODEL_ID, prompt="x", extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "p"}}})  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found; this server serves 'tiny-chat'"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt="x", temperature=3)
    assert client.completions.create(model=MODEL_ID, prompt="ROMEO:", max_tokens=4, seed=0).choices[0].text


# --- the library under the server -------------------------------------------------------------------------------


def test_constrained_generation_draws_only_allowed_tokens():
    model = tiny_model(num_sub_tokens=2, time_conditioning=False)
    vocab = model.config.vocab_size
    sets = torch.zeros(3, vocab, dtype=torch.bool)
    sets[0] = True
    sets[1, 10:20] = True  # ten tokens
    sets[2, [5, 200, 201]] = True
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    holes = torch.zeros(2, 12, dtype=torch.bool)
    holes[:, 3:9] = True
    set_ids = torch.zeros(2, 12, dtype=torch.long)
    set_ids[:, 3:6], set_ids[:, 6:9] = 1, 2
    for seed in range(20):
        for strategy in ("ancestral", "confidence"):
            out = model.generate(ids, infill_mask=holes, seed=seed, strategy=strategy, token_sets=sets,
                                 token_set_ids=set_ids)  # fmt: skip
            assert bool(sets[set_ids[holes], out[holes]].all())
            assert torch.equal(out[~holes], ids[~holes])
    with pytest.raises(ValueError, match="token_sets and token_set_ids go together"):
        model.generate(ids, infill_mask=holes, token_sets=sets)
    with pytest.raises(ValueError, match="token_set_ids must be a \\(2, 12\\) long tensor"):
        model.generate(ids, infill_mask=holes, token_sets=sets, token_set_ids=set_ids[:, :5])
    with pytest.raises(ValueError, match=f"token_sets must be a \\(K, {vocab}\\) bool tensor"):
        model.generate(ids, infill_mask=holes, token_sets=sets.long(), token_set_ids=set_ids)
    with pytest.raises(ValueError, match="token_set_ids must index token_sets"):
        model.generate(ids, infill_mask=holes, token_sets=sets, token_set_ids=set_ids + 3)
    # Sub-token conditioning that no allowed token agrees with: refused before sampling.
    sub_ids = model.codec.encode(ids)
    sub_ids[:, 3:9] = model.codec.mask_id
    sub_ids[0, 4, 0] = model.codec.encode(torch.tensor([250]))[0, 0]  # first digit of no token in set 1
    with pytest.raises(ValueError, match="row 0, position 4: no token of its set"):
        model.generate(sub_token_ids=sub_ids, token_sets=sets, token_set_ids=set_ids)


def test_token_classes_and_json_templates_on_the_gpt2_tokenizer():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    classes = TokenClasses(tokenizer, len(tokenizer))
    sets = classes.token_sets
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert bool(sets[FREE].all())
    for i in sets[STRING].nonzero().flatten().tolist():
        assert '"' not in texts[i] and "\\" not in texts[i] and all(ord(c) >= 0x20 for c in texts[i])
    assert sets[STRING].sum() > 45_000  # almost every token can sit inside a JSON string
    assert {texts[i] for i in sets[BOOLEAN].nonzero().flatten().tolist()} == {"true", "false"}
    assert all(texts[i].isdigit() for i in sets[INTEGER_REST].nonzero().flatten().tolist())
    assert not any(texts[i].startswith("0") for i in sets[INTEGER_FIRST].nonzero().flatten().tolist())
    assert sets[INTEGER_FIRST].sum() > 100  # GPT-2 has multi-digit tokens
    assert not sets[STRING, tokenizer.eos_token_id] and not sets[STRING, 1]  # special token, and '"'

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                                "who": {"type": "string"}}}  # fmt: skip
    t = json_schema_template(tokenizer, classes, schema, tokens_per_value=3)
    filled = list(t.ids)
    pick = {STRING: tokenizer.encode("abc")[0], INTEGER_FIRST: tokenizer.encode("42")[0],
            INTEGER_REST: tokenizer.encode("7")[0], BOOLEAN: tokenizer.encode("true")[0]}  # fmt: skip
    for position, kind in enumerate(t.set_ids):
        if t.holes[position]:
            filled[position] = pick[kind]
    assert json.loads(tokenizer.decode(filled)) == {"ok": True, "n": 427, "who": "abcabcabc"}
    for bad, message in [
        ({"type": "array"}, "needs a JSON schema"),
        ({"type": "object", "properties": {"x": {"type": "object"}}}, "type 'object' is not supported"),
        ({"type": "object", "properties": {"x": {"type": "string", "maxLength": 3}}}, "\\['maxLength'\\]"),
        ({"type": "object", "properties": {}, "oneOf": []}, "\\['oneOf'\\]"),
    ]:
        with pytest.raises(TemplateError, match=message):
            json_schema_template(tokenizer, classes, bad)


def test_the_batching_plan_keeps_jobs_whole_and_apart():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    model = tiny_model(num_sub_tokens=1, time_conditioning=False)
    engine = BatchingEngine(model, tokenizer, max_batch_size=4)
    loop = asyncio.new_event_loop()
    try:

        def job(prompts, seed=0, n=1):
            templates = [
                completion_template(tokenizer, tokenizer(p)["input_ids"], 4) for p in prompts for _ in range(n)
            ]
            return Job(templates, Settings(seed=seed), loop.create_future())

        a, b, c, d, e = job(["x"], n=2), job(["y"]), job(["x"]), job(["z"], seed=1), job(["w", "v", "u"])
        calls = engine.plan([a, b, c, d, e])
        rows = [[(id(r.job), r.index) for r in call] for call in calls]
        # a's duplicates share a call; c's "x" may not join a's; e does not fit beside a and b (4 rows at most)
        # but does beside c; d has another seed.
        assert rows == [
            [(id(a), 0), (id(a), 1), (id(b), 0)],
            [(id(c), 0), (id(e), 0), (id(e), 1), (id(e), 2)],
            [(id(d), 0)],
        ]
    finally:
        loop.close()


def test_the_committed_serving_table_is_the_guide_s():
    """docs/guides/serving.md shows exactly what the committed JSON renders to (numbers are never retyped)."""
    page = (REPO / "docs" / "guides" / "serving.md").read_text(encoding="utf-8")
    for name in ("serving", "serving_smollm2"):
        committed = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
        table = load_benchmark("serving").render_markdown(committed)
        assert table in page, f"docs/guides/serving.md does not show benchmarks/results/{name}.json"
        assert (REPO / "benchmarks" / "results" / f"{name}.md").read_text(encoding="utf-8").strip() == table
        assert [row["clients"] for row in committed["rows"]] == [1, 1, 4, 16]


@pytest.mark.slow
def test_the_serving_benchmark_runs_small(tmp_path):
    report = load_benchmark("serving").main(
        ["--model_name_or_path", str(REFERENCE), "--concurrency", "1,3", "--num_requests", "3", "--max_tokens", "4",
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    rows = report["rows"]
    assert [r["clients"] for r in rows] == [1, 1, 3] and all(r["requests"] == 3 for r in rows)
    assert rows[1]["rows_per_generate_call"] == 1.0  # one client: nothing to batch
    assert rows[2]["rows_per_generate_call"] >= 1.0 and rows[0]["speedup_vs_sequential"] == 1.0
    assert (tmp_path / "serving.md").read_text().strip() == load_benchmark("serving").render_markdown(report)


def test_a_request_over_its_time_limit_gets_504_and_the_server_goes_on():
    """In process (FastAPI's TestClient runs the app's lifespan, so the engine is real): a limit no generation can
    meet gives a 504 naming it; the next request with a workable limit is served."""
    from fastapi.testclient import TestClient

    serve = runpy_module(REPO / "examples" / "serve.py")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_model(num_sub_tokens=1, time_conditioning=False, vocab_size=len(tokenizer))
    limits = serve.Limits(request_timeout=1e-4)
    app = serve.create_app(model, tokenizer, "tiny", limits, tick_s=0.05)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "seed": 0}
    with TestClient(app) as http:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 504
        assert response.json()["error"]["message"] == "the request did not finish within 0.0001 s"
        limits.request_timeout = 60.0  # the app reads its limits per request
        first = http.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 1
        assert http.post("/v1/completions", json=body).json()["choices"] == first.json()["choices"]


def runpy_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the request models' annotations through it
    spec.loader.exec_module(module)
    return module
