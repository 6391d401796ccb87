"""Processors (tokenizers, image processors) of parents: found in their folders or cached Hub snapshots, compared.

Their files are read under the weights' rule for symbolic links (`load.links`): none may lead out of the folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from hf_mudsc.errors import LoadError, parent_label
from hf_mudsc.load.links import refuse_links_out
from hf_mudsc.load.references import parse_reference

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)
# A tokenizer is read only when one of these holds its vocabulary: from `tokenizer_config.json` alone transformers
# builds a tokenizer of its special tokens, which reads every word as [UNK].
VOCABULARY_FILES = tuple(name for name in TOKENIZER_FILES if name != "tokenizer_config.json")


IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")


PROCESSOR_FILES = ("processor_config.json",)


def load_processor(folder: str | os.PathLike, reference: str | None = None) -> Any | None:
    """The folder's processor (AutoProcessor when it holds each kind the folder has and its model reads, else the
    image processor, else the tokenizer), None if it has none.

    Gated on the files being present: transformers 5 happily builds an empty tokenizer from a bare
    config.json (or a `tokenizer_config.json` without a vocabulary file), which would silently tokenize everything
    to [UNK]. A folder linking a file out of itself is refused
    first (`load.links`, the weights' rule), naming the model as `reference` (default: the folder).
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    refuse_links_out(reference or str(folder), folder)
    has = {name for name in os.listdir(folder)}
    has_processor = bool(has & set(PROCESSOR_FILES))
    has_image = bool(has & set(IMAGE_PROCESSOR_FILES))
    has_tokenizer = bool(has & set(VOCABULARY_FILES))
    reads_images, reads_text = _inputs_read(folder)
    candidates = []
    if has_processor or (has_image and has_tokenizer):
        candidates.append(AutoProcessor)
    if has_image and (reads_images or not (has_tokenizer and reads_text)):
        candidates.append(AutoImageProcessor)
    if has_tokenizer:
        candidates.append(AutoTokenizer)
    for cls in candidates:
        try:
            found = cls.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RecursionError) as error:
            logger.debug("%s could not load from %s: %s", cls.__name__, folder, error)
            continue
        # AutoProcessor falls back to one kind for a model type without a processor class (a CLIP vision tower saved
        # with the CLIP tokenizer files gets the tokenizer; a text tower with a preprocessor_config.json the image
        # processor): the kind the model reads (its config) would be lost, and with it the merged folder's.
        if cls is AutoProcessor and ((has_image and reads_images and image_processor_of(found) is None)
                                     or (has_tokenizer and reads_text and tokenizer_of(found) is None)):
            logger.debug("AutoProcessor gave %s for %s, whose model reads another kind; reading it alone",
                         type(found).__name__, folder)
            continue
        return found
    return None


#: Tokenizer files that are sentencepiece models: transformers reads them only with the `sentencepiece` library
#: (converting them to a `tokenizers` backend) when the folder has no `tokenizer.json`.
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def unreadable_tokenizer(folder: str | os.PathLike, reference: str | None = None) -> str | None:
    """Why the folder's tokenizer cannot be read, or None: its only tokenizer files are sentencepiece models
    (XLM-RoBERTa, CamemBERT, T5 fine-tunes saved before `tokenizer.json`) and `sentencepiece` is not installed.
    `load_processor` then gives None, as for a folder shipping no tokenizer; the reason is said only where raw text
    must be tokenized with no `processor=` given (`pipeline.check_calibration_before_weights`, before any weights):
    a merge that needs no tokenizer (no data, a given processor, a base's) is not refused for it."""
    try:
        files = set(os.listdir(folder))
    except OSError:
        return None
    models = [name for name in SENTENCEPIECE_FILES if name in files]
    if not models or files & {"tokenizer.json", "vocab.txt", "vocab.json"}:
        return None
    try:
        import sentencepiece  # noqa: F401 - only whether it is installed
    except ImportError:
        return (f"{reference or str(folder)!r} ships its tokenizer as {models[0]} (a sentencepiece model, no "
                "tokenizer.json), which transformers reads only with the sentencepiece library: install it (pip "
                "install sentencepiece), pass processor=, or save the tokenizer once as tokenizer.json where it is "
                "installed (AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    return None


# The longest file name most file systems take, in bytes (a chat template is saved as `NAME.jinja`).
FILE_NAME_MAX_BYTES = 255


def refuse_unsavable_chat_templates(owner: str, processor: Any) -> None:
    """Refuse the processor a merged model's folder will save (`owner`: whose it is, as the message starts) when its
    chat templates (`tokenizer_config.json`'s list of `{name, template}`) include one whose name is no file name — a
    path (`../../x`, `tools/x`) or over `FILE_NAME_MAX_BYTES` — before any weights are read: the folder saves each
    as `additional_chat_templates/NAME.jinja`, which transformers refuses for a path and the file system for a long
    name, so the merge failed only when it was written. Only the processor saved is checked (parent A's, or the one
    given to the writer): another parent's, the base's or an evaluated model's is never written."""
    for part, holder, source in (("tokenizer", tokenizer_of(processor), "tokenizer_config.json"),
                                 ("processor", processor, "chat_template.json")):
        templates = getattr(holder, "chat_template", None)
        if not isinstance(templates, dict):
            continue
        for name in templates:
            text = str(name)
            # a backslash is a file name on POSIX, and transformers saves it: only a name resolving elsewhere fails
            if ("/" in text or "\x00" in text
                    or len(f"{text}.jinja".encode("utf-8", "surrogateescape")) > FILE_NAME_MAX_BYTES):
                shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
                raise LoadError(
                    f"{owner}: its {part} names a chat template {shown}, no file name (a path, or over "
                    f"{FILE_NAME_MAX_BYTES} bytes), so the merged model could not be saved; rename it in "
                    f"{source} (chat_template)")


def _inputs_read(folder: Path) -> tuple[bool, bool]:
    """(images, text): what the folder's model reads, by its config.json (an image size or vision config; a vocabulary
    or text config); both when the config cannot be read."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True, True
    if not isinstance(config, dict):
        return True, True
    images = "image_size" in config or "vision_config" in config
    text = "vocab_size" in config or "text_config" in config
    return (images, text) if images or text else (True, True)


def processor_from_name(name_or_path: str, commit_sha: str | None = None) -> Any | None:
    """The processor saved with a model object: in its `name_or_path` folder, or in the locally cached snapshot
    of its Hub id (at `commit_sha` when known). Local files only — never a download, never remote code; None
    when there is nothing to find (e.g. a model built from a config)."""
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    if not name_or_path:
        return None
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        try:
            repo_id, revision = parse_reference(name_or_path)
            validate_repo_id(repo_id)
            folder = Path(snapshot_download(repo_id, revision=commit_sha or revision, local_files_only=True))
        except (LoadError, ValueError, OSError, errors.LocalEntryNotFoundError) as error:
            logger.debug("no cached processor for %s: %s", name_or_path, error)
            return None
    processor = load_processor(folder, name_or_path)
    if processor is not None:
        logger.info("using the processor saved with %s", name_or_path)
    return processor


def tokenizer_of(processor: Any) -> Any | None:
    """The tokenizer inside a processor (or the processor itself when it is one)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(processor, PreTrainedTokenizerBase):
        return processor
    tokenizer = getattr(processor, "tokenizer", None)
    return tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None


def image_processor_of(processor: Any) -> Any | None:
    """The image processor inside a processor (or the processor itself when it is one)."""
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(processor, ImageProcessingMixin):
        return processor
    image_processor = getattr(processor, "image_processor", None)
    return image_processor if isinstance(image_processor, ImageProcessingMixin) else None


def _runs_alike(settings: dict[str, Any]) -> dict[str, Any]:
    """A processor's serialised settings without those naming remote code (`auto_map`, `custom_pipelines`): the
    merged folder is written without them (`publish.writer.drop_remote_code_pointers`) and they change nothing in how
    the processor preprocesses, so processors differing only in them are alike."""
    from hf_mudsc.load.checks import REMOTE_CODE_CONFIG_KEYS  # here: torch stays unimported for `inspect`

    return {key: value for key, value in settings.items() if key not in REMOTE_CODE_CONFIG_KEYS}


def image_processor_differences(processors: Sequence[Any]) -> list[str]:
    """The settings (`image_mean`, `size`, ...) in which another parent's image processor differs from parent A's:
    the merged model ships parent A's, so the other parents' tasks are served with its preprocessing."""
    present = [image_processor_of(p) for p in processors if p is not None]
    present = [_runs_alike(p.to_dict()) for p in present if p is not None]
    if len(present) < 2:
        return []
    first = present[0]
    return sorted({key for other in present[1:] for key in set(first) | set(other)
                   if key != "processor_class" and first.get(key) != other.get(key)})


#: How `tokenizer_differences` names a tokenizer's settings (the others by their own name).
_TOKENIZER_ASPECTS = {"model_max_length": "max length (model_max_length)", "padding_side": "padding side",
                      "truncation_side": "truncation side"}
#: Backend (`tokenizer.json`) sections compared as a whole; the normaliser's lower-casing is named apart.
_BACKEND_SECTIONS = {"normalizer": "normaliser", "pre_tokenizer": "pre-tokenizer",
                     "post_processor": "post-processor (special tokens added)", "decoder": "decoder"}


def _lowercases(normalizer: Any) -> bool:
    """Whether a serialised `tokenizers` normaliser lower-cases (BertNormalizer's `lowercase`, `Lowercase`, nested
    in a `Sequence`)."""
    if not isinstance(normalizer, dict):
        return False
    if normalizer.get("type") == "Lowercase" or normalizer.get("lowercase") is True:
        return True
    return any(_lowercases(inner) for inner in normalizer.get("normalizers") or [])


def _without_lowercase(section: Any) -> Any:
    """A serialised backend section without its lower-casing (said apart as "lower-casing")."""
    if isinstance(section, dict):
        return {k: _without_lowercase(v) for k, v in section.items() if k != "lowercase"}
    if isinstance(section, list):
        return [_without_lowercase(v) for v in section if not (isinstance(v, dict) and v.get("type") == "Lowercase")]
    return section


def _tokenizing_class(cls: type) -> type:
    """The class whose code tokenizes for `cls`: a transformers subclass whose own code is only `__init__` and class
    settings (DistilBertTokenizer: BertTokenizer without token_type_ids, its default lower-casing) tokenizes as its
    base does; what its settings change is compared on its own (the model inputs, lower-casing, the backend). Only
    classes of `transformers.models` are read so: a user's subclass may tokenize otherwise from its `__init__`
    (setting `split_special_tokens`), and stays itself."""
    while cls.__module__.startswith("transformers.models."):
        own_code = [name for name, value in vars(cls).items()
                    if name != "__init__" and (callable(value) or isinstance(value, (staticmethod, classmethod,
                                                                                       property)))]
        base = cls.__mro__[1] if len(cls.__mro__) > 1 else object
        if own_code or base is object or not hasattr(base, "get_vocab") or base.__module__.startswith(
                "transformers.tokenization_"):
            return cls
        cls = base
    return cls


def _tokenizer_aspects(tokenizer: Any, reads: Collection[str] | None = None) -> dict[str, str]:
    """A tokenizer's settings by the name `tokenizer_differences` gives them, each serialised for comparison;
    `reads`: the inputs the model reads (its model inputs are compared among those only), None for all."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = json.loads(backend.to_str()) if backend is not None else {}
    named_apart = (*_LOCATION_KEYS, *_TOKENIZER_ASPECTS, "do_lower_case", "added_tokens_decoder", "model_input_names")
    settings = {k: v for k, v in _runs_alike(tokenizer.init_kwargs).items()
                if k not in named_apart and not k.endswith("_file")}
    inputs = list(getattr(tokenizer, "model_input_names", None) or [])
    aspects: dict[str, Any] = {
        "class": _tokenizing_class(type(tokenizer)).__name__,
        "model inputs (model_input_names)": [n for n in inputs if reads is None or n in reads],
        "lower-casing": bool(tokenizer.init_kwargs.get("do_lower_case")) or _lowercases(serialised.get("normalizer")),
        "vocabulary": sorted(tokenizer.get_vocab().items()),
        **{name: getattr(tokenizer, key, None) for key, name in _TOKENIZER_ASPECTS.items()},
        **{name: _without_lowercase(serialised.get(key)) for key, name in _BACKEND_SECTIONS.items()},
        **settings,
    }
    return {name: json.dumps(value, sort_keys=True, default=str) for name, value in aspects.items()}


def tokenizer_differences(processors: Sequence[Any], reads: Collection[str] | None = None) -> list[str]:
    """What differs between another parent's tokenizer and parent A's (`lower-casing`, `vocabulary`, `max length
    (model_max_length)`, a setting's name, ...): the merged model ships parent A's, so the other parents' tasks are
    served with its tokenization — said like differing image processors (`diagnostics.processor_warning`).
    `reads`: the inputs the model the tokenizers feed takes (`calibrate.layer_inputs.model_input_names`): an input it
    never takes (DistilBERT and `token_type_ids`) is no difference; None (or none named) compares every input."""
    present = [tokenizer_of(p) for p in processors if p is not None]
    present = [_tokenizer_aspects(t, reads or None) for t in present if t is not None]
    if len(present) < 2:
        return []
    first = present[0]
    return sorted({name for other in present[1:] for name in set(first) | set(other)
                   if first.get(name) != other.get(name)})


#: What a model reads (`PermutationSpec.inputs`) -> the processor part that prepares it, and how a message names both.
_PARTS = (("input_ids", "tokenizer", "text", tokenizer_of), ("pixel_values", "image processor", "images",
                                                                image_processor_of))


def missing_part_warning(processors: Sequence[Any], inputs: Collection[str]) -> str | None:
    """The warning when parent A's processor (the one the merged model is saved with) lacks a part the model reads —
    a CLIP parent saved with its image processor only: the merged folder gets no tokenizer, and transformers then
    builds one of the special tokens alone (every word one token), so `pipeline(...)` on it scores every label alike;
    the fix names a parent that ships the part. None when A's has every part, or has no processor at all
    (`processor_note` says that)."""
    first = processors[0] if processors else None
    if first is None:
        return None
    for column, part, what, part_of in _PARTS:
        if column not in inputs or part_of(first) is not None:
            continue
        holder = next((i for i, p in enumerate(processors) if p is not None and part_of(p) is not None), None)
        fix = (f"add parent {parent_label(holder)}'s to the merged folder (its {part} files, e.g. "
               f"{'AutoTokenizer' if part == 'tokenizer' else 'AutoImageProcessor'}.from_pretrained(that parent)"
               ".save_pretrained(folder))" if holder is not None else
               f"no parent ships one: add the {part} the parents were fine-tuned with to the merged folder")
        effect = ("transformers then builds one of the special tokens alone, which reads every word as one token"
                  if part == "tokenizer" else "loading an image processor from its folder fails")
        return (f"parent A's processor has no {part}, so the merged model is saved without one though it reads "
                f"{what} ({effect}); {fix}")
    return None


def processor_note(processors: Sequence[Any], given: Any = None, preprocessed: bool = False) -> str | None:
    """What the card says of the processor when parent A has none (so none is saved with the merged model) but the
    merge had one: another parent's, or `given` (merge()'s `processor=`); `preprocessed`: it preprocessed raw
    calibration columns. None when parent A has one, or when no processor was at hand at all."""
    if not processors or processors[0] is not None:
        return None
    index = next((i for i, p in enumerate(processors) if p is not None), None)
    if given is not None:
        used = "the processor passed to merge()"
    elif index is not None:
        used = f"parent {parent_label(index)}'s"
    else:
        return None
    if preprocessed:
        return f"parent A has none, and {used} preprocessed the raw calibration data"
    return f"parent A has none ({used} is not saved with it either)"


#: Tokenizer settings that name where its files were read from, not how it tokenizes.
_LOCATION_KEYS = ("name_or_path", "_commit_hash")


def processor_fingerprint(processor: Any) -> str:
    """A processor's serialised settings: equal fingerprints preprocess alike, so evaluation runs one of them.

    The image processor's `to_dict()`; a tokenizer's class, its backend serialised (`tokenizer.json`: the
    normaliser such as lower-casing, the vocabulary) or else its vocabulary, and its settings, without the paths it
    was read from (two copies of one tokenizer in two folders are one processor)."""
    if processor is None:
        return "null"
    parts: dict[str, Any] = {"class": type(processor).__name__}
    image = image_processor_of(processor)
    if image is not None:
        parts["image"] = {k: v for k, v in _runs_alike(image.to_dict()).items() if k != "processor_class"}
    tokenizer = tokenizer_of(processor)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        settings = {k: v for k, v in _runs_alike(tokenizer.init_kwargs).items()
                    if k not in _LOCATION_KEYS and not k.endswith("_file")}
        parts["tokenizer"] = {
            "class": type(tokenizer).__name__, "settings": settings,
            "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
            "model_max_length": tokenizer.model_max_length, "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
        }
    if image is None and tokenizer is None:
        to_dict = getattr(processor, "to_dict", None)
        parts["settings"] = to_dict() if callable(to_dict) else repr(processor)
    return json.dumps(parts, sort_keys=True, default=str)
