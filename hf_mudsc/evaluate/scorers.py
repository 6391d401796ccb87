"""Scorers: each turns a batch into one score per joint class and sample.

* **merged** models: their logits; a concatenated head (different label sets) decides jointly by the
  `joint_rule` (`names.JOINT_RULES`): each task's softmax, concatenated (`per_task`, the default; decided by its
  log, `apply.classifier.per_task_log_probabilities`, why: `decision`'s docstring), or the raw logits (`raw`) — the
  ensemble's rule too.
* **parent A / B / C ...** (N >= 2 parents, merge order): when the parents have different label sets, a
  parent scores only its own classes (its slice holds its logits, every other class ``-inf``). It is scored per
  task on its own task only; its joint figure is that of a single-task model answering the joint test — always
  one of its own classes, so it is right at most on its own task's share of the samples. A merged parent (its
  config holds several tasks, `merge([merge([A, B]), C])`'s first) is scored on each of its tasks on that task's
  own slice of its head, and its joint figure is decided by the `joint_rule` over its slices (right at most on its
  tasks' share). When the parents share one label set, each parent is scored on every task.
* **ensemble**: every parent runs; different label sets: the parents' logits concatenated in parent order, decided
  by the same `joint_rule` as the merged head (`per_task`: each head's softmax); one shared label set: the mean of
  the parents' softmaxes.
* **CLIP** (no classifier): zero-shot. Each task names its classes; the text tower embeds prompts made
  from the names (`prompt_template`, several templates are averaged), images are classified by cosine
  similarity times `logit_scale`. Every CLIP (merged or parent) can score every task; the ensemble
  averages the parents' softmaxes over all classes.

Each model reads the batch as ITS processor made it (`ModelInputs`): the rows are the same for every model, the
tensors may differ (another image size or normalisation, another tokenizer), so a parent is scored — and enters
the ensemble — on the inputs it was trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_mudsc.apply.classifier import per_task_log_probabilities
from hf_mudsc.calibrate.layer_inputs import FORWARD_ERRORS
from hf_mudsc.errors import EvaluationError, first_line
from hf_mudsc.evaluate.names import ENSEMBLE, check_prompt_templates, parent_names
from hf_mudsc.evaluate.tasks import LabelLayout

logger = logging.getLogger(__name__)


def is_clip(model: Any) -> bool:
    return hasattr(model, "get_text_features") and hasattr(model, "get_image_features")


def is_clip_config(config: Any) -> bool:
    """`is_clip` from a config alone (an image and a text tower), so the CLI can check its flags before weights."""
    return hasattr(config, "text_config") and hasattr(config, "vision_config")


def _features(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and an output object (`.pooler_output`) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _forward_kwargs(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    from hf_mudsc.calibrate.statistics import forward_inputs

    return forward_inputs(model, batch)


class ModelInputs:
    """One batch of rows as each model reads it: `batches[i]` made by the i-th distinct processor, `group[id(model)]`
    the index of the model's processor."""

    def __init__(self, batches: Sequence[Mapping[str, Any]], group: Mapping[int, int]) -> None:
        self.batches, self.group = list(batches), dict(group)

    def of(self, model: Any) -> Mapping[str, Any]:
        return self.batches[self.group.get(id(model), 0)]


class Scorer:
    """Turns a batch into joint-space scores `(N, layout.size)`; `tasks`: where it has per-task figures."""

    def __init__(self, name: str, tasks: Sequence[str]) -> None:
        self.name = name
        self.tasks = list(tasks)

    def scores(self, inputs: ModelInputs, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class NonFiniteScores(EvaluationError):
    """A model's logits hold NaN or inf on `rows` of the batch's `total` rows: torch's argmax reads NaN as the largest
    value, so they would be scored as predictions. The caller names the model and the task."""

    def __init__(self, rows: int, total: int) -> None:
        super().__init__(f"logits that are not finite on {rows} of {total} rows")
        self.rows, self.total = rows, total


def finite(values: torch.Tensor) -> torch.Tensor:
    """`values` (rows × classes), refused (`NonFiniteScores`) when a row holds NaN or inf."""
    bad = int((~torch.isfinite(values)).any(dim=-1).sum())
    if bad:
        raise NonFiniteScores(bad, values.shape[0])
    return values


def _logits(model: Any, inputs: ModelInputs, cache: dict[int, torch.Tensor],
            columns: Sequence[int] | None = None) -> torch.Tensor:
    """A classifier's logits for the batch (as its processor made it), cached per model so the ensemble reuses the
    parents' pass; `columns`: a parent's columns in the merged model's label order (`LabelLayout.parent_columns`)."""
    key = id(model)
    if key not in cache:
        batch = inputs.of(model)
        try:
            logits = model(**_forward_kwargs(model, batch)).logits
        except FORWARD_ERRORS as error:  # a wrong shape, length or id: one line naming the model and the columns
            raise EvaluationError(f"an evaluation batch could not be run through {type(model).__name__} (columns "
                                  f"{sorted(batch)}): {first_line(error)}") from None
        cache[key] = finite(logits.to(torch.float32))
    return cache[key] if columns is None else cache[key][:, list(columns)]


def _decided(logits: torch.Tensor, layout: LabelLayout, joint_rule: str) -> torch.Tensor:
    """A concatenated head's scores under the joint rule (`names.JOINT_RULES`); `per_task` as log-probabilities,
    which decide as the probabilities do but keep two confident tasks apart
    (`apply.classifier.per_task_log_probabilities`)."""
    return logits if joint_rule == "raw" else per_task_log_probabilities(logits, list(layout.ranges.values()))


class _ClassifierScorer(Scorer):
    """A merged model (`own` None: every task), or a parent scoring the tasks `own` its head holds (consecutive in
    the joint label space: one, or a merged parent's several)."""

    def __init__(self, name: str, model: Any, layout: LabelLayout, own: Sequence[str] | None, joint_rule: str,
                 columns: Sequence[int] | None = None) -> None:
        super().__init__(name, list(layout.ranges) if own is None else list(own))
        self.model, self.layout, self.own, self.joint_rule = model, layout, own, joint_rule
        self.columns = columns

    def scores(self, inputs: ModelInputs, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        logits = _logits(self.model, inputs, cache, self.columns)
        if self.layout.shared:
            return logits
        if self.own is None:
            return _decided(logits, self.layout, self.joint_rule)
        spans = [self.layout.ranges[task] for task in self.own]
        lo, hi = spans[0][0], spans[-1][1]
        if len(spans) > 1 and self.joint_rule != "raw":  # a merged parent decides its tasks as the merged head does
            logits = per_task_log_probabilities(logits, [(start - lo, end - lo) for start, end in spans])
        full = torch.full((logits.shape[0], self.layout.size), -math.inf)
        full[:, lo:hi] = logits
        return full


class _ClassifierEnsemble(Scorer):
    def __init__(self, parents: Sequence[Any], layout: LabelLayout, joint_rule: str) -> None:
        super().__init__(ENSEMBLE, list(layout.ranges))
        self.parents, self.layout, self.joint_rule = list(parents), layout, joint_rule

    def scores(self, inputs: ModelInputs, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        columns = self.layout.parent_columns or [None] * len(self.parents)
        # each parent on its own inputs, same rows; a reordered parent's columns in the merged label order
        logits = [_logits(p, inputs, cache, c) for p, c in zip(self.parents, columns)]
        if self.layout.shared:
            return torch.stack([z.softmax(-1) for z in logits]).mean(0)
        return _decided(torch.cat(logits, dim=-1), self.layout, self.joint_rule)


class _ClipScorer(Scorer):
    """Zero-shot CLIP over all classes of all tasks; text embeddings computed once."""

    def __init__(
        self, name: str, model: Any, layout: LabelLayout, tokenizer: Any, templates: Sequence[str]
    ) -> None:
        super().__init__(name, list(layout.ranges))
        self.model = model
        classes = [c for names in layout.class_names.values() for c in names]
        prompts_per_class = [[t.format(c) for t in templates] for c in classes]
        flat = [p for prompts in prompts_per_class for p in prompts]
        from hf_mudsc.calibrate.datasets import encode_texts

        # padded and cut to the text tower's positions (a tokenizer may name no limit), the tokenizer left as it was
        positions = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
        limit = positions if isinstance(positions, int) and not isinstance(positions, bool) else None
        encoded = encode_texts(tokenizer, flat, limit)
        self.cut_warnings = cut_prompts_warnings(tokenizer, encoded, flat, layout.class_names, templates, limit)
        inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            embeds = _features(model.get_text_features(**inputs)).float()
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        embeds = embeds.view(len(prompts_per_class), len(templates), -1).mean(1)
        self.text = torch.nn.functional.normalize(embeds, dim=-1)
        self.scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 1.0

    def scores(self, inputs: ModelInputs, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        key = id(self.model)
        if key not in cache:
            pixels = inputs.of(self.model)["pixel_values"]
            image = _features(self.model.get_image_features(pixel_values=pixels)).float()
            cache[key] = finite(self.scale * torch.nn.functional.normalize(image, dim=-1) @ self.text.T)
        return cache[key]


def cut_prompts_warnings(tokenizer: Any, encoded: Mapping[str, Any], prompts: Sequence[str],
                         class_names: Mapping[str, Sequence[str]], templates: Sequence[str],
                         limit: int | None) -> list[str]:
    """What to say of class prompts cut to the text tower's `limit` positions (`encoded`: them as cut; `prompts`:
    each class's prompt for each template, class-major, classes in `class_names`' order). A cut that leaves two
    classes of one task the same ids is refused: they get one text embedding, so the figures would be a constant
    classifier's, reported as the model's; any other cut drops the prompts' end and is said (one line per template).
    """
    mask = encoded.get("attention_mask")
    cut_ids = [row[m.bool()].tolist() if mask is not None else row.tolist()
               for row, m in zip(encoded["input_ids"], mask if mask is not None else encoded["input_ids"])]
    if limit is None or all(len(ids) < limit for ids in cut_ids):
        return []
    from hf_mudsc.calibrate.datasets import token_ids_uncut

    whole = token_ids_uncut(tokenizer, list(prompts))
    counts = [len(ids) for ids in whole]
    if all(n <= limit for n in counts):
        return []
    fix = ("use a shorter prompt_template (CLI: --prompt-template) or shorter class names (class_names=, CLI: "
           "--class-names)")
    per_template = len(templates)
    start = 0
    for task, names in class_names.items():
        for t, template in enumerate(templates):
            seen: dict[tuple[int, ...], int] = {}
            for c in range(len(names)):
                index = (start + c) * per_template + t
                other = seen.setdefault(tuple(cut_ids[index]), index)
                if other != index and whole[other] != whole[index]:
                    raise EvaluationError(
                        f"the prompt template {template!r} runs to {max(counts[other], counts[index])} tokens with "
                        f"the class names of task {task!r}, past the text tower's {limit} positions "
                        f"(max_position_embeddings): cut to fit, the prompts of classes "
                        f"{names[(other // per_template) - start]!r} and {names[c]!r} are the same, so they would "
                        f"score alike; {fix}")
        start += len(names)
    said = []
    for t, template in enumerate(templates):
        cut = [counts[i] for i in range(t, len(prompts), per_template) if counts[i] > limit]
        if cut:
            said.append(f"the prompt template {template!r} runs to {max(cut)} tokens for {len(cut)} of the "
                        f"{len(prompts) // per_template} class prompts, past the text tower's {limit} positions "
                        f"(max_position_embeddings): they are cut to fit, which drops their end; {fix}")
    return said


def _refuse_no_pad_tokens(names: Sequence[str], tokenizers: Sequence[Any]) -> None:
    """Refuse a tokenizer without a pad token before any class prompt is embedded: the prompts are padded into one
    batch, which transformers refuses with a bare ValueError (as calibration's texts are refused)."""
    from hf_mudsc.calibrate.datasets import DataRole, refuse_no_pad_token

    seen: set[int] = set()
    for name, tokenizer in zip(names, tokenizers):
        if id(tokenizer) in seen:
            continue
        seen.add(id(tokenizer))
        role = DataRole(data="zero-shot CLIP evaluation",
                        image_processor=f"the image processor embedding the class prompts of {name!r}",
                        fix="pass it as processor= (or save it with the model)", error=EvaluationError)
        refuse_no_pad_token(tokenizer, role, own_inputs=False)


class _ClipEnsemble(Scorer):
    def __init__(self, parents: Sequence[_ClipScorer], tasks: Sequence[str]) -> None:
        super().__init__(ENSEMBLE, tasks)
        self.parents = list(parents)

    def scores(self, inputs: ModelInputs, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([p.scores(inputs, cache).softmax(-1) for p in self.parents]).mean(0)


def build_scorers(merged: Mapping[str, Any], parents: Sequence[Any], layout: LabelLayout, clip: bool, ensemble: bool,
             processors: Sequence[Any], prompt_template: str | Sequence[str], joint_rule: str = "per_task",
             ) -> list[Scorer]:
    """`processors`: each model's processor, merged models then parents (a CLIP embeds the class prompts with its
    own tokenizer, else with the first model's that has one)."""
    tasks = list(layout.ranges)
    if clip:
        from hf_mudsc.load.processors import tokenizer_of

        tokenizers = [tokenizer_of(p) for p in processors]
        fallback = next((t for t in tokenizers if t is not None), None)
        if fallback is None:
            raise EvaluationError(
                "zero-shot CLIP evaluation needs a tokenizer for the class prompts: pass processor= (a "
                "CLIPProcessor or tokenizer) or evaluate a folder that holds one"
            )
        templates = check_prompt_templates(prompt_template)
        named = [*merged.items(), *zip(parent_names(len(parents)), parents)]
        _refuse_no_pad_tokens([n for n, _ in named], [tokenizer or fallback for tokenizer in tokenizers])
        clip_scorers = [_ClipScorer(n, m, layout, tokenizer or fallback, templates)
                        for (n, m), tokenizer in zip(named, tokenizers)]
        for said in dict.fromkeys(w for scorer in clip_scorers for w in scorer.cut_warnings):  # once for all models
            logger.warning("%s", said)
        merged_scorers: list[Scorer] = list(clip_scorers[:len(merged)])
        parent_scorers = clip_scorers[len(merged):]
        extra = [_ClipEnsemble(parent_scorers, tasks)] if ensemble and len(parent_scorers) >= 2 else []
        return [*parent_scorers, *extra, *merged_scorers]
    for name, model in [*merged.items(), *zip(parent_names(len(parents)), parents)]:
        if not hasattr(model, "classifier") and "ForSequenceClassification" not in type(model).__name__ \
                and "ForImageClassification" not in type(model).__name__:
            raise EvaluationError(
                f"{name} is a {type(model).__name__}, which has no classifier head; evaluate "
                "*ForImageClassification / *ForSequenceClassification or CLIP models"
            )
    merged_scorers = [_ClassifierScorer(n, m, layout, None, joint_rule) for n, m in merged.items()]
    # one shared label set: every parent scores every task (however many tasks there are); else parent i task i
    own_tasks = [None] * len(parents) if layout.shared else list(layout.parent_tasks) or [[task] for task in tasks]
    columns = layout.parent_columns or [None] * len(parents)
    parent_scorers = [_ClassifierScorer(n, m, layout, task, joint_rule, order)
                      for n, m, task, order in zip(parent_names(len(parents)), parents, own_tasks, columns)]
    extra = [_ClassifierEnsemble(parents, layout, joint_rule)] if ensemble and len(parents) >= 2 else []
    return [*parent_scorers, *extra, *merged_scorers]
