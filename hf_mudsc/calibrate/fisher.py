"""The diagonal Fisher information of a classifier on calibration data, without labels (Fisher merging's weights).

Matena & Raffel (2022, "Merging Models with Fisher-Weighted Averaging", arXiv:2111.09832, §2 and their reference
code `model_merging/fisher.py`): for each example x, the expectation over the model's OWN predictive distribution

    F(x) = Σ_c p(c|x) (∂ log p(c|x) / ∂θ)²        (exact over the classes; no labels needed)

and F = the mean of F(x) over the examples. Per-example gradients are needed (the square comes before the sum over
examples); they are taken one example at a time, one backward per class with the graph kept. Measured on the tiny
test models, `torch.func.vmap` over examples is no faster and fails on BERT (its attention-mask preparation is
data-dependent control flow), so the plain loop it is.

FusionBench's variant differs (docs/research/same_base_facts.md §7): it squares the gradient of a whole batch's
√p-weighted log-likelihood sum, so cross-example terms enter; this module implements the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_mudsc.calibrate.layer_inputs import batch_to, run_forward
from hf_mudsc.errors import MergeInputError
from hf_mudsc.load.checks import is_multi_label_head, is_regression_head
from hf_mudsc.progress import Progress


def no_head_message(method: str) -> str:
    """The one-line refusal of parents without a predictive distribution for a method that reads one."""
    return (f"{method} needs parents with a classification head (a `logits` output of shape (examples, classes), as "
            "*ForSequenceClassification / *ForImageClassification models give); use method='regmean' or a dataless "
            "method (CLI: --method) for these parents")


def head_rule_message(method: str, config: Any, who: str = "parent A") -> str | None:
    """The one-line refusal of a head not read by one softmax over its classes (None for a softmax head): this
    Fisher is that softmax's, so a regression head's (one output: log_softmax of one logit is 0) is identically zero
    and the merge would be the plain average, and a multi-label head (a sigmoid per label) is not what its model
    predicts. transformers reads a head with problem_type None and one label as regression (`is_regression_head`)."""
    problem = getattr(config, "problem_type", None) or "regression"
    if is_regression_head(config) and problem == "regression":
        what = (f"a regression head (problem_type 'regression', num_labels={getattr(config, 'num_labels', None)}): "
                "its Fisher under a softmax is not the Gaussian one regression needs (of one output it is zero, so "
                "the merge would be the plain average)")
    elif is_regression_head(config):  # one output read as a class: a softmax over one logit is constant
        what = (f"a head of one output (num_labels=1, problem_type {problem!r}): the Fisher of a softmax over one "
                "output is zero, so the merge would be the plain average")
    elif is_multi_label_head(config):
        what = ("a multi-label head (problem_type 'multi_label_classification': a sigmoid per label), which that "
                "softmax does not describe")
    else:
        return None
    return (f"{method} weights each parameter by the Fisher of one softmax over the head's classes, but {who} has "
            f"{what}; use method='regmean', 'linear' or 'ties' (CLI: --method) for these parents")


def classifier_logits(output: Any) -> torch.Tensor:
    """The `(examples, classes)` logits of a model output; refuses outputs without a predictive distribution."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise MergeInputError(no_head_message("fisher"))
    return logits


def without_trailing_padding(example: Mapping[str, Any]) -> dict[str, Any]:
    """One example (batch of 1) cut after its last `attention_mask` token: the padding positions are masked out of
    attention, so the outputs are the same and each forward/backward is shorter (per-example gradients run alone)."""
    mask = example.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or len(mask) != 1:
        return dict(example)
    kept = torch.nonzero(mask[0]).flatten()
    length = int(kept[-1]) + 1 if len(kept) else mask.shape[1]
    width = mask.shape[1]
    return {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == width else v
            for k, v in example.items()}


def diagonal_fisher(
    model: nn.Module,
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    names: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """The mean over examples of `Σ_c p(c|x) (∂ log p(c|x)/∂θ)²` for each named parameter (float64, CPU).

    The model runs in eval mode (no dropout); its parameters and `.grad` are left as they were.
    Returns ({parameter name: Fisher}, number of examples).
    """
    params = dict(model.named_parameters())
    wanted = list(names) if names is not None else list(params)
    tensors = [params[name] for name in wanted]
    fisher = {name: torch.zeros(params[name].shape, dtype=torch.float64) for name in wanted}
    flags = [t.requires_grad for t in tensors]
    training = model.training
    examples = 0
    bar = Progress(desc="fisher", unit="examples", enabled=progress)
    try:
        model.eval()
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches():
                batch = batch_to(batch, device)
                size = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
                # One batch's terms in the parameters' dtype with fused multiply-adds (no temporaries; the
                # embedding's gradient alone is 12 M entries for MiniLM), folded into the float64 sums per batch.
                partial = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in tensors]
                for index in range(size):
                    one = without_trailing_padding(
                        {k: v[index:index + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                         for k, v in batch.items()})
                    log_probs = torch.log_softmax(classifier_logits(run_forward(model, one))[0], dim=-1)
                    probs = log_probs.detach().exp().tolist()
                    for c in range(len(log_probs)):
                        grads = torch.autograd.grad(log_probs[c], tensors, retain_graph=c + 1 < len(log_probs),
                                                    allow_unused=True)
                        for total, grad in zip(partial, grads):
                            if grad is not None:
                                total.addcmul_(grad, grad, value=probs[c])
                    examples += 1
                    bar.update(1)
                for name, total in zip(wanted, partial):
                    fisher[name].add_(total.detach().to("cpu", torch.float64))
    finally:
        bar.close()
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
        model.train(training)
    if examples:
        for value in fisher.values():
            value.div_(examples)
    return fisher, examples
