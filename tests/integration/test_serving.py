"""The registered champion served by `mlflow models serve` on loopback, with every request treated as hostile: what
the README's request gets, and what each attack gets (files and buckets it was not told to serve, missing ones, too
many bytes, too long a video, too many rows): the same refusal for missing and not allowed, no server path, bucket
or endpoint in any answer, a flat memory, and a server that still answers afterwards."""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import BIN, free_port, serve, write_video

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMITS = {"ACTION3D_SERVE_MAX_MB": "1", "ACTION3D_SERVE_MAX_SECONDS": "10", "ACTION3D_SERVE_MAX_ROWS": "3"}


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and every process below it (the scoring server's workers)."""
    total, queue = 0, [pid]
    while queue:
        current = queue.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
        queue += [int(child) for child in children]
    return total


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory, s3_server):
    """The pipeline's champion behind `mlflow models serve`, allowed one folder and one bucket prefix."""
    folder = tmp_path_factory.mktemp("serving")
    allowed = folder / "allowed"
    allowed.mkdir()
    client = s3_server.client()
    for bucket in ("videos", "secrets"):
        client.create_bucket(Bucket=bucket)
    port = free_port()
    env = {**s3_server.env, **LIMITS, "MLFLOW_TRACKING_URI": f"sqlite:///{pipeline.repo / 'mlflow.db'}",
           "ACTION3D_SERVE_ROOTS": f"{allowed},s3://videos/allowed/",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # mlflow starts uvicorn by name, from the venv
    argv = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/action3d-demo@champion", "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "-w", "1"]
    with serve(argv, port=port, health_path="/ping", env=env, log_path=folder / "serve.log", timeout=240) as server:
        yield {"url": f"http://127.0.0.1:{port}", "process": server, "allowed": allowed, "folder": folder,
               "s3": s3_server, "log": folder / "serve.log"}


def ask(url: str, rows: list[dict], topk: int = 2, timeout: float = 120) -> list[dict]:
    """POST rows as the README does (a JSON body, as `curl -d @body.json` sends it); the answer's rows."""
    body = json.dumps({"dataframe_records": rows, "params": {"topk": topk}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=timeout).read())["predictions"]


def b64(path: Path) -> dict:
    return {"video_b64": base64.b64encode(path.read_bytes()).decode()}


def test_a_posted_video_gets_the_label_predict_gives_and_paths_only_under_the_allowed_roots(served, pipeline):
    from action3d.predict import Classifier

    video = next((pipeline.repo / "data/demo/finetune").rglob("*.avi"))
    expected = Classifier.from_file(pipeline.repo / "runs/finetune/model.pt").predict(video, topk=2)
    inside = served["allowed"] / "clip.avi"
    inside.write_bytes(video.read_bytes())
    served["s3"].client().upload_file(str(video), "videos", "allowed/clip.avi")
    answers = ask(served["url"], [b64(video), {"video": str(inside)}, {"video": "s3://videos/allowed/clip.avi"}])
    for row in answers:
        assert row["error"] == "" and row["label"] == expected.top[0][0], row
        assert row["top_classes"] == [name for name, _ in expected.top]
        assert row["top_probabilities"] == pytest.approx([p for _, p in expected.top], abs=1e-3)


def test_each_attack_is_refused_alike_and_the_answers_reveal_nothing(served):
    allowed, folder, s3 = served["allowed"], served["folder"], served["s3"]
    write_video(folder / "outside.mp4", frames=30)  # a real video, outside the allowed folder
    (allowed / "escape.mp4").symlink_to(folder / "outside.mp4")  # inside by name, outside once resolved
    s3.client().put_object(Bucket="secrets", Key="clip.mp4", Body=(folder / "outside.mp4").read_bytes())
    s3.client().put_object(Bucket="videos", Key="private/clip.mp4", Body=(folder / "outside.mp4").read_bytes())
    attacks = ["/etc/shadow", "/etc/does-not-exist", "/etc/passwd", "file:///etc/passwd", "../../../../etc/passwd",
               str(folder / "outside.mp4"), str(allowed / "escape.mp4"), str(allowed / "missing.mp4"),
               "s3://secrets/clip.mp4", "s3://videos/private/clip.mp4", "s3://videos/allowed/missing.mp4",
               "s3://videos/allowed/../private/clip.mp4", "s3://no-such-bucket/x.mp4", "s3://bad"]
    answers = ask(served["url"], [{"video": attack} for attack in attacks[:3]])
    answers += ask(served["url"], [{"video": attack} for attack in attacks[3:6]])
    answers += ask(served["url"], [{"video": attack} for attack in attacks[6:9]])
    answers += ask(served["url"], [{"video": attack} for attack in attacks[9:12]])
    answers += ask(served["url"], [{"video": attack} for attack in attacks[12:]])
    assert len({row["error"] for row in answers}) == 1, {a: r["error"] for a, r in zip(attacks, answers)}
    refusal = answers[0]["error"]
    assert "video_b64" in refusal and all(row["label"] == "" for row in answers)
    internal = [s3.endpoint_url, str(s3.port), "secrets", "private", str(folder), "/tmp", "Traceback", "botocore"]
    assert not [word for word in internal if word in refusal]


def test_what_costs_too_much_is_refused_with_flat_memory_and_the_server_answers_after(served, pipeline):
    url, process = served["url"], served["process"]
    ok = ask(url, [b64(next((pipeline.repo / "data/demo/finetune").rglob("*.avi")))])  # warm: the model is loaded
    before = tree_rss(process.pid)

    big = served["folder"] / "big.bin"
    big.write_bytes(os.urandom(1024**2 + 1))
    assert "over the limit of 1 MB per video" in ask(url, [b64(big)])[0]["error"]

    long = write_video(served["folder"] / "long.mp4", frames=20 * 25, width=320, height=240)  # 20 s, under 1 MB
    assert long.stat().st_size < 1024**2
    answer = ask(url, [b64(long)])[0]  # refused once its first 10 s are decoded, not after all 20
    assert answer["error"] == "the video is longer than the limit of 10 s per video" and answer["label"] == ""

    many = ask(url, [b64(long)] * 4)
    assert all(row["error"].startswith("the request holds 4 rows, over the limit of 3") for row in many)
    assert "not base64" in ask(url, [{"video_b64": "%%% not base64 %%%"}])[0]["error"]
    assert "needs a 'video_b64'" in ask(url, [{"other": "column"}])[0]["error"]
    assert "topk" in ask(url, [b64(long)], topk=0)[0]["error"]

    grown = tree_rss(process.pid) - before
    assert grown < 150 * 1024**2, f"the server grew by {grown / 1024**2:.0f} MB"
    again = ask(url, [b64(next((pipeline.repo / "data/demo/finetune").rglob("*.avi")))])
    assert again == ok  # it still answers, as before
    log = served["log"].read_text(errors="replace")
    assert "Traceback" not in log
