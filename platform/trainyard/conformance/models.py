"""The checks of a model, per input kind it declares: its params type, its processor
fits and the model builds, one batch goes forward, backward and through an optimizer step,
``decode`` gives JSON-able answers (for classification, scores by class name), a checkpoint
read back answers as the model in memory does, and the fitted processor survives a pickle
round trip (Ray ships it to its workers). Each step is one function of the
:class:`ModelRun` the earlier ones filled."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from typing import Any

from trainyard import hookspecs
from trainyard.batches import call_model
from trainyard.conformance.params import params_detail, typed
from trainyard.conformance.results import CheckFailed, CheckResult
from trainyard.conformance.runner import Plugin, Step, describe, run_steps
from trainyard.conformance.samples import BATCH, Sample, sample_for, take_inputs, take_targets


@dataclass
class ModelRun:
    """One model checked on one input kind: what each step makes for the next."""

    spec: hookspecs.ModelSpec
    kind: str
    overrides: dict
    params: Any = None
    sample: Sample | None = None
    processor: Any = None
    model: Any = None
    #: The raw examples sent forward, their encoded batch and the model's output for it.
    raw: Any = None
    batch: Any = None
    out: Any = None


def check_model(plugin: Plugin, spec: hookspecs.ModelSpec, overrides: dict) -> list[CheckResult]:
    """Every check of the model ``spec``, for each input kind it declares."""
    results: list[CheckResult] = []
    for kind in spec.inputs:
        label = "" if len(spec.inputs) == 1 else f" ({kind})"
        steps = _steps(plugin, ModelRun(spec, kind, overrides))
        results += run_steps(plugin, "model", spec.name, [(c + label, s) for c, s in steps])
    return results


def _steps(plugin: Plugin, run: ModelRun) -> list[Step]:
    return [
        ("params", lambda: check_params(plugin, run)),
        ("build", lambda: check_build(plugin, run)),
        ("forward", lambda: check_forward(run)),
        ("backward", lambda: check_backward(run)),
        ("decode", lambda: check_decode(run)),
        ("checkpoint", lambda: check_checkpoint(plugin, run)),
        ("pickle", lambda: check_pickle(plugin, run)),
    ]


def check_params(plugin: Plugin, run: ModelRun) -> str:
    """The user's params (or the defaults) type as the model's params."""
    run.params = typed(run.spec.params, run.overrides, "model", run.spec.name, plugin.name)
    return params_detail(run.params)


def check_build(plugin: Plugin, run: ModelRun) -> str:
    """The processor fits on a sample and the model builds, with trainable parameters."""
    import torch

    sample = sample_for(plugin, run.kind)
    run.sample = sample
    processor = run.spec.processor(run.params, sample.info)
    missing = [m for m in ("fit", "encode", "decode", "save", "load") if not callable(getattr(processor, m, None))]
    if missing:
        raise CheckFailed(f"processor(params, info) gave a {type(processor).__name__} without "
                          f"{', '.join(missing)}; subclass trainyard.Processor")
    processor.fit(sample.inputs)
    torch.manual_seed(0)
    model = run.spec.build(run.params, sample.info, processor)
    if not isinstance(model, torch.nn.Module):
        raise CheckFailed(f"build returned a {type(model).__name__}, expected a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise CheckFailed("the built model has no trainable parameters")
    run.processor, run.model = processor, model
    return f"fitted on {len(sample.targets)} examples of {sample.source}"


def check_forward(run: ModelRun) -> str:
    """A batch encodes as tensors and goes forward to finite floats ``[N, num_outputs]``."""
    info = run.sample.info
    raw = take_inputs(run.sample.inputs, range(BATCH))
    batch = _encode(run.processor, raw)
    run.model.train()
    out = call_model(run.model, batch)
    _check_output(out, info.num_outputs)
    run.batch, run.out, run.raw = batch, out, raw
    return f"[{BATCH}, {info.num_outputs}] {str(out.dtype).replace('torch.', '')}"


def _encode(processor: Any, raw: Any) -> Any:
    """``processor.encode(raw)``, which must be a tensor or a dict of tensors."""
    import torch

    batch = processor.encode(raw)
    if isinstance(batch, dict):
        bad = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckFailed(f"processor.encode gave a dict whose {', '.join(bad)} "
                              "is not a tensor")
    elif not isinstance(batch, torch.Tensor):
        raise CheckFailed(f"processor.encode gave a {type(batch).__name__}; it must give "
                          "a tensor or a dict of tensors")
    return batch


def _check_output(out: Any, num_outputs: int) -> None:
    """The model's output for a batch is a finite float tensor ``[BATCH, num_outputs]``."""
    import torch

    want = [BATCH, num_outputs]
    if not isinstance(out, torch.Tensor):
        raise CheckFailed(f"forward returned a {type(out).__name__}; it must return a float "
                          f"tensor of shape {want} ([batch, info.num_outputs])")
    if list(out.shape) != want:
        raise CheckFailed(f"forward returned shape {list(out.shape)} for a batch of {BATCH} "
                          f"with {num_outputs} outputs; expected {want} "
                          "([batch, info.num_outputs])")
    if not out.is_floating_point():
        raise CheckFailed(f"forward returned a {out.dtype} tensor; it must be floating point")
    if not torch.isfinite(out).all():
        raise CheckFailed("forward returned NaN or infinite values")


def check_backward(run: ModelRun) -> str:
    """The output's loss gives finite gradients to the parameters, and an optimizer steps."""
    import torch

    loss = _loss(run.out, run.sample)
    if not loss.requires_grad:
        raise CheckFailed("no parameter received a gradient: the output does not depend on "
                          "the model's parameters (is it detached, or made under no_grad?)")
    optimizer = torch.optim.SGD(run.model.parameters(), lr=1e-3)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in run.model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        raise CheckFailed("no parameter received a gradient: is the output detached from "
                          "the model's parameters?")
    if not all(torch.isfinite(g).all() for g in grads):
        raise CheckFailed("the loss gave NaN or infinite gradients")
    optimizer.step()
    return f"loss {float(loss.detach()):.4g}"


def _loss(out: Any, sample: Sample) -> Any:
    """The task's loss of the output against the first BATCH targets of the sample."""
    import torch
    import torch.nn.functional as F

    targets = torch.as_tensor(take_targets(sample.targets, range(BATCH)))
    if sample.info.task == "classification":
        return F.cross_entropy(out.float(), targets.long())
    return F.mse_loss(out.float().reshape(len(targets), -1), targets.float().reshape(len(targets), -1))


def check_decode(run: ModelRun) -> str:
    """``processor.decode`` gives one JSON-able dict per example, labels among the classes
    and, for classification, scores in every answer: a number per class name."""
    answers = run.processor.decode(run.out.detach())
    if not isinstance(answers, list) or len(answers) != BATCH or not all(isinstance(a, dict) for a in answers):
        got = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
        raise CheckFailed(f"processor.decode must give a list of one dict per example "
                          f"({BATCH}); got {got}")
    try:
        json.dumps(answers)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"processor.decode gave answers that are not JSON-able, so they "
                          f"cannot be served: {exc}") from None
    classes = run.sample.info.classes
    labels = [a.get("label") for a in answers]
    if classes and "label" in answers[0] and not set(labels) <= set(classes):
        raise CheckFailed(f"processor.decode gave labels {sorted(set(labels) - set(classes))} "
                          f"that are not among info.classes {classes}")
    if run.sample.info.task == "classification":
        for answer in answers:  # serving's OIP route and the MLflow export need every answer's
            _check_scores(answer.get("scores", _NO_SCORES), classes)
    return f"{BATCH} answers"


_NO_SCORES = object()


def _check_scores(scores: Any, classes: list[str]) -> None:
    """An answer's ``scores`` map each class name to a finite number: serving (OIP /infer)
    and the MLflow export read ``scores[class_name]``."""
    need = ("; for classification, scores must map each class name in info.classes to a "
            "number (as the default decode does: {class: probability}), since serving and the "
            "MLflow export read scores[class_name]")
    if scores is _NO_SCORES:
        raise CheckFailed(f"processor.decode gave an answer without scores{need}")
    if not isinstance(scores, dict):
        raise CheckFailed(f"processor.decode gave scores of type {type(scores).__name__} "
                          f"{_short(scores)}{need}")
    missing = [c for c in classes if c not in scores]
    if missing:
        raise CheckFailed(f"processor.decode gave scores without the classes {missing} "
                          f"({_short(scores)}){need}")
    unknown = [k for k in scores if k not in classes]
    if unknown:
        raise CheckFailed(f"processor.decode gave scores for {_short(unknown)}, which are not "
                          f"among info.classes {classes}{need}")
    bad = {c: v for c, v in scores.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)}
    if bad:
        shown = _short(", ".join(f"{c!r}: {v!r}" for c, v in bad.items()))
        raise CheckFailed(f"processor.decode gave scores that are not finite numbers: {shown}{need}")


def _short(value: Any, limit: int = 200) -> str:
    """``value`` (its repr, a string as is) cut to ``limit`` characters, on one line."""
    text = " ".join((value if isinstance(value, str) else repr(value)).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_checkpoint(plugin: Plugin, run: ModelRun) -> str:
    """A checkpoint written and read back answers the raw inputs as the model in memory."""
    job = _job(run)
    expected, answers = _in_memory(run)
    got, reloaded_answers = _reloaded(plugin, run, job)
    _compare(expected, answers, got, reloaded_answers)
    return "write_checkpoint, load_predictor, predict: same outputs"


def _job(run: ModelRun) -> Any:
    """The resolved job a checkpoint of this model records."""
    from trainyard.config import ResolvedJob, load_config

    sample = run.sample
    cfg = load_config(base={
        "name": f"conformance_{run.spec.name}",
        "model": {"name": run.spec.name, "params": run.overrides},
        "data": {"name": sample.dataset.name},
    })
    return ResolvedJob(cfg, run.spec, sample.dataset, [], run.params, None, sample.info.task)


def _in_memory(run: ModelRun) -> tuple[Any, list]:
    """The model in memory's outputs (eval mode) and answers for the raw inputs."""
    import torch

    run.model.eval()
    with torch.inference_mode():
        expected = call_model(run.model, run.processor.encode(run.raw)).float()
    return expected, run.processor.decode(expected)


def _reloaded(plugin: Plugin, run: ModelRun, job: Any) -> tuple[Any, list]:
    """The outputs and answers for the raw inputs of the model written to a checkpoint
    and loaded back as a predictor."""
    from trainyard.checkpoint import load_predictor, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, job=job, model=run.model, processor=run.processor,
                         info=run.sample.info, epoch=0, metrics={}, plugin=plugin.name)
        predictor = load_predictor(tmp, registry=plugin.registry)
        return predictor.forward(run.raw).float(), predictor.predict(run.raw)


def check_pickle(plugin: Plugin, run: ModelRun) -> str:
    """The fitted processor survives a pickle round trip (Ray's cloudpickle, as Ray ships it
    to the data workers of a streamed dataset and to each training worker) and encodes the
    raw inputs as before."""
    from ray import cloudpickle

    name = type(run.processor).__name__
    why = ("Ray pickles it to ship it to the data workers of a streamed dataset and to each "
           "training worker")
    try:
        data = cloudpickle.dumps(run.processor)
    except Exception as exc:  # noqa: BLE001 - the reason, in one line
        raise CheckFailed(f"the fitted processor {name} cannot be pickled "
                          f"({describe(exc, plugin.folder)}): {why}; keep locks, open files and "
                          "clients out of its attributes (make them when first needed, or drop "
                          "them in __getstate__)") from None
    try:
        copy = cloudpickle.loads(data)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"the fitted processor {name} pickles but cannot be unpickled "
                          f"({describe(exc, plugin.folder)}): {why}") from None
    if not _same_batch(_encode(run.processor, run.raw), _encode(copy, run.raw)):
        raise CheckFailed(f"the fitted processor {name} encodes the same raw inputs differently "
                          f"after a pickle round trip: {why}, so encode must use only what "
                          "pickles with it")
    return f"ray.cloudpickle round trip of {name} ({len(data)} bytes): same encoding"


def _same_batch(a: Any, b: Any) -> bool:
    """Two encoded batches (tensors, or dicts of tensors) hold the same tensors."""
    import torch

    if isinstance(a, dict) != isinstance(b, dict):
        return False
    a, b = (a, b) if isinstance(a, dict) else ({"": a}, {"": b})
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and (torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6, equal_nan=True)
             if a[k].is_floating_point() else torch.equal(a[k], b[k]))
        for k in a)


def _compare(expected: Any, answers: list, got: Any, reloaded_answers: list) -> None:
    """The reloaded model's outputs and labels are the in-memory model's."""
    if list(got.shape) != list(expected.shape):
        raise CheckFailed(f"the model rebuilt from the checkpoint gives shape {list(got.shape)}, "
                          f"the one in memory {list(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not diff <= 1e-4 * (1 + float(expected.abs().max())):
        raise CheckFailed(
            f"the model rebuilt from a checkpoint answers the same raw inputs differently "
            f"from the model in memory (largest difference {diff:.3g}): the processor's save() "
            "must keep everything fit() learnt (the default saves self.state), and build() "
            "must give the same architecture for the same params and processor"
        )
    if [a.get("label") for a in reloaded_answers] != [a.get("label") for a in answers]:
        raise CheckFailed("the model rebuilt from a checkpoint gives other labels than the "
                          "model in memory")
