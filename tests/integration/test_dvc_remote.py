"""A DVC remote on S3 (moto on loopback), configured by storage.dvc_remote_commands: push from one clone,
pull into a fresh clone, byte-identical data."""

import os
import subprocess

import pytest

from action3d.storage import S3Config, dvc_remote_commands
from tests.helpers import BIN

pytestmark = pytest.mark.integration


def run(*argv, cwd):
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_into_a_fresh_clone_restores_identical_data(s3_bucket, s3_env, tmp_path, monkeypatch):
    """How a raw dataset moves between machines: `dvc add`, `dvc push` to the S3 remote, `dvc pull` elsewhere."""
    dvc = BIN / "dvc"
    for name, value in {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": tmp_path / "site-cache",
                        "DVC_GLOBAL_CONFIG_DIR": tmp_path / "dvc-global", "GIT_CONFIG_GLOBAL": os.devnull}.items():
        monkeypatch.setenv(name, str(value))
    repo = tmp_path / "repo"
    data = repo / "data" / "raw"
    (data / "class_a").mkdir(parents=True)
    (data / "big.bin").write_bytes(os.urandom(3 * 1024**2))
    (data / "class_a" / "clip1.mp4").write_bytes(os.urandom(30_000))
    (data / "class_a" / "clip2.mp4").write_bytes(b"")
    (repo / "data" / "labels.csv").write_text("path,label\nclass_a/clip1.mp4,0\n")

    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.name", "Test", cwd=repo)
    run("git", "config", "user.email", "test@example.com", cwd=repo)
    run(dvc, "init", "-q", cwd=repo)
    run(dvc, "add", "-q", "data/raw", "data/labels.csv", cwd=repo)
    for command in dvc_remote_commands(f"s3://{s3_bucket}/dvc", name="store", config=S3Config.from_env()):
        run(dvc, *command[1:], cwd=repo)
    # From here the endpoint must come from the committed remote config, not from the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "data", cwd=repo)
    run(dvc, "push", "-q", cwd=repo)

    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys)

    clone = tmp_path / "clone"
    run("git", "clone", "-q", repo, clone, cwd=tmp_path)
    assert not (clone / "data" / "raw").exists()
    run(dvc, "pull", "-q", cwd=clone)

    assert tree(clone / "data") == tree(repo / "data")
    assert "in sync" in run(dvc, "status", "--cloud", cwd=clone)
