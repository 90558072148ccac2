"""MLflow, and the only package that imports it.

    store      the client, experiments whose artifacts stay with the project
    runs       a run per stage: params, lineage tags, per-epoch metrics, datasets, the stage's one model
    models     that model: the checkpoint behind a video-in pyfunc (served, registered, re-scored)
    registry   registration behind a promotion gate (champion, challenger), browsing, promotion, lineage
    browse     reading runs back for the report

Tracking goes to MLFLOW_TRACKING_URI when it is set, else to the project's sqlite file (`action3d.project.
tracking_uri`); with a sqlite store, artifacts go to `mlartifacts/` beside it. Nothing happens at import.
"""
