"""The values some options take that the layers below the options also read: the matcher names, the magnitudes a
merge weight or factor may have, the `layer_swap` text. A torch-free leaf (it imports `errors` only), so the loader,
the solver and the methods read one definition and `hf_mudsc.options` checks against it without an import cycle."""

from __future__ import annotations

import re

from hf_mudsc.errors import shown

#: The method `method="auto"`'s averaging check holds its merge against and may return (plain averaging of the
#: parents, docs/design.md §4.9): the pipeline builds it, the dry run counts it, `inspect` names it.
AVERAGE_CHECK_METHOD = "linear"

#: How much higher (read by the solve, `solve.loop.choose_start`, and said by `inspect` and the plots;
#: absolute, on the mean-similarity objective in [-1, 1]) another start's final objective must
#: be to replace the activation start's solution. An internal constant, not an option: on different-init pairs the
#: three starts end within 0.004 of each other — a plateau where the higher objective is noise and once cost 12.5
#: points of joint accuracy — while on same-init pairs the weight/identity start wins by 0.08–0.33
#: (docs/research/quality_probe.md §1, §7). Nothing in between was measured, so a user has no basis to tune it;
#: `reference_compat=True` is the switch back to the paper's single start.
MULTISTART_MARGIN = 0.01


def start_margin_note(starts: dict[str, float], kept: str | None) -> str:
    """`the activation start is kept unless another ends more than 0.01 higher` when a start that ended higher than
    the kept one was not kept (`inspect`, the objective plot): the rule that kept the lower one; empty otherwise."""
    if kept not in starts or not any(value > starts[kept] for value in starts.values()):
        return ""
    return f"the {kept} start is kept unless another ends more than {MULTISTART_MARGIN:g} higher"

#: What `auto`'s correspondence check records (`config.mudsc["correspondence_check"]["solved"]`) when the solve's first
#: start alone settled it (`hf_mudsc.methods.auto`); the key is absent when the solve ran.
CHECK_FIRST_START = "first start"
#: How the log line that says so begins (the service's progress marks the solve's end by it).
CHECK_NEEDS_NO_SOLVE = "the correspondence check needs no solve:"


def check_solved_by(checker: str, record: object = None, *, first_start: bool = False) -> str:
    """How a correspondence check's share is named in `auto`'s reason, the log and `inspect` (`checker`: the method's
    name): "mudsc's solve", or, when its first start decided alone (`first_start`, or a record saying so), "mudsc's
    activation-only zip start"."""
    if first_start or (isinstance(record, dict) and record.get("solved") == CHECK_FIRST_START):
        return f"{checker}'s activation-only zip start"
    return f"{checker}'s solve"


#: Valid values of `matcher` (``match(..., matcher=...)``); ``num_heads > 1`` selects the group variant of each.
MATCHERS: tuple[str, ...] = ("align", "zip")

#: The magnitudes a non-zero merge weight may have: the merge runs in float32 (about 1e-38 to 3e38).
WEIGHT_RANGE = (1e-30, 1e30)
#: The largest magnitude of a factor on task vectors (`scaling`, and weights not divided by their sum) or of the
#: TALL-mask threshold (`consensus_lambda`): task arithmetic picks lambda in [0, 1] (Ilharco et al. 2023; -1 negates a
#: task), TALL masks lambda in [0.2, 0.6] (Wang et al. 2024; FusionBench's default 0.6). A task vector scaled 100-fold
#: is no merge of these parents (at 1e30 the weights were 3e29, at 1e308 inf), and a threshold of 100 already keeps
#: almost nothing (the merge is the base).
FACTOR_LIMIT = 100.0
#: The smallest magnitude of the weights' sum a normalising method divides by: mergekit 0.1.5 replaces a divisor
#: below it by 1 (`generalized_task_arithmetic`: `divisor[divisor.abs() < 1e-8] = 1`), silently leaving the weights
#: unnormalised; a merge asked to normalise refuses such weights instead (docs/design.md §4.10).
WEIGHT_SUM_FLOOR = 1e-8
#: The most encoder blocks a model may have here (the largest transformers have a few hundred): a range past it
#: is refused before it is expanded into one entry per block.
MAX_BLOCKS = 10_000
#: `layer_swap` text: comma-separated `parent:first-last` (or `parent:block`) items, blocks counted from 0.
LAYER_SWAP_ITEM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layer_swap(text: str) -> dict[int, int]:
    """`"1:0-5,2:9"` -> {block: parent} ({0: 1, ..., 5: 1, 9: 2}); raises ValueError naming the bad item.

    Blocks not listed come from parent 0 (so do the embeddings, final norms and head); a block listed twice is
    refused, since it could come from only one parent."""
    blocks: dict[int, int] = {}
    items = [item for item in text.split(",")]
    if not text.strip():
        raise ValueError("it is empty; give items like '1:0-5' (parent 1's blocks 0 to 5)")
    for item in items:
        found = LAYER_SWAP_ITEM.match(item)
        if found is None:
            raise ValueError(f"item {shown(item.strip())} is not 'parent:first-last' or 'parent:block' (e.g. '1:0-5')")
        parent, first = int(found.group(1)), int(found.group(2))
        last = int(found.group(3)) if found.group(3) is not None else first
        if last < first:
            raise ValueError(f"item {shown(item.strip())} has its last block before its first")
        if last >= MAX_BLOCKS:
            raise ValueError(f"item {shown(item.strip())} reaches block {shown(last)}; models have at most "
                             f"{MAX_BLOCKS} blocks (counted from 0)")
        for block in range(first, last + 1):
            if block in blocks:
                raise ValueError(f"block {block} is listed twice ({blocks[block]} and {parent}); each block "
                                 "comes from one parent")
            blocks[block] = parent
    return blocks
