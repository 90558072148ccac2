"""flows/deploy.py stops before deploying anything, with one message that says what to do, when what the
deployments need is missing: the Prefect API, the git repository or branch workers clone, the DVC remote."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import free_port, make_project_repo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_project_repo(tmp_path_factory.mktemp("deploy") / "repo")


def _deploy(repo, *args, **env_changes):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    done = subprocess.run([sys.executable, "flows/deploy.py", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
    return done.stderr


def test_a_deployment_targeting_a_stage_dvc_yaml_lacks_is_named(tmp_path):
    repo = make_project_repo(tmp_path / "repo")
    spec = (repo / "prefect.yaml").read_text()
    (repo / "prefect.yaml").write_text(spec.replace('targets: ["scratch@pretrain"]', "targets: [pretrain]"))
    said = _deploy(repo, PREFECT_API_URL=None)
    assert "deployment 'weekly-pretrain' of prefect.yaml targets no stage 'pretrain'" in said
    assert "scratch@pretrain" in said  # the stages there are listed


def test_no_api_url_says_how_to_start_a_server(repo):
    assert "PREFECT_API_URL is not set" in _deploy(repo, PREFECT_API_URL=None)


def test_an_api_that_does_not_answer_is_named(repo):
    url = f"http://127.0.0.1:{free_port()}/api"
    message = _deploy(repo, PREFECT_API_URL=url)
    assert f"the Prefect API at {url} does not answer" in message and "make prefect-server" in message


def test_a_repository_or_branch_workers_cannot_clone(repo, tmp_path):
    message = _deploy(repo, "--repository", str(tmp_path / "nowhere.git"), PREFECT_API_URL=None)
    assert "workers cannot clone" in message and "nowhere.git" in message
    message = _deploy(repo, "--branch", "no-such-branch", PREFECT_API_URL=None)
    assert "has no branch 'no-such-branch'" in message and "git push origin no-such-branch" in message


def test_a_missing_dvc_remote_when_required(repo):
    message = _deploy(repo, "--require-remote", PREFECT_API_URL=None)
    assert "no DVC remote is configured" in message and "action3d remote setup" in message


def test_the_deployments_take_their_git_source_from_the_checkout_when_no_variable_is_set(repo, monkeypatch):
    """What `prefect deploy --all` asks of prefect.yaml's build step when a user types it with nothing exported:
    this checkout's origin (else its folder), its branch, paused schedules; a detached HEAD is named."""
    from action3d.workspace import WorkspaceError, deploy_source

    for name in ("ACTION3D_GIT_REPOSITORY", "ACTION3D_GIT_BRANCH", "ACTION3D_SCHEDULES_ACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(repo)
    assert deploy_source() == {"repository": str(repo), "branch": "main", "schedules_active": False}
    monkeypatch.setenv("ACTION3D_SCHEDULES_ACTIVE", "true")
    monkeypatch.setenv("ACTION3D_GIT_REPOSITORY", "https://git.example.com/team/action3d.git")
    assert deploy_source()["repository"].startswith("https://") and deploy_source()["schedules_active"] is True
    subprocess.run(["git", "checkout", "-q", "--detach"], cwd=repo, check=True)
    try:
        with pytest.raises(WorkspaceError, match="detached HEAD.*ACTION3D_GIT_BRANCH"):
            deploy_source()
    finally:
        subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
