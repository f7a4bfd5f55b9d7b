"""The model of a job: built from the job spec alone, the same way on the driver (which
checks it before any image is read) and in every predict actor.

The spec a predict actor receives is the driver's, with its `auto` values resolved, so
both build from one description; drn's messages are rendered in terms of `run`'s flags.
"""
from __future__ import annotations

from pipeline.errors import JobError
from pipeline.spec import AUTO, FLAGS, JobSpec
from pipeline.store.output import PROBS_STRIDE, OutputMetadata


def build_model(spec: JobSpec):
    """The eval-mode module `spec` asks for (the stand-in with ``stand_in``); a model that
    cannot be built is a JobError that names the flags to change."""
    from drn.errors import ModelError

    if spec.stand_in:
        from drn.standin import create_stand_in

        try:
            return create_stand_in(num_classes=spec.num_classes, classes=spec.classes)
        except ValueError as exc:
            raise JobError(f"cannot build the stand-in model: {exc}") from None
    import drn

    from pipeline.store.weights import local_weights

    weights = local_weights(spec.weights)  # s3://, gs://, hf:// -> a cached local file
    try:
        return drn.create_model(spec.model, weights=weights, classes=spec.classes,
                                num_classes=spec.num_classes, task="segment")
    except ModelError as exc:
        raise JobError(f"cannot build model {spec.model}"
                       f"{' from ' + spec.weights if spec.weights else ''}: "
                       f"{exc.render(FLAGS)}") from None
    except Exception as exc:  # noqa: BLE001 - a label file that does not parse, a damaged file
        raise JobError(f"cannot build model {spec.model}: {exc}") from None


def describe_model(spec: JobSpec) -> OutputMetadata:
    """Build the model once on the driver: bad weights or classes fail here, before any
    image; what the output's rows and file metadata say about it."""
    model = build_model(spec)
    cfg = model.drn_config
    del model
    return OutputMetadata.from_model(cfg.arch, spec.weights, cfg)


def predictor_for(spec: JobSpec, model, *, device: str = "auto"):
    """A `drn.predictor.Predictor` over `model` with the spec's inference settings (auto
    values chosen for this machine, as a run on it would choose them)."""
    import os

    import torch

    from drn.predictor import Predictor

    if AUTO in (spec.batch_size, spec.precision):
        spec = spec.resolved(cpus=os.cpu_count() or 1, gpus=torch.cuda.device_count())

    return Predictor.from_model(model, device=device, precision=spec.precision,
                                batch_size=spec.batch_size, size_bucket=spec.size_bucket,
                                tta_scales=spec.tta_scales if spec.tta else None,
                                tta_flip=spec.tta and spec.tta_flip,
                                probs_stride=PROBS_STRIDE if spec.save_probs else None)
