"""The `action3d` command. It parses paths and overrides, then calls library functions: no logic lives here.

    action3d models                       the model zoo with sizes and costs
    action3d stage NAME --paths ...       one pipeline stage (what dvc.yaml runs)
    action3d data synth|split|cache       the same data stages, by hand
    action3d data push|pull DIR s3://...  move a raw dataset to or from S3
    action3d report                       where the pipeline's results are

Every command that reads knobs takes `--params params.yaml` and `-S key=value` overrides (as `dvc exp run -S`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from action3d.errors import Action3dError


def _params(args: argparse.Namespace):
    from action3d.config import load_params

    return load_params(args.params, args.set)


def _cmd_models(args: argparse.Namespace) -> None:
    from action3d.models.summary import format_model_table, model_table

    rows = [r for r in model_table(progress=True) if not args.filter or args.filter in r["name"]]
    print(format_model_table(rows))


# --- stages: each handler maps arguments onto the stage's run(params, **paths) ---------------------------------


def _stage_summary(args):
    from action3d.stages import summary

    return summary.run(_params(args), finetune_metrics=args.finetune, scratch_metrics=args.scratch, out_path=args.out)


def _stage_check(args):
    from action3d.stages import check

    return check.run(_params(args), out_path=args.out)


def _stage_synth(args):
    from action3d.stages import synth

    return synth.run(_params(args), out_dir=args.out, hmdb51=args.hmdb51, workers=args.workers)


def _stage_split(args):
    from action3d.stages import split

    return split.run(_params(args), role=args.role, data_root=args.data, out_dir=args.out,
                     annotations=args.annotations, workers=args.workers)


def _stage_cache(args):
    from action3d.stages import cache

    return cache.run(_params(args), manifests_dir=args.manifests, data_root=args.data, out_dir=args.out,
                     workers=args.workers)


def _stage_pretrain(args):
    from action3d.stages import pretrain

    return pretrain.run(_params(args), manifests_dir=args.manifests, cache_dir=args.cache, out_dir=args.out)


def _stage_finetune(args):
    from action3d.stages import finetune

    return finetune.run(_params(args), manifests_dir=args.manifests, cache_dir=args.cache, out_dir=args.out,
                        pretrained=args.pretrained)


def _stage_scratch(args):
    from action3d.stages import scratch

    return scratch.run(_params(args), manifests_dir=args.manifests, cache_dir=args.cache, out_dir=args.out)


def _stage_evaluate(args):
    from action3d.stages import evaluate

    return evaluate.run(_params(args), model_path=args.model, manifests_dir=args.manifests, cache_dir=args.cache,
                        out_dir=args.out, subset=args.subset)


def _stage_register(args):
    from action3d.stages import register

    return register.run(_params(args), train_dir=args.train, metrics_path=args.metrics,
                        test_manifest=args.test_manifest, cache_dir=args.cache, out_path=args.out)


def _add_data_stages(sub) -> None:
    """synth, split and cache: under both `stage` (for dvc.yaml) and `data` (by hand)."""
    p = sub.add_parser("synth", help="write the demo videos (Kinetics and UCF-101 layouts)")
    p.add_argument("--out", default="data/raw", help="writes OUT/pretrain and OUT/finetune")
    p.add_argument("--hmdb51", action="store_true", help="write the fine-tuning set in the HMDB-51 layout instead")
    p.add_argument("--workers", type=int, default=None, help="encoder processes (default: every core)")
    p.set_defaults(func=_stage_synth)

    p = sub.add_parser("split", help="a dataset in its official layout -> manifests")
    p.add_argument("--role", choices=["pretrain", "finetune"], required=True,
                   help="which layout knob applies: split.pretrain_layout or split.finetune_layout")
    p.add_argument("--data", required=True, help="the dataset's root folder")
    p.add_argument("--out", required=True, help="folder for train/val/test.csv, classes.json, report.json")
    p.add_argument("--annotations", default=None, help="split files, when not inside --data")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_stage_split)

    p = sub.add_parser("cache", help="raw videos -> training-ready frame packs")
    p.add_argument("--manifests", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_stage_cache)


TRAINING_STAGES = ("pretrain", "finetune", "scratch")  # each takes `nproc` from its section of params.yaml


def _add_training_stages(sub) -> None:
    for name, func, text in (("pretrain", _stage_pretrain, "train from scratch on the large set"),
                             ("finetune", _stage_finetune, "fine-tune on the small set"),
                             ("scratch", _stage_scratch, "the baseline: train from scratch on the small set")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--manifests", required=True)
        p.add_argument("--cache", required=True)
        p.add_argument("--out", required=True, help="model.pt, history.csv, run.json, checkpoints/")
        if name == "finetune":
            p.add_argument("--pretrained", default=None, help="the pretrain stage's model.pt (finetune.init=pretrain)")
        p.set_defaults(func=func)

    p = sub.add_parser("summary", help="the headline metrics in one file with short keys (dvc exp show)")
    p.add_argument("--finetune", required=True, help="evaluate@finetune's metrics.json")
    p.add_argument("--scratch", required=True, help="evaluate@scratch's metrics.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_stage_summary)

    p = sub.add_parser("check", help="validate params.yaml before any stage runs (the first stage of dvc.yaml)")
    p.add_argument("--out", required=True, help="a file whose constant content records that the params are valid")
    p.set_defaults(func=_stage_check)

    p = sub.add_parser("evaluate", help="video-level accuracy of a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--manifests", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--subset", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=_stage_evaluate)

    p = sub.add_parser("register", help="register the fine-tuned model; champion only if it is better")
    p.add_argument("--train", required=True, help="the finetune stage's folder (its run.json)")
    p.add_argument("--metrics", required=True, help="the evaluate stage's metrics.json")
    p.add_argument("--test-manifest", required=True, help="the test split whose digest the score belongs to "
                   "(classes.json beside it); a champion measured on another split is re-scored on this one")
    p.add_argument("--cache", required=True, help="the test videos' cache (the evaluate stage's --cache)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_stage_register)


# --- S3 and the report -----------------------------------------------------------------------------------------


def _s3_config(args):
    from action3d.storage import S3Config

    params = _params(args)
    return S3Config.from_env(endpoint_url=params.storage.endpoint_url, region=params.storage.region)


def _cmd_push(args):
    from action3d.storage import sync_up

    print(_transfer_summary(sync_up(args.dir, args.uri, config=_s3_config(args)), f"{args.dir} -> {args.uri}"))


def _cmd_pull(args):
    from action3d.storage import sync_down

    print(_transfer_summary(sync_down(args.uri, args.dir, config=_s3_config(args)), f"{args.uri} -> {args.dir}"))


def _transfer_summary(transfers, what: str) -> str:
    moved = [t for t in transfers if not t.skipped]
    return (f"{what}: {len(moved)} file(s) moved ({sum(t.bytes_moved for t in moved) / 1e6:.1f} MB), "
            f"{len(transfers) - len(moved)} unchanged")


def _cmd_report(args) -> None:
    from action3d.report import report, write_report
    from action3d.stages.common import project_root, tracking_uri

    if not (args.study or args.tune):
        print(report(Path(args.runs)))
    params = _params(args)
    index = write_report(Path(args.out), tracking_uri=tracking_uri(), experiment=args.experiment or
                         params.tracking.experiment, model_name=params.registry.model_name, root=project_root(),
                         study=args.study, tune=args.tune)
    print(f"\nreport: {index} (and {index.with_name('README.md')}): tables, curves, confusion matrices, champion")


def _cmd_tune(args) -> dict | None:
    from action3d import tune

    if args.worker is not None:  # one of --n-workers' extra processes: trials only, the first process reports
        tune.work(tune.setup(args.params, args.set), args.parent_run, worker=args.worker)
        return None
    result = tune.tune(args.params, args.set, n_workers=args.n_workers, apply=args.apply)
    print(json.dumps({k: v for k, v in result.items() if k != "applied"}, default=str))
    return result


def _cmd_predict(args) -> int | None:
    from action3d.predict import format_predictions, load, predict_files, to_json

    spec = args.model
    if spec is None:  # the champion of this project's registry
        spec = f"models:/{_params(args).registry.model_name}@champion"
    results = predict_files(load(spec), args.videos, topk=args.topk)
    print(to_json(results) if args.json else format_predictions(results, timeline=args.timeline))
    failed = [r.video for r in results if r.error]
    if failed:
        print(f"action3d: {len(failed)} of {len(results)} video(s) could not be classified: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return None


def _cmd_registry(args) -> None:
    from action3d.stages.common import tracking_uri
    from action3d import tracking

    uri = tracking_uri()
    name = args.name or _params(args).registry.model_name
    if args.registry_command == "list":
        rows = tracking.registry_versions(name, tracking_uri=uri)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"{name} ({len(rows)} versions, newest first)")
        for row in rows:
            key = row["metric_key"]
            metric = f"{key} {row[key]:.4f}" if key in row else "no test metric"
            print(f"  v{row['version']:<4} {','.join(row['aliases']) or '-':<20} {metric:<22} test data "
                  f"{(row['data_digest'] or '?')[:12]}  run {row['run_id'][:12]}  commit {(row['git_commit'] or '?')[:10]}"
                  f"  {row['created']}" + (f"  promoted: {row['promoted']}" if row["promoted"] else ""))
    elif args.registry_command == "show":
        version = args.version.lstrip("v")
        spec = f"models:/{name}/{version}" if version.isdigit() else f"models:/{name}@{args.version}"
        row = next(r for r in tracking.registry_versions(name, tracking_uri=uri)
                   if r["version"] == str(tracking.resolve_version(spec, tracking_uri=uri).version))
        print(json.dumps(row, indent=1))
    elif args.registry_command == "promote":
        version = args.version.lstrip("v")
        if not version.isdigit():  # an alias: the version it points at now
            version = str(tracking.resolve_version(f"models:/{name}@{args.version}", tracking_uri=uri).version)
        done = tracking.promote(name, version, alias=args.alias, reason=args.reason, tracking_uri=uri)
        print(f"{name}@{done['alias']} -> v{done['version']}" + (f" (was v{done['previous']})" if done["previous"]
                                                                   else "") + f": {done['reason']}")
    else:
        spec = args.model if args.model.startswith("models:/") else f"models:/{args.model}"
        from action3d.report import locate_data
        from action3d.stages.common import project_root

        print(json.dumps(locate_data(tracking.lineage(spec, tracking_uri=uri), project_root()), indent=1))




def _cmd_remote(args) -> None:
    from action3d.workspace import Workspace

    ws = Workspace(args.root)
    if args.remote_command == "setup":
        remote = ws.setup_remote(args.url, name=args.name, local=args.local)
        where = ".dvc/config.local (this machine only)" if args.local else ".dvc/config: commit it, workers clone it"
        print(f"DVC remote {remote.name!r} = {remote.url}" + (f" at {remote.endpoint_url}" if remote.endpoint_url
                                                               else "") + f", the default; written to {where}")
    else:
        remote = ws.check_remote()
        print(f"DVC remote {remote.name!r} = {remote.url} answers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="action3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="the knobs (default: params.yaml)")
    common.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a knob, e.g. -S finetune.lr=0.01 (repeatable)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no per-epoch lines: only errors and a stage's final JSON line "
                             "(bars are drawn only at a terminal anyway)")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list every registered 3D CNN with its size and cost")
    models.add_argument("filter", nargs="?", default=None, help="only names containing this text")
    models.set_defaults(func=_cmd_models)

    stage = sub.add_parser("stage", help="run one pipeline stage (dvc.yaml calls these)")
    stages = stage.add_subparsers(dest="stage", required=True, parser_class=_with(common))
    _add_data_stages(stages)
    _add_training_stages(stages)

    data = sub.add_parser("data", help="demo data, manifests, cache, and S3 transfers of raw datasets")
    datas = data.add_subparsers(dest="data_command", required=True, parser_class=_with(common))
    _add_data_stages(datas)
    for name, func, text in (("push", _cmd_push, "upload DIR to s3://bucket/prefix (only changed files move)"),
                             ("pull", _cmd_pull, "download s3://bucket/prefix into DIR (only changed files)")):
        p = datas.add_parser(name, help=text)
        p.add_argument("dir" if name == "push" else "uri")
        p.add_argument("uri" if name == "push" else "dir")
        p.set_defaults(func=func)

    predict = sub.add_parser("predict", parents=[common], help="classify video files with a registered model or a "
                                                             "checkpoint (top-k classes, per-window timeline)")
    predict.add_argument("videos", nargs="+", help="mp4, avi, mkv or webm files")
    predict.add_argument("--model", default=None, help="models:/<name>@<alias>, models:/<name>/<version> or a "
                                                       "model.pt (default: the champion of registry.model_name)")
    predict.add_argument("--topk", type=_positive_int, default=5, help="classes shown per video (default 5)")
    predict.add_argument("--timeline", action="store_true", help="the label of every window with its time range")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=_cmd_predict)

    registry = sub.add_parser("registry", help="the MLflow model registry: versions, promotion, lineage")
    registries = registry.add_subparsers(dest="registry_command", required=True, parser_class=_with(common))
    listing = registries.add_parser("list", help="every version: aliases, test metric, test data, run, commit")
    listing.add_argument("--json", action="store_true")
    show = registries.add_parser("show", help="one version (number or alias) in full")
    show.add_argument("version", help="a version number or an alias (champion)")
    promote = registries.add_parser("promote", help="point an alias at a version by hand, with a reason")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--reason", required=True)
    lineage = registries.add_parser("lineage", help="version -> runs -> data digests -> git commit")
    lineage.add_argument("model", help="<name>@<alias>, <name>/<version> or models:/...")
    for p in (listing, show, promote, lineage):
        p.add_argument("--name", default=None, help="registered model (default: registry.model_name)")
        p.set_defaults(func=_cmd_registry)

    tune = sub.add_parser("tune", parents=[common], help="Optuna: search tune.space of params.yaml for the target "
                                                        "stage (tune.target), pruning bad trials")
    tune.add_argument("--n-workers", type=int, default=1, help="processes on the study (default 1)")
    tune.add_argument("--apply", action="store_true", help="write the best trial's knobs into params.yaml")
    tune.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # extra process N of --n-workers
    tune.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
    tune.set_defaults(func=_cmd_tune)

    remote = sub.add_parser("remote", help="the DVC remote on S3 that workers pull data from and push results to")
    remotes = remote.add_subparsers(dest="remote_command", required=True)
    setup = remotes.add_parser("setup", help="make s3://BUCKET/PREFIX the default DVC remote (endpoint and region "
                                             "from AWS_ENDPOINT_URL / AWS_DEFAULT_REGION)")
    setup.add_argument("url", help="s3://bucket/prefix")
    setup.add_argument("--name", default="storage", help="the remote's name (default: storage)")
    setup.add_argument("--local", action="store_true", help="this machine only (.dvc/config.local, not committed)")
    check = remotes.add_parser("check", help="check that the default DVC remote is configured and answers")
    for p in (setup, check):
        p.add_argument("--root", default=".", help="the project folder (default: here)")
        p.set_defaults(func=_cmd_remote)

    report = sub.add_parser("report", parents=[common],
                            help="the pipeline's results in the terminal, and reports/index.html + README.md from MLflow")
    report.add_argument("--runs", default="runs", help="the pipeline's output folder")
    report.add_argument("--out", default="reports", help="where index.html, README.md and img/ go")
    report.add_argument("--experiment", default=None, help="MLflow experiment (default: tracking.experiment)")
    which = report.add_mutually_exclusive_group()
    which.add_argument("--study", default=None, help="report an architecture study (its entries) instead")
    which.add_argument("--tune", default=None, help="report a tuning study (its trials) instead")
    report.set_defaults(func=_cmd_report)
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _with(common: argparse.ArgumentParser):
    """A parser class whose instances all take the common --params / -S options."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, **kwargs):
            super().__init__(parents=[common], **kwargs)

    return Parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from action3d.progress import set_quiet

        set_quiet()
    training = getattr(args, "command", None) == "stage" and args.stage in TRAINING_STAGES
    try:
        if training:
            from action3d import distributed

            nproc = distributed.resolve_nproc(getattr(_params(args), args.stage).nproc)
            if nproc > 1 and not distributed.launched_by_torchrun():  # this same command, as nproc ranks
                return distributed.run_under_torchrun(nproc, sys.argv[1:] if argv is None else list(argv))
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Action3dError as err:  # bad input: one message a person can act on, no traceback
        print(f"action3d: error: {err}", file=sys.stderr)
        return 2
    main_rank = True
    if training:
        main_rank = distributed.is_main_process()
        distributed.cleanup()  # leave the process group (no-op in one process)
    if isinstance(result, int):  # a command's own exit status (predict: some videos failed)
        return result
    if isinstance(result, dict) and getattr(args, "command", None) == "stage" and main_rank:
        print(json.dumps(result, default=str))  # under torchrun rank 0 alone: DVC's log gets the result once
    return 0


if __name__ == "__main__":
    sys.exit(main())
