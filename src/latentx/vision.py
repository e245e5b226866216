"""Vision-language policies: the built-in ``tiny-vl`` model, loading VLMs, images and their batches.

A VLM policy is handled as a causal LM whose prompts carry images.  Everything text-only code needs keeps
working on the *tokenizer* :func:`latentx.models.load_model` returns; a VLM's tokenizer also carries its
processor (:func:`processor_of`), which turns ``(prompt, images)`` into token ids with the image
placeholders expanded plus the vision tensors (:func:`encode_prompts`).

The vision tensors of a prompt travel as its row of ``extra_inputs`` through the one generation core
(:func:`latentx.rollout.sample_responses`) and :class:`latentx.rollout.Sequences`: its slice of
``pixel_values`` (its patch rows), ``image_grid_thw`` (its images' grid sizes) and its
``mm_token_type_ids`` (Qwen's marker of image tokens, from which the model builds its 3-D rope
positions).  Repeating a prompt R times or selecting a micro-batch is list indexing; a forward
concatenates the rows it needs.  Image tokens only sit in the prompt, so the response layout of
:mod:`latentx.rollout` is unchanged; the forward passes ``mm_token_type_ids`` (response columns 0) and
*no* ``position_ids``, letting the model compute its multimodal positions as ``generate`` does (a batched
forward then reproduces ``generate``'s log-probs; text positions from the mask would be off by ~1e-2 on
ragged batches).  The image placeholder ids are suppressed in sampling and in the forward's
distribution (:func:`suppressed_token_ids`): a sampled placeholder would have no image features behind it.

Built-in ``tiny-vl``: a Qwen2.5-VL with the tiny model's text sizes (hidden 64, 2 layers, 4 / 2 heads,
``mrope_section`` [4, 2, 2]) and a 2-block vision tower (hidden 32, output 64), about 0.22 M parameters,
over the character tokenizer plus Qwen's vision tokens, with ``Qwen2VLImageProcessorPil`` at fixed
min / max pixels (one 28 x 28 cell = one image token after the 2 x 2 merge).  The stock
``Qwen2_5_VLProcessor`` insists on a video processor, which imports torchvision; :class:`TinyVLProcessor`
is the same processor without one.  Saved directories reload with ``AutoModelForImageTextToText`` and an
explicitly chosen processor class (``AutoProcessor`` on such a directory silently returns a tokenizer).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from latentx.models import TinyModelConfig

__all__ = [
    "TINY_VL_SPEC",
    "VISION_TOKENS",
    "IMAGE_MARKER",
    "TinyVLConfig",
    "TinyVLProcessor",
    "build_tiny_vl_model",
    "has_vision_config",
    "load_vision_model",
    "load_processor",
    "attach_processor",
    "processor_of",
    "is_vision_model",
    "require_vision",
    "open_image",
    "image_placeholder",
    "vision_content",
    "format_vision_prompt",
    "TOKEN_FIELDS",
    "encode_images",
    "encode_one",
    "encode_prompts",
    "save_tokenizer",
    "task_images",
    "suppressed_token_ids",
]

TINY_VL_SPEC = "tiny-vl"
# Qwen2-VL's vision tokens, in Qwen's own order (start, end, image, video); ids follow the char vocabulary.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Where a task's prompt text places an image (Geometry3K / verl style); prompts without it get the images
# in front of the text.
IMAGE_MARKER = "<image>"
_PROCESSOR_ATTR = "latentx_processor"
# tiny-vl's (processor-only) chat template: the turns' text and image placeholders, no role markers, so a
# conversational prompt renders exactly as the plain one (what TRL's multimodal path needs).
TINY_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}"
    "<|vision_start|><|image_pad|><|vision_end|>{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)
# Per-token fields of a processor's output: left-padded with the prompt, extended over the response with 0.
TOKEN_FIELDS = ("mm_token_type_ids", "token_type_ids")


# --------------------------------------------------------------------------------------------------
# the built-in tiny VLM
# --------------------------------------------------------------------------------------------------


@dataclass
class TinyVLConfig(TinyModelConfig):
    """Sizes of the built-in ``tiny-vl`` model: the text part of :class:`latentx.models.TinyModelConfig`,
    plus Qwen's multimodal rope split, the vision tower and the image processor's pixel bounds."""

    mrope_section: tuple[int, int, int] = (4, 2, 2)
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    min_pixels: int = 28 * 28
    max_pixels: int = 28 * 28 * 16

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vision_depth", "vision_hidden_size", "vision_heads", "vision_intermediate_size",
                     "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tiny_model.{name} must be a positive integer, got {value!r}")
        head_dim = self.hidden_size // self.num_attention_heads
        self.mrope_section = tuple(int(v) for v in self.mrope_section)
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != head_dim:
            raise ValueError(
                f"tiny_model.mrope_section must be 3 integers summing to head_dim/2 = {head_dim // 2}, "
                f"got {list(self.mrope_section)}"
            )
        if self.vision_hidden_size % self.vision_heads or (self.vision_hidden_size // self.vision_heads) % 4:
            raise ValueError("tiny_model.vision_hidden_size / vision_heads must be a multiple of 4")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"tiny_model.min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")


def _processor_class():
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    return Qwen2_5_VLProcessor


def _make_tiny_processor_class():
    base = _processor_class()

    class TinyVLProcessor(base):  # type: ignore[misc, valid-type]
        """``Qwen2_5_VLProcessor`` for images only: no video processor (torchvision-free)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    TinyVLProcessor.__module__ = __name__
    return TinyVLProcessor


_TINY_PROCESSOR: type | None = None


def _tiny_processor_class() -> type:
    global _TINY_PROCESSOR
    if _TINY_PROCESSOR is None:
        _TINY_PROCESSOR = _make_tiny_processor_class()
    return _TINY_PROCESSOR


def __getattr__(name: str):  # ``from latentx.vision import TinyVLProcessor`` builds the class on demand
    if name == "TinyVLProcessor":
        return _tiny_processor_class()
    raise AttributeError(name)


def build_tiny_vl_model(seed: int = 0, **overrides):
    """The built-in ``tiny-vl`` policy: ``(model, tokenizer)`` with the processor attached to the tokenizer.

    Initialised deterministically from ``seed`` (the global torch RNG is left untouched); ``overrides``
    are :class:`TinyVLConfig` fields.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from latentx.models import build_char_tokenizer

    unknown = set(overrides) - set(TinyVLConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown tiny-vl option(s) {sorted(unknown)}; known: {sorted(TinyVLConfig.__dataclass_fields__)}")
    cfg = TinyVLConfig(**overrides)
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "mrope_section": list(cfg.mrope_section)},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_intermediate_size, out_hidden_size=cfg.hidden_size,
            fullatt_block_indexes=[cfg.vision_depth - 1], window_size=56,
        ),
        vision_start_token_id=start, vision_end_token_id=end, image_token_id=image, video_token_id=video,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config.latentx_tiny_vl = asdict(cfg) | {"seed": int(seed), "mrope_section": list(cfg.mrope_section)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    processor = _tiny_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=TINY_VL_CHAT_TEMPLATE)
    return model, attach_processor(tokenizer, processor)


# --------------------------------------------------------------------------------------------------
# loading VLMs
# --------------------------------------------------------------------------------------------------


def has_vision_config(where: str | os.PathLike) -> bool:
    """Whether the model at ``where`` (a directory or hub id) is a VLM: its config has ``vision_config``."""
    from transformers import AutoConfig

    config_file = Path(where) / "config.json"
    if config_file.is_file():
        import json

        try:
            return "vision_config" in json.loads(config_file.read_text())
        except (OSError, ValueError):
            return False
    try:
        return getattr(AutoConfig.from_pretrained(str(where)), "vision_config", None) is not None
    except (OSError, ValueError):
        return False


def load_processor(where: str | os.PathLike, trust_remote_code: bool = False):
    """The processor of the VLM at ``where``.

    Qwen2-VL-family directories load as :class:`TinyVLProcessor` when the stock class cannot (it imports
    torchvision for its video processor); others through ``AutoProcessor``.  Raises ``ValueError`` when
    no processor with an image processor is found.
    """
    import json

    from transformers import AutoProcessor, ProcessorMixin

    config_file = Path(where) / "config.json"
    model_type = ""
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    processor = None
    errors = []
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        import importlib.util

        if importlib.util.find_spec("torchvision") is None or "latentx_tiny_vl" in json.loads(config_file.read_text()):
            try:
                processor = _tiny_processor_class().from_pretrained(str(where))
            except (OSError, ValueError, TypeError) as error:
                errors.append(str(error))
    if processor is None:
        try:
            processor = AutoProcessor.from_pretrained(str(where), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError, ImportError) as error:
            errors.append(str(error))
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        detail = f" ({errors[-1].splitlines()[0]})" if errors else ""
        raise ValueError(f"model {where}: has a vision_config but no image processor could be loaded{detail}")
    return processor


def load_vision_model(where: str, model_kwargs: dict[str, Any], trust_remote_code: bool = False):
    """``(model, tokenizer)`` of the VLM at ``where`` via ``AutoModelForImageTextToText`` and its processor."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(where, **model_kwargs)
    processor = load_processor(where, trust_remote_code=trust_remote_code)
    return model, attach_processor(processor.tokenizer, processor)


def attach_processor(tokenizer, processor):
    """Let ``tokenizer`` carry its VLM ``processor`` (returned by :func:`processor_of`)."""
    setattr(tokenizer, _PROCESSOR_ATTR, processor)
    return tokenizer


def processor_of(tokenizer):
    """The VLM processor a tokenizer carries, or None for a text-only policy."""
    return getattr(tokenizer, _PROCESSOR_ATTR, None)


def is_vision_model(model) -> bool:
    """Whether ``model`` (possibly wrapped) has a vision tower: its config has ``vision_config``."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def require_vision(tokenizer, what: str) -> Any:
    """The processor of ``tokenizer``, or a one-line error saying that ``what`` needs a VLM."""
    processor = processor_of(tokenizer)
    if processor is None:
        raise ValueError(
            f"{what} has images but the model has no vision tower (use --model tiny-vl or a vision-language "
            f"model whose config has a vision_config)"
        )
    return processor


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def open_image(ref: Any, where: str = "image", root: str | os.PathLike | None = None):
    """A PIL RGB image from ``ref``: a PIL image, raw bytes, a ``{"bytes": ..., "path": ...}`` dict (the
    Hugging Face ``Image`` feature's Parquet layout) or a file path (relative paths resolve against
    ``root``).  ``where`` names the row in the one-line error for a missing or unreadable image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):
        data = ref.get("bytes")
        ref = data if data else ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(ref))) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"{where}: image bytes are not a readable image ({error})") from None
    if isinstance(ref, (str, os.PathLike)) and str(ref):
        path = Path(ref).expanduser()
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if not path.is_file():
            raise ValueError(f"{where}: image file {str(path)!r} not found")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"{where}: image file {str(path)!r} is not a readable image ({error})") from None
    raise ValueError(f"{where}: expected an image path, image bytes or a PIL image, got {type(ref).__name__}")


def image_placeholder(processor) -> str:
    """The text standing for one image in a plain (non-chat) prompt of this processor's model."""
    tokenizer = processor.tokenizer
    token = getattr(processor, "image_token", None) or IMAGE_MARKER
    vocab = tokenizer.get_vocab()
    if VISION_TOKENS[0] in vocab and VISION_TOKENS[1] in vocab and token == VISION_TOKENS[2]:
        return f"{VISION_TOKENS[0]}{token}{VISION_TOKENS[1]}"
    return token


def vision_content(text: str, n_images: int, where: str = "prompt") -> list[dict]:
    """One chat turn's content parts for ``text`` with ``n_images`` images: ``{"type": "image"}`` at each
    ``<image>`` marker (their number must equal ``n_images``), or all images before the text when it has
    none, and ``{"type": "text", ...}`` for the text between them (the layout of chat templates and TRL)."""
    markers = text.count(IMAGE_MARKER)
    if markers and markers != n_images:
        raise ValueError(f"{where}: the text has {markers} {IMAGE_MARKER} placeholder(s) but {n_images} image(s)")
    parts = re.split(re.escape(IMAGE_MARKER), text) if markers else [""] * n_images + [text]
    content: list[dict] = []
    for i, part in enumerate(parts):
        if markers and i > 0 or not markers and i < n_images:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return content


def format_vision_prompt(tokenizer, text: str, n_images: int, chat: bool, system: str | None = None,
                         where: str = "prompt") -> str:
    """The prompt text with ``n_images`` image placeholders for ``tokenizer``'s VLM.

    ``<image>`` markers in ``text`` place the images (their number must equal ``n_images``); without
    markers the images go before the text.  ``chat`` renders one user turn with the processor's (or the
    tokenizer's) chat template.
    """
    processor = require_vision(tokenizer, where)
    markers = text.count(IMAGE_MARKER)
    if chat:
        content = vision_content(text, n_images, where)
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
        messages.append({"role": "user", "content": content})
        template_owner = processor if getattr(processor, "chat_template", None) else tokenizer
        if getattr(template_owner, "chat_template", None) is None:
            raise ValueError(f"{where}: task.options.chat is true but the model's processor has no chat template")
        return template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision_content(text, n_images, where)  # checks the marker count
    placeholder = image_placeholder(processor)
    if markers:
        return text.replace(IMAGE_MARKER, placeholder)
    return placeholder * n_images + text


# --------------------------------------------------------------------------------------------------
# batches of vision inputs
# --------------------------------------------------------------------------------------------------


def suppressed_token_ids(model) -> tuple[int, ...]:
    """Token ids a VLM policy must never sample: its image (and video) placeholders (from its config);
    empty for a text-only model."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None:
        return ()
    ids = set()
    for name in ("image_token_id", "video_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ids.add(value)
    return tuple(sorted(ids))


def encode_one(tokenizer, prompt: str, images: Sequence[Any], add_special_tokens: bool = True,
               where: str = "prompt") -> tuple[list[int], dict[str, torch.Tensor]]:
    """One prompt with its images through the processor: ``(ids, row)`` where ``row`` holds its vision
    tensors (``pixel_values`` patch rows, ``image_grid_thw``, ...) and its per-token fields (``[1, L]``):
    the per-row ``extra_inputs`` of :func:`latentx.rollout.sample_responses`.

    The prompt must hold exactly as many image placeholders as it has images (one-line error otherwise).
    """
    processor = require_vision(tokenizer, where)
    image_token = getattr(processor, "image_token", None) or IMAGE_MARKER
    placeholders = prompt.count(image_token)
    if placeholders != len(images):
        raise ValueError(
            f"{where}: {len(images)} image(s) but {placeholders} image placeholder(s) ({image_token!r}) in its text"
        )
    pics = [open_image(ref, where=where) for ref in images]
    enc = processor(text=[prompt], images=pics or None, return_tensors="pt", add_special_tokens=add_special_tokens)
    row = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
    return enc["input_ids"][0].tolist(), row


def encode_images(tokenizer, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                  add_special_tokens: bool = True) -> tuple[list[list[int]], list[dict[str, torch.Tensor]]]:
    """:func:`encode_one` for every prompt (errors name the prompt's position)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts")
    pairs = [encode_one(tokenizer, text, refs, add_special_tokens, where=f"prompt {i}")
             for i, (text, refs) in enumerate(zip(prompts, images))]
    return [ids for ids, _ in pairs], [row for _, row in pairs]


def encode_prompts(tokenizer, prompts: Sequence[str], images: Sequence[Sequence[Any]], add_special_tokens: bool = True):
    """``(input_ids, attention_mask, rows)`` of ``prompts`` left-padded to one length, ``rows`` their extra
    inputs (for a direct ``generate`` / forward: ``latentx.rollout._stack_extra(rows, device, P)``)."""
    encoded, rows = encode_images(tokenizer, prompts, images, add_special_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    return input_ids, mask, rows


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(directory)``, plus its processor for a VLM (so the directory reloads)."""
    tokenizer.save_pretrained(directory)
    processor = processor_of(tokenizer)
    if processor is not None:
        processor.save_pretrained(directory)


def task_images(task, instances) -> list[list] | None:
    """``task.images(inst)`` for every instance, or None when none has an image (a text-only task)."""
    images = [list(task.images(inst)) for inst in instances]
    return images if any(images) else None


class _BlankImages:
    """A task whose images are replaced by white ones of the same sizes (everything else delegated)."""

    def __init__(self, task) -> None:
        self._task = task
        self.name = f"{task.name} (no image)"

    def __getattr__(self, name: str):
        return getattr(self._task, name)

    def images(self, instance) -> list:
        from PIL import Image

        return [Image.new("RGB", open_image(ref, where=f"instance {instance.id}").size, "white")
                for ref in self._task.images(instance)]

    def format_prompt(self, instance, tokenizer) -> str:
        return self._task.format_prompt(instance, tokenizer)

    def reward(self, instance, response: str) -> float:
        return self._task.reward(instance, response)

    def is_correct(self, instance, response: str) -> bool:
        return self._task.is_correct(instance, response)


def blank_images(task):
    """``task`` with every image blanked: the image-blind control (prompts, rewards and sizes unchanged)."""
    return _BlankImages(task)
