"""Which weight files a checkpoint's file list holds, and whether they are pickle (refused without the opt-in).

Torch-free: `hf-mudsc inspect RECIPE` refuses a pickle-only parent folder exactly as the loader
(`hf_mudsc.load.parents`) will, without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from hf_mudsc.errors import LoadError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def weights_format(reference: str, files: Sequence[str], allow_pickle: bool) -> tuple[list[str], bool]:
    """The weight files to load and whether they are pickle; refuses pickle-only without the opt-in."""
    names = set(files)
    if SAFETENSORS_SINGLE in names:  # before an index, as `from_pretrained` chooses (lazy.safetensors_files too)
        return [SAFETENSORS_SINGLE], False
    if SAFETENSORS_INDEX in names:
        return [SAFETENSORS_INDEX], False
    pickles = sorted(f for f in names if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise LoadError(
                f"{reference!r} has only pickle weights ({', '.join(pickles[:3])}) and no model.safetensors. "
                "Loading a pickle checkpoint can run arbitrary code hidden in the file. Convert it to "
                "safetensors (e.g. the Hub's convert space), or pass allow_pickle=True (CLI: --allow-pickle) "
                "if you trust its source"
            )
        if PICKLE_SINGLE in names:
            return [PICKLE_SINGLE], True
        if PICKLE_INDEX in names:
            return [PICKLE_INDEX], True
    variants = sorted(f for f in names if f.endswith(".safetensors"))
    raise LoadError(
        f"{reference!r} holds no loadable weights (found {variants or sorted(names)[:10]}); expected "
        f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} as written by save_pretrained"
    )
