"""`tuneoff serve` and `generate`: the official openai client against a live server on 127.0.0.1
(one base, two tiny trained adapters) — concurrent answers equal offline `generate`, streaming,
request limits and bad requests as 4xx, adapter-directory safety, runtime load/unload."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tiny_adapters import PROMPTS, train_adapter  # noqa: E402

from tuneoff.adapters import adapter_in_dir, scan_adapters_dir  # noqa: E402
from tuneoff.cli import main  # noqa: E402
from tuneoff.embedded import TINY_MODEL_DIR  # noqa: E402
from tuneoff.engine import Engine, Sampling, UnknownModel  # noqa: E402
from tuneoff.model import EMBEDDED_MODEL, ModelError  # noqa: E402
from tuneoff.serve import Limits, create_app  # noqa: E402

ANSWERS = {"support": "Drink water and sleep well.", "sql": "SELECT name FROM users"}
ADMIN_KEY = "test-admin-key"
MAX_TOKENS = 24
LIMITS = Limits(max_tokens=64, max_prompt_tokens=120, max_body_bytes=16_384)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    return {
        name: train_adapter(TINY_MODEL_DIR, root / name, answer, seed=i)
        for i, (name, answer) in enumerate(ANSWERS.items())
    }


def offline(model: str | None, adapter: Path | None, prompt: str) -> str:
    """`tuneoff generate` in this process, its stdout captured."""
    args = ["generate", "--model", EMBEDDED_MODEL, prompt, "--max-new-tokens", str(MAX_TOKENS)]
    args += ["--adapter", str(adapter)] if adapter else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return out.getvalue().removesuffix("\n")


@pytest.fixture(scope="module")
def expected(adapters) -> dict[tuple[str, str], str]:
    table = {}
    for prompt in PROMPTS[:3]:
        table[(EMBEDDED_MODEL, prompt)] = offline(EMBEDDED_MODEL, None, prompt)
        for name, path in adapters.items():
            table[(name, prompt)] = offline(EMBEDDED_MODEL, path, prompt)
    return table


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    adapters_dir = tmp_path_factory.mktemp("adapters-dir")
    shutil.copytree(adapters["support"], adapters_dir / "extra")
    (adapters_dir / "escape").symlink_to(adapters["sql"], target_is_directory=True)
    engine = Engine(EMBEDDED_MODEL, adapters, device="cpu")
    app = create_app(engine, LIMITS, admin_key=ADMIN_KEY, adapters_dir=adapters_dir)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "the server did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(url=url, client=client, engine=engine, adapters_dir=adapters_dir)
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive(), "the server did not shut down"


def ask(client, model: str, prompt: str, **extra) -> str:
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, **extra
    )
    return reply.choices[0].message.content


def post(url: str, body: bytes, key: str | None = None, method: str = "POST") -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --------------------------------------------------------------------------- answers


def test_adapters_answer_differently_offline(expected):
    for prompt in PROMPTS[:3]:
        answers = {m: expected[(m, prompt)] for m in (EMBEDDED_MODEL, *ANSWERS)}
        assert len(set(answers.values())) == 3, answers  # a mix-up would be visible
    assert expected[("sql", PROMPTS[0])] == ANSWERS["sql"]


def test_engine_greedy_equals_transformers_generate(adapters):
    """The engine's own decoding loop against PEFT + transformers' generate, independently."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = Engine(EMBEDDED_MODEL, {"sql": adapters["sql"]}, device="cpu")
    ids = engine.chat_prompt_ids([{"role": "user", "content": PROMPTS[1]}])
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    reference = {EMBEDDED_MODEL: base}
    reference["sql"] = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32), adapters["sql"]
    )
    eos = engine.tokenizer.eos_token_id
    for name, model in reference.items():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
        want = engine.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        assert engine.complete(name, ids, Sampling(max_new_tokens=MAX_TOKENS)).text == want


def test_models_lists_the_base_and_every_adapter(server):
    ids = {m.id for m in server.client.models.list()}
    assert {EMBEDDED_MODEL, "support", "sql"} <= ids
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_concurrent_requests_each_get_their_own_adapter(server, expected):
    jobs = [(m, p) for m in (EMBEDDED_MODEL, *ANSWERS) for p in PROMPTS[:3]] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: ask(server.client, *job), jobs))
    for job, answer in zip(jobs, answers):
        assert answer == expected[job], job


def test_completions_endpoint_with_the_chat_prompt(server, expected):
    tokenizer = server.engine.tokenizer
    messages = [{"role": "user", "content": PROMPTS[0]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = server.client.completions.create(model="sql", prompt=prompt, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == expected[("sql", PROMPTS[0])]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(server.engine.text_ids(prompt))


def test_streaming_with_the_openai_client(server, expected):
    stream = server.client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[("support", PROMPTS[2])]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
    pieces = server.client.completions.create(
        model=EMBEDDED_MODEL, prompt="Name a color.", max_tokens=8, stream=True
    )
    assert len("".join(p.choices[0].text for p in pieces)) > 0


def test_sampling_is_seeded(server):
    first, again = (ask(server.client, "sql", PROMPTS[3], temperature=1.5, seed=7) for _ in "ab")
    assert first == again


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("name", ["nope", "../sql", "/etc/passwd", "sql/../../x", "..%2Fsql"])
def test_unknown_and_traversal_model_names_are_404(server, name):
    with pytest.raises(openai.NotFoundError, match="not served"):
        ask(server.client, name, "hi")


def test_limits_are_4xx_naming_the_limit(server):
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=100000 .* 64 \(--max-tokens"):
        server.client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000
        )
    with pytest.raises(openai.BadRequestError, match="limit of 120"):
        ask(server.client, "sql", "many words " * 100)
    with pytest.raises(openai.BadRequestError, match="n: only n=1"):
        ask(server.client, "sql", "hi", n=2)
    chat, completions = f"{server.url}/v1/chat/completions", f"{server.url}/v1/completions"
    status, body = post(chat, b"x" * 20_000)
    assert status == 413 and "16384 bytes" in body["error"]["message"]
    for url, bad in (
        (chat, b"{oops"),
        (chat, b"[1, 2]"),
        (chat, b'{"model": "sql"}'),
        (chat, b'{"model": "sql", "messages": 3}'),
        (completions, b'{"model": "sql", "prompt": ""}'),
        (completions, b'{"model": "sql", "prompt": [99999999]}'),
    ):
        status, body = post(url, bad)
        assert status == 400, bad
        assert body["error"]["message"]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"seed": 10**23}, "seed"),  # was torch's "Overflow when unpacking long long"
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ({"stop": ["ok", "\udce9"]}, "stop.1"),
    ],
    ids=["seed", "temperature", "top_p", "content", "stop"],
)
def test_unusable_values_are_400_naming_the_field(server, change, param):
    """A lone surrogate (JSON may escape one) reached the tokenizer; each was a 500."""
    body = {"model": "sql", "messages": [{"role": "user", "content": "hi"}], "temperature": 1}
    status, reply = post(
        f"{server.url}/v1/chat/completions", json.dumps({**body, **change}).encode()
    )
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"].startswith(param)


def test_the_server_keeps_serving_after_bad_requests(server, expected):
    for bad in (b"{oops", b'{"model": "../../etc"}'):
        post(f"{server.url}/v1/chat/completions", bad)
    assert ask(server.client, "sql", PROMPTS[0]) == expected[("sql", PROMPTS[0])]


# --------------------------------------------------------------------------- adapters


def test_admin_endpoints_need_the_key_and_stay_in_the_adapters_dir(server, expected):
    url = f"{server.url}/v1/adapters"
    assert post(url, b'{"name": "extra"}')[0] == 401
    assert post(url, b'{"name": "extra"}', key="wrong")[0] == 401
    for body in (
        {"name": "../extra"},
        {"name": "x", "path": "../extra"},
        {"name": "x", "path": "/etc"},
        {"name": "x", "path": "escape"},  # a symlink out of the directory
        {"name": "sql"},  # already served
    ):
        status, reply = post(url, json.dumps(body).encode(), key=ADMIN_KEY)
        assert status == 400, (body, reply)
    status, reply = post(url, b'{"name": "extra"}', key=ADMIN_KEY)
    assert status == 200 and "extra" in reply["models"]
    assert ask(server.client, "extra", PROMPTS[0]) == expected[("support", PROMPTS[0])]
    status, reply = post(f"{url}/extra", b"", key=ADMIN_KEY, method="DELETE")
    assert status == 200 and "extra" not in reply["models"]
    with pytest.raises(openai.NotFoundError):
        ask(server.client, "extra", "hi")


DAMAGED = [  # a damaged adapter file, what it holds, and what the error says of it
    ("adapter_model.safetensors", b"not a safetensors file", "is not a readable safetensors"),
    ("adapter_config.json", b"{bad", "is not valid JSON"),
    ("adapter_config.json", b"[1]", "holds a JSON list"),
]


@pytest.mark.parametrize("file, content, fragment", DAMAGED, ids=["weights", "json", "list"])
def test_a_damaged_adapter_is_a_400_and_a_one_line_error(
    server, file, content, fragment, capsys, tmp_path
):
    """Loading it at runtime was a 500; `generate` and `serve` tracebacks."""
    name = f"damaged-{len(content)}"
    damaged = server.adapters_dir / name
    shutil.copytree(server.adapters_dir / "extra", damaged)
    (damaged / file).write_bytes(content)
    body = json.dumps({"name": name}).encode()
    status, reply = post(f"{server.url}/v1/adapters", body, key=ADMIN_KEY)
    assert status == 400 and f"{file} {fragment}" in reply["error"]["message"], reply
    assert name not in server.engine.names()
    for argv in (
        ["generate", "--model", EMBEDDED_MODEL, "--adapter", str(damaged), "hi"],
        ["serve", "--model", EMBEDDED_MODEL, "--adapter", f"d={damaged}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("tuneoff: error:") == 1 and f"{file} {fragment}" in err, err
    shutil.rmtree(damaged)  # the adapters dir is the server's, shared by other tests


def test_an_adapter_of_another_base_says_what_does_not_fit(adapters, tiny_model_dir):
    """The message stopped at torch's heading "Error(s) in loading state_dict for ...:"."""
    engine = Engine(str(tiny_model_dir), device="cpu")  # hidden size 32, the adapters' 128
    with pytest.raises(ModelError, match=r"does not fit this base: Error.*: size mismatch for"):
        engine.load_adapter("sql", adapters["sql"])


def test_admin_endpoints_do_not_exist_without_a_key(server):
    app = create_app(server.engine, LIMITS)
    assert not any("/v1/adapters" in getattr(r, "path", "") for r in app.routes)


def test_adapters_dir_scan_skips_anything_that_escapes(adapters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(adapters["sql"], root / "sql")
    (root / "out").symlink_to(adapters["support"], target_is_directory=True)
    (root / "bad name").mkdir()
    linked = root / "linked"
    linked.mkdir()
    for f in adapters["sql"].iterdir():
        (linked / f.name).symlink_to(f)  # files linking out
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"")
    assert set(scan_adapters_dir(root)) == {"sql"}
    for relative in ("../root/sql", str(root / "sql"), "out", "linked", "pickled"):
        with pytest.raises(ModelError):
            adapter_in_dir(root, relative)


def test_unload_waits_for_in_flight_requests(adapters):
    engine = Engine(EMBEDDED_MODEL, {"sql": adapters["sql"]}, device="cpu", steps_per_turn=1)
    ids = engine.chat_prompt_ids([{"role": "user", "content": PROMPTS[0]}])
    want = engine.complete("sql", ids, Sampling(max_new_tokens=8)).text
    stream = engine.generate("sql", ids, Sampling(max_new_tokens=8))
    first = next(stream)
    assert engine.unload_adapter("sql") == "draining"
    assert "sql" not in engine.names() and "sql" in engine.adapters
    assert first.text + "".join(d.text for d in stream) == want  # finished on its adapter
    assert "sql" not in engine.adapters  # deleted once the last request ended
    with pytest.raises(UnknownModel):
        next(engine.generate("sql", ids, Sampling()))


def test_serve_command_line(adapters, tmp_path, monkeypatch, capsys):
    import tuneoff.serve

    seen = {}
    monkeypatch.setattr(tuneoff.serve, "serve", lambda *a: seen.update(args=a))
    root = tmp_path / "dir"
    root.mkdir()
    shutil.copytree(adapters["sql"], root / "sql2")
    args = ["--adapter", f"support={adapters['support']}", "--adapters-dir", str(root)]
    assert main(["serve", *args, "--port", "0", "--max-tokens-cap", "32", "--device", "cpu"]) == 0
    engine, host, _, limits, admin_key, adapters_dir = seen["args"]
    assert engine.names() == ["tiny-qwen2", "support", "sql2"]  # base: the adapter's, by name
    assert (host, limits.max_tokens, admin_key, adapters_dir) == ("127.0.0.1", 32, None, root)
    for bad, fragment in (
        (["--adapter", "../x=" + str(adapters["sql"])], "not allowed"),
        (["--adapter", "sql"], "NAME=PATH"),
        (["--adapter", f"a={tmp_path}"], "no PEFT adapter"),
    ):
        assert main(["serve", "--model", EMBEDDED_MODEL, *bad]) == 2
        assert fragment in capsys.readouterr().err


def test_a_full_arm_is_served_by_the_name_given(adapters, tmp_path, monkeypatch):
    """`--model runs/x/full` is named `full` (README: "--model as given, a local directory by
    its name"), not `model`, the directory inside the arm that holds the weights."""
    import tuneoff.serve

    seen = {}
    monkeypatch.setattr(tuneoff.serve, "serve", lambda *a: seen.update(args=a))
    shutil.copytree(TINY_MODEL_DIR, tmp_path / "full" / "model")
    argv = ["serve", "--model", str(tmp_path / "full"), "--adapter", f"sql={adapters['sql']}"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert seen["args"][0].names() == ["full", "sql"]


def test_serve_without_the_serve_extra_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--model", EMBEDDED_MODEL]) == 2
    assert "pip install 'tuneoff[serve]'" in capsys.readouterr().err
