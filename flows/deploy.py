"""Deploy prefect.yaml's deployments to a Prefect server, after checking everything they need (`make deploy`).

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deploy.py [--repository URL] [--branch NAME] [--active]

Before `prefect --no-prompt deploy --all` runs, each of these stops it with one message that says what to do:
a deployment whose targets are not stages of dvc.yaml, PREFECT_API_URL unset or not answering, a work pool of
prefect.yaml that does not exist on that server, a git repository workers cannot clone or a branch it does not
have, and (with --require-remote) a project without a reachable DVC remote. Workers clone --repository at --branch (default: this folder and its current branch, for
trying it all on one machine); push your branch first when workers run elsewhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from action3d.errors import Action3dError  # noqa: E402
from action3d.workspace import Workspace, WorkspaceError  # noqa: E402


def check_api() -> str:
    """PREFECT_API_URL, answering."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise WorkspaceError("PREFECT_API_URL is not set: deployments live on a Prefect server. Start one "
                             "(`make prefect-server`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise WorkspaceError(f"the Prefect API at {url} does not answer ({failure}). Start the server "
                             "(`make prefect-server`) or fix PREFECT_API_URL")
    return url


def check_pools(pools: set[str], url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise WorkspaceError(f"work pool {pool!r} (prefect.yaml) does not exist on {url}: create it with "
                                     f"`prefect work-pool create {pool} --type process` (or `make worker`)") from None


def deployments_of(prefect_yaml: Path) -> list[dict]:
    import yaml

    return (yaml.safe_load(prefect_yaml.read_text()) or {}).get("deployments", [])


def check_targets(deployments: list[dict], ws: Workspace) -> None:
    """Every stage a deployment targets is a stage of dvc.yaml (a renamed stage would fail only at its first run)."""
    for deployment in deployments:
        targets = (deployment.get("parameters") or {}).get("targets") or []
        try:
            ws.stages(targets)
        except WorkspaceError as err:
            raise WorkspaceError(f"deployment {deployment.get('name')!r} of prefect.yaml targets {err}") from None


def check_git(repository: str, branch: str) -> None:
    found = subprocess.run(["git", "ls-remote", "--heads", repository, branch], capture_output=True, text=True)
    if found.returncode != 0:
        reason = (found.stderr.strip().splitlines() or ["git ls-remote failed"])[-1]
        raise WorkspaceError(f"workers cannot clone {repository}: {reason}. Pass --repository with a URL they can "
                             "reach")
    if not found.stdout.strip():
        raise WorkspaceError(f"{repository} has no branch {branch!r}: push it (`git push origin {branch}`) or pass "
                             "--branch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default=str(ROOT), help="git URL workers clone (default: this folder)")
    parser.add_argument("--branch", default=None, help="branch workers clone (default: the current one)")
    parser.add_argument("--active", action="store_true", help="schedules run at once (default: created paused)")
    parser.add_argument("--require-remote", action="store_true", help="fail unless a DVC remote is configured")
    args = parser.parse_args(argv)
    try:
        ws = Workspace(ROOT)
        deployments = deployments_of(ROOT / "prefect.yaml")
        check_targets(deployments, ws)
        branch = args.branch or ws.run("git", "branch", "--show-current").stdout.strip()
        if not branch:
            raise WorkspaceError("this checkout is on no branch (a detached HEAD): workers clone a branch. Check one "
                                 "out, or pass --branch NAME")
        if args.require_remote:
            ws.check_remote(shared=True)
        check_git(args.repository, branch)
        url = check_api()
        check_pools({d["work_pool"]["name"] for d in deployments if d.get("work_pool")}, url)
    except Action3dError as err:
        print(f"action3d: error: {err}", file=sys.stderr)
        return 2
    env = {**os.environ, "ACTION3D_GIT_REPOSITORY": args.repository, "ACTION3D_GIT_BRANCH": branch,
           "ACTION3D_SCHEDULES_ACTIVE": "true" if args.active else "false"}
    print(f"deploying prefect.yaml to {url}: workers clone {args.repository} at {branch}; schedules "
          f"{'active' if args.active else 'paused (resume them in the UI or with --active)'}")
    prefect = Path(sys.executable).parent / "prefect"
    return subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
