"""The `action3d` command. It parses paths and overrides, then calls library functions: no logic lives here.

    action3d stage NAME --option PATH ...  one pipeline stage (what dvc.yaml runs; stages/__init__.py lists them)
    action3d models                        the model zoo with sizes and costs
    action3d predict VIDEO ...             classify video files with a registered model or a checkpoint
    action3d registry list|show|promote|lineage
    action3d tune                          Optuna over tune.space of params.yaml
    action3d remote setup|check            the DVC remote workers share
    action3d report                        the pipeline's results, in the terminal and as reports/index.html

Every command that reads knobs takes `--params params.yaml` and `-S key=value` overrides (as `dvc exp run -S`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from action3d.errors import Action3dError
from action3d.stages import RAN_LOG, STAGES, RunContext


def _params(args: argparse.Namespace):
    from action3d.config import load_params

    return load_params(args.params, args.set)


def _run_stage(args: argparse.Namespace) -> dict:
    """One stage, timed: runs/timings/<stage>.json holds its last run's seconds (the report's stage minutes)."""
    from action3d.atomic import write_json
    from action3d.project import project_root

    stage = STAGES[args.stage]
    params = _params(args)
    options = {option.name: getattr(args, option.name) for option in stage.options}
    started = time.monotonic()
    result = stage.run(params, ctx=RunContext.from_params(params), **options)
    label = stage.label(options)
    if "RANK" not in os.environ or _writer():  # the one process, or under torchrun the rank that writes outputs
        write_json(project_root() / "runs" / "timings" / f"{label}.json",
                   {"stage": label, "seconds": round(time.monotonic() - started, 1)})
        if os.environ.get(RAN_LOG):  # the caller asked to hear which stages ran (Workspace.repro)
            with open(os.environ[RAN_LOG], "a") as log:
                log.write(label + "\n")
    return result


def _writer() -> bool:
    from action3d import distributed

    return distributed.is_main_process()


def _rendezvous(args: argparse.Namespace, params, knobs):
    """Where the nodes of a multi-node training stage meet (`nnodes` > 1): the endpoint and the job id from the
    train flow's environment, else from params.yaml's `distributed` section and the stage's knobs."""
    from action3d.distributed import Rendezvous
    from action3d.project import digest

    stage = STAGES[args.stage]
    label = stage.label({o.name: getattr(args, o.name) for o in stage.options})
    endpoint = os.environ.get("ACTION3D_RDZV_ENDPOINT") or params.distributed.rdzv_endpoint
    if not endpoint:
        section = "finetune" if args.stage == "finetune" else f"scratch.{args.role}"
        raise Action3dError(f"{section}.nnodes is {knobs.nnodes}: the nodes need a place to meet. Set "
                            "distributed.rdzv_endpoint: HOST:PORT (a free port on one of them that every node "
                            "reaches), or train through flows/train.py, which sets it")
    key = digest(label, params.seed, knobs.model_dump())[:12]  # the same on every node: same code, params, stage
    job = os.environ.get("ACTION3D_RDZV_ID") or f"{label.replace('@', '-')}-{key}"
    return Rendezvous(knobs.nnodes, endpoint, job, params.distributed.max_restarts)


def _cmd_models(args: argparse.Namespace) -> None:
    from importlib.resources import files

    # measured once and shipped (action3d/models/summary.py, checked against the models by a unit test): printed
    # without importing torch or building the zoo
    rows = json.loads(files("action3d").joinpath("model_table.json").read_text())
    print(format_model_table([row for row in rows if not args.filter or args.filter in row["name"]]))


def format_model_table(rows: list[dict]) -> str:
    """`action3d models`' table: name, family, params in millions, GFLOPs (one clip of 16x112x112), one decimal each."""
    header = ("model", "family", "params (M)", "GFLOPs")
    body = [(r["name"], r["family"], f"{r['params'] / 1e6:.1f}", f"{r['flops'] / 1e9:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_report(args) -> None:
    from action3d.project import project_root, tracking_uri
    from action3d.report import terminal_summary, write_report

    params = _params(args)
    if not (args.study or args.tune):
        print(terminal_summary(Path(args.runs), params))
    index = write_report(Path(args.out), tracking_uri=tracking_uri(), experiment=args.experiment or
                         params.tracking.experiment, model_name=params.registry.model_name, root=project_root(),
                         study=args.study, tune=args.tune)
    print(f"\nreport: {index} (and {index.with_name('README.md')}): tables, curves, confusion matrices, champion")


def _cmd_tune(args) -> dict | None:
    from action3d import tune

    if args.dashboard:
        return tune.dashboard(tune.setup(args.params, args.set), port=args.port)
    if args.worker is not None:  # one of --n-workers' extra processes: trials only, the first process reports
        tune.work(tune.setup(args.params, args.set), args.parent_run, worker=args.worker)
        return None
    result = tune.tune(args.params, args.set, n_workers=args.n_workers, apply=args.apply)
    print(json.dumps({k: v for k, v in result.items() if k != "applied"}, default=str))
    return result


def _cmd_predict(args) -> int | None:
    from action3d.predict import format_predictions, predict_files, to_json
    from action3d.tracking.registry import load_classifier

    spec = args.model or f"models:/{_params(args).registry.model_name}@champion"  # this project's champion
    results = predict_files(load_classifier(spec), args.videos, topk=args.topk)
    print(to_json(results) if args.json else format_predictions(results, timeline=args.timeline))
    failed = [r.video for r in results if r.error]
    if failed:
        print(f"action3d: {len(failed)} of {len(results)} video(s) could not be classified: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cmd_registry(args) -> None:
    from action3d.project import project_root, tracking_uri
    from action3d.tracking import registry

    uri = tracking_uri()
    name = args.name or _params(args).registry.model_name
    if args.registry_command == "list":
        rows = registry.registry_versions(name, tracking_uri=uri)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"{name} ({_plural(len(rows), 'version')}, newest first)")
        for row in rows:
            key = row["metric_key"]
            metric = f"{key} {row[key]:.4f}" if key in row else "no test metric"
            print(f"  v{row['version']:<4} {','.join(row['aliases']) or '-':<20} {metric:<22} test data "
                  f"{(row['data_digest'] or '?')[:12]}  run {row['run_id'][:12]}  commit {(row['git_commit'] or '?')[:10]}"
                  f"  {row['created']}" + (f"  promoted: {row['promoted']}" if row["promoted"] else ""))
    elif args.registry_command == "show":
        version = args.version.lstrip("v")
        spec = f"models:/{name}/{version}" if version.isdigit() else f"models:/{name}@{args.version}"
        held = str(registry.resolve_version(spec, tracking_uri=uri).version)
        print(json.dumps(next(r for r in registry.registry_versions(name, tracking_uri=uri) if r["version"] == held),
                         indent=1))
    elif args.registry_command == "promote":
        version = args.version.lstrip("v")
        if not version.isdigit():  # an alias: the version it points at now
            version = str(registry.resolve_version(f"models:/{name}@{args.version}", tracking_uri=uri).version)
        done = registry.promote(name, version, alias=args.alias, reason=args.reason, tracking_uri=uri)
        print(f"{name}@{done['alias']} -> v{done['version']}" + (f" (was v{done['previous']})" if done["previous"]
                                                                   else "") + f": {done['reason']}")
    else:
        from action3d.report import locate_data

        spec = args.model if args.model.startswith("models:/") else f"models:/{args.model}"
        print(json.dumps(locate_data(registry.lineage(spec, tracking_uri=uri), project_root()), indent=1))


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


def _cmd_data_pack(args) -> dict:
    from action3d.data.raw import pack

    if not Path(args.source).is_dir():
        raise Action3dError(f"{args.source}: no such folder; give the set's folder in its official layout")
    try:
        done = pack(args.source, args.dest, shard_mb=args.shard_mb)
    except FileExistsError as err:
        raise Action3dError(str(err)) from None
    print(f"packed {done['videos']} videos of {args.source} into {done['tars']} tar file(s) in {args.dest} "
          f"({done['bytes'] / 1e9:.2f} GB), {done['other_files']} other file(s) copied: `dvc add {args.dest}` tracks "
          f"{done['tars'] + done['other_files'] + 1} files; set data.<role>.path: {args.dest}")
    return done


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

    stage = sub.add_parser("stage", help="run one pipeline stage (dvc.yaml calls these)")
    stages = stage.add_subparsers(dest="stage", required=True)
    for spec in STAGES.values():
        p = stages.add_parser(spec.name, parents=[common], help=spec.help)
        for option in spec.options:
            p.add_argument(option.flag, dest=option.name, required=option.required, help=option.help,
                           choices=option.choices or None)
        p.set_defaults(func=_run_stage)

    models = sub.add_parser("models", help="list every registered 3D CNN with its size and cost")
    models.add_argument("filter", nargs="?", default=None, help="only names containing this text")
    models.set_defaults(func=_cmd_models)

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
    registries = registry.add_subparsers(dest="registry_command", required=True)
    listing = registries.add_parser("list", parents=[common], help="every version: aliases, test metric, test data, "
                                                                   "run, commit")
    listing.add_argument("--json", action="store_true")
    show = registries.add_parser("show", parents=[common], help="one version (number or alias) in full")
    show.add_argument("version", help="a version number or an alias (champion)")
    promote = registries.add_parser("promote", parents=[common], help="point an alias at a version by hand, with a "
                                                                      "reason")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion")
    promote.add_argument("--reason", required=True)
    lineage = registries.add_parser("lineage", parents=[common], help="version -> runs -> data digests -> git commit")
    lineage.add_argument("model", help="<name>@<alias>, <name>/<version> or models:/...")
    for p in (listing, show, promote, lineage):
        p.add_argument("--name", default=None, help="registered model (default: registry.model_name)")
        p.set_defaults(func=_cmd_registry)

    tune = sub.add_parser("tune", parents=[common], help="Optuna: search tune.space of params.yaml for the target "
                                                        "stage (tune.target), pruning bad trials")
    tune.add_argument("--n-workers", type=_positive_int, default=1, help="processes on the study (default 1)")
    tune.add_argument("--apply", action="store_true", help="write the best trial's knobs into params.yaml")
    tune.add_argument("--dashboard", action="store_true", help="open optuna-dashboard on the study the params and "
                                                               "overrides name, instead of tuning")
    tune.add_argument("--port", type=_positive_int, default=8080, help="the dashboard's port (default 8080)")
    tune.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # extra process N of --n-workers
    tune.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
    tune.set_defaults(func=_cmd_tune)

    data = sub.add_parser("data", help="raw data sets: pack a large one into a few tar files read in place")
    datas = data.add_subparsers(dest="data_command", required=True)
    pack = datas.add_parser("pack", help="a set in its official layout -> DEST/videos/*.tar + DEST/videos.csv, the "
                                         "annotation files copied (for 10^5 videos and more: DVC pays per file)")
    pack.add_argument("source", help="the set's folder (UCF-101, HMDB-51, Kinetics or class folders)")
    pack.add_argument("dest", help="a new folder for the packed set")
    pack.add_argument("--shard-mb", type=float, default=1024, help="about this many MB per tar file (default 1024)")
    pack.set_defaults(func=_cmd_data_pack)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from action3d.progress import set_quiet

        set_quiet()
    training = args.command == "stage" and STAGES[args.stage].trains
    try:
        if training:
            from action3d import distributed

            params = _params(args)
            knobs = params.training(args.stage, getattr(args, "role", None))
            nproc = distributed.resolve_nproc(knobs.nproc)
            rendezvous = _rendezvous(args, params, knobs) if knobs.nnodes > 1 else None
            if (nproc > 1 or rendezvous) and not distributed.launched_by_torchrun():  # this command, as every rank
                return distributed.run_under_torchrun(nproc, sys.argv[1:] if argv is None else list(argv), rendezvous)
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
    if isinstance(result, dict) and args.command == "stage" and main_rank:
        print(json.dumps(result, default=str))  # under torchrun rank 0 alone: DVC's log gets the result once
    return 0


if __name__ == "__main__":
    sys.exit(main())
