"""Stage register: the fine-tuned model becomes a version of the registered model `registry.model_name`.

The alias `champion` moves to it only when it beats the champion on the same test data (the same split digest: test manifest and frames);
otherwise it is the `challenger` when it beats the current challenger on that data too (or that one was measured on
other data), else it keeps no alias and loads as `models:/<name>/<version>`. When the champion was measured on
another test split, it is re-scored on this one first, with the evaluate stage's own scoring (`evaluate.score`) of
its checkpoint: hence the manifests and the cache among the inputs. Registering the same run twice creates
nothing; two registrations at once end with one champion, the better (tracking.registry).

The version is the run's one logged model (tracking.models): `mlflow models serve -m models:/<name>@champion`
answers posted videos with class names. registration.json holds the tracking store as `shareable_uri` writes it:
no absolute path, no password.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from action3d.atomic import write_json
from action3d.config import Params
from action3d.errors import Action3dError
from action3d.project import digest, file_md5, shareable_uri, tracking_uri
from action3d.stages import RunContext, read_output


def split_digest(test_manifest: str | Path, cache: str | Path) -> str:
    """What a test score was measured on: the test manifest (DVC's md5) and the frames it reads (the cache's
    index). The same split file over new videos, or the same videos cached anew, is another test set."""
    from action3d.data.cache import cache_digest

    return digest(file_md5(test_manifest), cache_digest(cache))


def run(params: Params, *, train: str | Path, metrics: str | Path, manifests: str | Path, cache: str | Path,
        out: str | Path, ctx: RunContext | None = None) -> dict:
    from action3d.tracking.registry import register_model

    trained = read_output(Path(train) / "run.json", "finetune")
    scores = {k: float(v) for k, v in read_output(metrics, "evaluate@finetune").items() if isinstance(v, (int, float))}
    if params.registry.metric not in scores:
        raise Action3dError(f"registry.metric '{params.registry.metric}' is not in {metrics}; "
                            f"choose one of {', '.join(sorted(scores))}")
    test = Path(manifests) / "test.csv"

    def rescore(checkpoint: Path) -> dict:
        from action3d.stages.evaluate import score

        print(f"re-scoring the champion of {params.registry.model_name} on {test}", flush=True)
        return score(params, model=checkpoint, manifest=test, cache=cache)[0]

    uri = tracking_uri()
    registration = register_model(trained["run_id"], params.registry.model_name, metrics=scores,
                                  data_digest=split_digest(test, cache), metric_key=params.registry.metric,
                                  tracking_uri=uri, rescore=rescore)
    record = {**dataclasses.asdict(registration), "run_id": trained["run_id"], "tracking_uri": shareable_uri(uri),
              "model_uri": f"models:/{registration.name}/{registration.version}",
              params.registry.metric: scores[params.registry.metric]}
    write_json(out, record)
    print(f"registered {registration.name} version {registration.version} "
          f"({registration.alias or 'no alias'}): {registration.reason}")
    return record
