"""Generation for deployment: one base model loaded once, any number of LoRA adapters on it.

`Engine` backs both `tuneoff generate` and `tuneoff serve`. Requests for different adapters may
arrive concurrently; they decode in turns of a few steps, each turn under one lock that sets the
request's adapter (or disables adapters for the base model) and runs forward passes with the
request's own KV cache, so no step ever runs with another request's adapter, and tokens are
handed out after the lock is released, so a slow streaming client never holds the model.
Adapters are read only from directories given by the operator; see `adapters.adapter_in_dir`.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneoff.adapters import (
    arm_model,
    base_model_of,
    check_adapter,
    check_adapter_name,
    error_detail,
    find_adapter_dir,
    model_name,
)
from tuneoff.model import ModelError, check_model, load_tokenizer, resolve_model_path
from tuneoff.runs import UsageError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


class UnknownModel(KeyError):
    """A request named a model (base or adapter) that is not served."""


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of generated text; the last one of a generation has `finish_reason` set."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    completion_tokens: int = 0


# --------------------------------------------------------------------------- messages


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None: a lone surrogate, which is what a JSON escape
    like "\\ud800" or a non-UTF-8 byte (argv and stdin decode with surrogateescape) becomes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        byte = f", the non-UTF-8 byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else ""
        where = f"at character {err.start}"
        return f"not valid Unicode text (a lone surrogate U+{code:04X}{byte}, {where})"
    return None


# --------------------------------------------------------------------------- device and sampling


def choose_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """auto: CUDA when present, in bf16 (fp16 without bf16 support); CPU in fp32."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ModelError("--device cuda was asked for but CUDA is not available; use auto")
    device = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    if dtype == "auto":
        if device == "cpu":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, DTYPES[dtype]


def pick_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature, top-k and nucleus (top-p) sampling."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= s.top_p  # keep the first over p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not yet safe to emit: the start of a stop string, or an
    incomplete multi-byte character (decoded as U+FFFD)."""
    partial_char = len(text) - len(text.rstrip("\ufffd"))
    for n in range(min(max((len(s) for s in stops), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops if len(s) > n):
            return max(n, partial_char)
    return partial_char


# --------------------------------------------------------------------------- the engine


class Engine:
    """One base model, many adapters, one lock taken per turn of `steps_per_turn` steps."""

    def __init__(
        self,
        model: str,
        adapters: dict[str, Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        base_name: str | None = None,
        steps_per_turn: int = 8,
    ) -> None:
        from transformers import AutoModelForCausalLM

        check_model(model)
        self.device, self.dtype = choose_device(device, dtype)
        self.base_name = base_name or model_name(model)
        self.steps_per_turn = steps_per_turn
        self.tokenizer = load_tokenizer(model)
        self.model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(model), dtype=self.dtype
        ).to(self.device)
        self.model.eval()
        # transformers 5 calls the KV cache `cache`; 4.x `past_key_values`
        forward_args = inspect.signature(type(self.model).forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 2048
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {t for t in [self.tokenizer.eos_token_id, *eos] if t is not None}
        self.adapters: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        self._in_use: Counter[str] = Counter()
        self._draining: set[str] = set()
        self._current: str | None = None  # the adapter set active on the model
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    # -- adapters

    def names(self) -> list[str]:
        adapters = list(self.adapters)  # a snapshot (one C call): safe against a concurrent load
        return [self.base_name, *(n for n in adapters if n not in self._draining)]

    def has(self, name: str) -> bool:
        return name in self.names()

    def load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        check_adapter_name(name)
        if name == self.base_name or name in self.adapters:
            raise ModelError(f"adapter name {name!r} is already served; choose another name")
        adapter_dir = find_adapter_dir(Path(path))
        check_adapter(adapter_dir)
        with self._lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(
                        self.model, adapter_dir, adapter_name=name, is_trainable=False
                    )
            except (RuntimeError, ValueError, KeyError) as err:  # shapes or modules of another base
                raise ModelError(
                    f"adapter {adapter_dir} does not fit this base: {error_detail(err)}"
                ) from None
            self.model.eval()
            self.adapters[name] = adapter_dir
            self._current = None
        log.info("loaded adapter %r from %s", name, adapter_dir)

    def unload_adapter(self, name: str) -> str:
        """Remove an adapter: at once if idle ("unloaded"), else once its in-flight requests
        end ("draining"); new requests for it are refused from now on."""
        with self._lock:
            if name not in self.adapters or name in self._draining:
                raise UnknownModel(name)
            if self._in_use[name]:
                self._draining.add(name)
                return "draining"
            self._delete(name)
            return "unloaded"

    def _delete(self, name: str) -> None:  # under the lock
        self.model.delete_adapter(name)
        del self.adapters[name]
        self._draining.discard(name)
        self._current = None  # peft activates another adapter after a delete
        log.info("unloaded adapter %r", name)

    @contextmanager
    def _active(self, name: str) -> Iterator[None]:  # under the lock
        if name == self.base_name:
            ctx = self.model.disable_adapter() if self.adapters else nullcontext()
            with ctx:
                yield
            return
        if self._current != name:  # set_adapter walks every LoRA layer: only on a change
            self.model.set_adapter(name, inference_mode=True)
            self._current = name
        yield

    # -- prompts

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template with the assistant turn opened; without a template, the Alpaca
        prompt tuneoff trains with, the messages joined as its instruction."""
        from tuneoff.data import prompt_text

        if getattr(self.tokenizer, "chat_template", None):
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
        else:
            instruction = "\n\n".join(m["content"] for m in messages)
            text = prompt_text({"instruction": instruction, "input": ""}, self.tokenizer)
        return self.text_ids(text)

    def text_ids(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation

    def generate(self, name: str, prompt_ids: list[int], s: Sampling) -> Iterator[Delta]:
        """Stream the answer of model `name` (the base or an adapter) as text deltas."""
        with self._lock:
            if not self.has(name):
                raise UnknownModel(name)
            self._in_use[name] += 1
        try:
            yield from self._decode(name, prompt_ids, s)
        finally:
            with self._lock:
                self._in_use[name] -= 1
                if name in self._draining and not self._in_use[name]:
                    self._delete(name)

    def complete(self, name: str, prompt_ids: list[int], s: Sampling) -> Delta:
        """The whole answer as one Delta."""
        parts = list(self.generate(name, prompt_ids, s))
        return Delta(
            "".join(p.text for p in parts), parts[-1].finish_reason, parts[-1].completion_tokens
        )

    def _decode(self, name: str, prompt_ids: list[int], s: Sampling) -> Iterator[Delta]:
        budget = min(s.max_new_tokens, self.context - len(prompt_ids))
        tokens: list[int] = []
        text, emitted, finish, generated = "", 0, "length", 0
        for token in self._tokens(name, prompt_ids, s, budget):
            generated += 1
            if token in self.stop_ids:
                finish = "stop"
                break
            tokens.append(token)
            with self._tokenizer_lock:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(stop) for stop in s.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
                break
            safe = len(text) - _holdback(text, s.stop)
            if safe > emitted:
                yield Delta(text[emitted:safe])
                emitted = safe
        yield Delta(text[emitted:], finish, generated)

    def _tokens(self, name: str, prompt_ids: list[int], s: Sampling, budget: int) -> Iterator[int]:
        """Token ids, decoded `steps_per_turn` at a time under the lock (so that concurrent
        requests for different adapters switch once per turn, not once per token) and yielded
        outside it (so that a slow consumer never holds the model)."""
        generator = None
        if s.temperature > 0:
            generator = torch.Generator()
            if s.seed is None:
                generator.seed()  # a fresh random seed
            else:
                generator.manual_seed(s.seed)
        ids = torch.tensor([prompt_ids], device=self.device)
        cache, left = None, max(budget, 0)
        while left > 0:
            turn: list[int] = []
            with self._lock, self._active(name), torch.inference_mode():
                while left > 0 and len(turn) < self.steps_per_turn:
                    out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache})
                    cache = out[self._cache_arg]
                    turn.append(pick_token(out.logits[0, -1], s, generator))
                    ids = torch.tensor([[turn[-1]]], device=self.device)
                    left -= 1
                    if turn[-1] in self.stop_ids:
                        left = 0
            yield from turn


# --------------------------------------------------------------------------- `tuneoff generate`


def generation_model(model: str | None, adapter: str | None) -> tuple[str, dict[str, Path]]:
    """The base model of `tuneoff generate` (--model, else the adapter's base) and its adapter,
    named "adapter"."""
    adapters = {"adapter": find_adapter_dir(Path(adapter))} if adapter else {}
    for adapter_dir in adapters.values():  # before a model is loaded
        check_adapter(adapter_dir)
    model = arm_model(model) or (base_model_of(adapters["adapter"]) if adapters else None)
    if not model:
        raise UsageError("pass --model (the base model), --adapter, or both")
    return model, adapters


def generation_sampling(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None
) -> Sampling:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if not 0 <= temperature < math.inf:  # written so that NaN fails (NaN compares false)
        raise UsageError(f"--temperature {temperature}: must be a finite number >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be above 0 and at most 1")
    if top_k < 0:
        raise UsageError(f"--top-k {top_k}: must be >= 0 (0: no top-k cut)")
    if seed is not None and seed not in SEEDS:
        raise UsageError(f"--seed {seed}: must be from -2**63 to 2**64-1")
    return Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


def generation_text(prompt: str, system: str | None) -> str:
    """`tuneoff generate`'s prompt (stdin for "-"), checked with its system message as text a
    tokenizer can encode, before a model is loaded."""
    try:
        prompt = sys.stdin.read() if prompt == "-" else prompt
    except UnicodeDecodeError as err:  # a strict stdin; else the bytes become lone surrogates
        raise UsageError(f"stdin is not {err.encoding} text ({err}): pass UTF-8 text") from None
    check_generation_text(prompt, system)
    return prompt


def check_generation_text(prompt: str, system: str | None) -> None:
    """The prompt and system message of `tuneoff generate` as text a tokenizer can encode."""
    for what, text in (("the prompt", prompt), ("--system", system or "")):
        problem = unicode_problem(text)
        if problem:
            raise UsageError(f"{what} is {problem}: pass UTF-8 text")


def generation_prompt_ids(engine: Engine, prompt: str, system: str | None, raw: bool) -> list[int]:
    """The prompt as is (`raw`) or in the chat template after an optional system message."""
    check_generation_text(prompt, system)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    ids = engine.text_ids(prompt) if raw else engine.chat_prompt_ids(messages)
    if not ids:
        raise UsageError("the prompt is empty (--raw adds no template): pass some text")
    if len(ids) >= engine.context:  # as serve refuses it (prompt_too_long)
        raise UsageError(
            f"the prompt has {len(ids)} tokens, at or over the model's context of "
            f"{engine.context}: shorten it"
        )
    return ids
