"""Stage register: the fine-tuned model becomes a version of the registered model `registry.model_name`.

The alias `champion` moves to it only when it beats the champion on the same test data (same `test_data_digest`);
otherwise it is the `challenger` when it beats the current challenger on that data too (or that one was measured on
other data), else it keeps no alias and loads as `models:/<name>/<version>`. When the champion was measured on another test split, it is re-scored on this
one first, with the evaluate stage's own scoring (`evaluate.score`) of its training run's checkpoint: hence the
test manifests (beside `test_manifest`) and the cache among the inputs. Registering the same run twice creates
nothing; two registrations at once end with one champion, the better (see tracking.register_model).

The version is the run's video-in model (`action3d.serving`): `mlflow models serve -m models:/<name>@champion`
answers with class names for posted videos; the tensor-in PyTorch model stays in the run as `model`.

registration.json holds the tracking store as `shareable_uri` writes it: no absolute path, no password.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from action3d.config import Params
from action3d.stages.common import cache_digest, digest, read_json, shareable_uri, tracking_uri, write_json


def test_data_digest(test_manifest: str | Path, cache_dir: str | Path) -> str:
    """What a test score was measured on: the test manifest (DVC's md5) and the frames it reads (the cache's
    index). The same split file over new videos, or the same videos cached anew, is another test set."""
    from action3d.storage import file_md5

    return digest(file_md5(test_manifest), cache_digest(cache_dir))


def run(params: Params, *, train_dir: str | Path, metrics_path: str | Path, test_manifest: str | Path,
        cache_dir: str | Path, out_path: str | Path) -> dict:
    from action3d.serving import NAME as VIDEO_MODEL  # the video-in pyfunc: the champion serves videos
    from action3d.tracking import register_model

    train_run = read_json(Path(train_dir) / "run.json", "finetune")
    metrics = read_json(metrics_path, "evaluate")
    scores = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if params.registry.metric not in scores:
        from action3d.errors import Action3dError

        raise Action3dError(f"registry.metric '{params.registry.metric}' is not in {metrics_path}; "
                            f"choose one of {', '.join(sorted(scores))}")

    def rescore(checkpoint: Path) -> dict:
        from action3d.stages.evaluate import score

        print(f"re-scoring the champion of {params.registry.model_name} on {test_manifest}", flush=True)
        return score(params, model_path=checkpoint, manifest=test_manifest, cache_dir=cache_dir)[0]

    def register(artifact: str):
        return register_model(
            train_run["run_id"], params.registry.model_name, metrics=scores, data_digest=test_data_digest(test_manifest, cache_dir),
            metric_key=params.registry.metric, tracking_uri=tracking_uri(), rescore=rescore, artifact=artifact,
        )  # fmt: skip

    try:
        registration = register(VIDEO_MODEL)
    except LookupError:  # a run trained before the stages logged a video model: its tensor model, said so
        print(f"run {train_run['run_id']} has no {VIDEO_MODEL} model (trained before the stages logged one): "
              "registering its tensor-in model, which `mlflow models serve` cannot give videos; re-run the "
              "training stage (`dvc repro -f finetune`) for one that serves videos", flush=True)
        registration = register("model")
    record = {**dataclasses.asdict(registration), "run_id": train_run["run_id"], "model_uri":
              f"models:/{registration.name}/{registration.version}", "tracking_uri": shareable_uri(tracking_uri()),
              params.registry.metric: scores[params.registry.metric]}
    write_json(out_path, record)
    print(f"registered {registration.name} version {registration.version} "
          f"({registration.alias or 'no alias'}): {registration.reason}")
    return record
