"""`action3d predict` and `action3d registry` with a model trained in the test on the tiny demo: predictions on
raw video files (mp4, avi, mkv, webm), by checkpoint and by registry alias, and the registry's commands.

The tiny demo's model stays near chance after the seconds of training a test can afford (40 epochs measured: 43%
of its training clips), so these tests check what predict computes (every window, the evaluate stage's windows,
probabilities, the same answer from every container) rather than how often it is right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, write_tiny_params

pytestmark = pytest.mark.slow

TRAIN = ["scratch.epochs=2", "scratch.workers=0"]


def _action3d(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own mlflow.db
    done = subprocess.run([sys.executable, "-m", "action3d.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _stage(cwd: Path, name: str) -> None:
    """A stage of dvc.yaml, by the command dvc.yaml gives it."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    item = name.split("@")
    cmd = spec[item[0]]["do"]["cmd"] if len(item) == 2 else spec[name]["cmd"]
    cmd = " ".join(cmd.split()).replace("${item}", item[-1])
    _action3d(cwd, *cmd.split()[1:], "--quiet")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """The tiny demo with a from-scratch model trained well enough, evaluated and registered (the pipeline's own
    stages, with the scratch model standing in for the fine-tuned one)."""
    root = tmp_path_factory.mktemp("predict")
    (root / ".dvc").mkdir()
    shutil.copytree(tiny_data / "data", root / "data")
    write_tiny_params(root, TRAIN)
    (root / "runs").mkdir()
    _action3d(root, "stage", "check", "--out", "runs/params.ok")
    _stage(root, "scratch")
    _action3d(root, "stage", "evaluate", "--model", "runs/scratch/model.pt", "--manifests", "data/splits/finetune",
              "--cache", "data/cache/finetune", "--out", "runs/evaluate/scratch", "--quiet")
    _action3d(root, "stage", "register", "--train", "runs/scratch", "--metrics", "runs/evaluate/scratch/metrics.json",
              "--test-manifest", "data/splits/finetune/test.csv", "--cache", "data/cache/finetune",
              "--out", "runs/register/registration.json", "--quiet")
    return root


def _test_videos(project: Path) -> list[tuple[Path, str]]:
    names = json.loads((project / "data/splits/finetune/classes.json").read_text())
    rows = [line.split(",") for line in (project / "data/splits/finetune/test.csv").read_text().splitlines()[1:]]
    return [(project / "data/raw/finetune" / r[0], names[int(r[1])]) for r in rows]


def test_predict_scores_every_window_the_evaluate_stage_scores(project):
    videos = _test_videos(project)
    done = _action3d(project, "predict", *[str(v) for v, _ in videos], "--model", "runs/scratch/model.pt", "--json")
    results = json.loads(done.stdout)
    assert [r["video"] for r in results] == [str(v) for v, _ in videos]
    classes = json.loads((project / "data/splits/finetune/classes.json").read_text())
    for result in results:
        names, probs = [n for n, _ in result["top"]], [p for _, p in result["top"]]
        assert sorted(names) == sorted(classes)  # top-5 of 3 classes: all of them, from the model's own card
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)
    # the card predict reads is the run's own: its classes in label order, its clip and frame sizes
    import torch

    from action3d.config import load_params

    card = torch.load(project / "runs/scratch/model.pt", map_location="cpu", weights_only=True)["card"]
    params = load_params(project / "params.yaml")
    assert card["classes"] == classes
    assert (card["clip_frames"], card["stride"], card["crop_size"], card["short_side"]) == (
        params.clip.frames, params.clip.stride, params.clip.crop_size, params.cache.short_side)
    # the evaluate stage scored the same test videos window by window: as many windows here
    metrics = json.loads((project / "runs/evaluate/scratch/metrics.json").read_text())
    assert sum(len(r["windows"]) for r in results) == metrics["clips"]


def test_other_containers_give_the_same_answer(project, tmp_path):
    import av

    source, _ = _test_videos(project)[0]
    targets = []
    for suffix, codec in ((".avi", "mpeg4"), (".mkv", "libx264"), (".webm", "libvpx-vp9")):
        target = tmp_path / f"clip{suffix}"
        with av.open(str(source)) as src, av.open(str(target), "w") as dst:
            stream = dst.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            if codec == "mpeg4":
                stream.bit_rate = 2_000_000
            for frame in src.decode(video=0):
                rgb = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
                for packet in stream.encode(rgb):
                    dst.mux(packet)
            for packet in stream.encode():
                dst.mux(packet)
        targets.append(str(target))
    results = json.loads(_action3d(project, "predict", str(source), *targets, "--model", "runs/scratch/model.pt",
                                   "--json").stdout)
    for result in results[1:]:  # same frames, other containers and codecs
        assert result["error"] is None and len(result["windows"]) == len(results[0]["windows"])
        assert dict(result["top"]) == pytest.approx(dict(results[0]["top"]), abs=0.05)


def test_the_timeline_covers_the_video(project):
    import av

    video, _ = _test_videos(project)[0]
    result = json.loads(_action3d(project, "predict", str(video), "--model", "runs/scratch/model.pt", "--timeline",
                                  "--json").stdout)[0]
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        seconds = stream.frames / float(stream.average_rate)
    windows = result["windows"]
    window = windows[0]["end_s"] - windows[0]["start_s"]
    # from the first frame to the last whole window (what is left is shorter than a window, as in evaluation)
    assert windows[0]["start_s"] == 0 and 0 <= seconds - windows[-1]["end_s"] < window
    assert all(a["end_s"] == pytest.approx(b["start_s"]) for a, b in zip(windows, windows[1:]))  # no gap, no overlap
    text = _action3d(project, "predict", str(video), "--model", "runs/scratch/model.pt", "--timeline").stdout
    assert text.count(" s  ") == len(windows)


def test_predict_by_alias_and_the_registry_commands(project):
    video, _ = _test_videos(project)[0]
    by_file = json.loads(_action3d(project, "predict", str(video), "--model", "runs/scratch/model.pt",
                                   "--json").stdout)[0]
    by_alias = json.loads(_action3d(project, "predict", str(video), "--json").stdout)[0]  # the champion
    assert by_alias["top"] == by_file["top"]

    listed = json.loads(_action3d(project, "registry", "list", "--json").stdout)
    assert listed[0]["version"] == "1" and listed[0]["aliases"] == ["champion"]
    run = json.loads((project / "runs/scratch/run.json").read_text())
    assert listed[0]["run_id"] == run["run_id"]

    promoted = _action3d(project, "registry", "promote", "1", "--alias", "staging", "--reason", "smoke test").stdout
    assert "action3d-demo@staging -> v1" in promoted
    shown = json.loads(_action3d(project, "registry", "show", "staging").stdout)
    assert shown["version"] == "1" and shown["promoted"] == "smoke test"

    lineage = json.loads(_action3d(project, "registry", "lineage", "action3d-demo@champion").stdout)
    from action3d.storage import file_md5

    assert lineage["runs"][0]["run_id"] == run["run_id"]
    assert lineage["runs"][0]["data"]["train"] == file_md5(project / "data/splits/finetune/train.csv")


def test_bad_models_and_bad_videos_are_named_and_the_rest_still_predicted(project, tmp_path):
    video, _ = _test_videos(project)[0]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    done = _action3d(project, "predict", str(video), str(text), "--model", "runs/scratch/model.pt", check=False)
    assert done.returncode == 1 and f"{text}: error:" in done.stdout and f"{video}:" in done.stdout
    assert "1 of 2 video(s) could not be classified" in done.stderr

    for model, message in [("models:/action3d-demo@nope", "has no alias 'nope'; its aliases: champion (v1)"),
                           ("models:/action3d-demo/1x", "is not a registered model URI"),
                           ("models:/action3d-demo/9", "has no version 9; its versions: 1"),
                           ("models:/nobody@champion", "no registered model 'nobody'"),
                           (str(text), "is not a checkpoint"), ("missing.pt", "no such file")]:
        done = _action3d(project, "predict", str(video), "--model", model, check=False)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (model, done.stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_champion_serves_videos_over_rest(project, tmp_path):
    """`mlflow models serve` of the registered champion on loopback: a posted video (bytes, or a path on the server)
    gets the label `action3d predict` gives it; a bad row gets its own error, the others their labels."""
    import base64
    import time
    import urllib.request

    video, _ = _test_videos(project)[0]
    expected = json.loads(_action3d(project, "predict", str(video), "--model", "runs/scratch/model.pt",
                                    "--topk", "2", "--json").stdout)[0]
    port = _free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow starts uvicorn by name, from the venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    mlflow_cli = str(Path(venv_bin) / "mlflow")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", "models:/action3d-demo@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
                              cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow models serve did not answer /ping in 2 minutes:\n"
                                 + (tmp_path / "serve.log").read_text()[-3000:])
        rows = [{"video_b64": base64.b64encode(video.read_bytes()).decode()}, {"video": str(video)},
                {"video_b64": base64.b64encode(b"not a video").decode()}]
        body = json.dumps({"dataframe_records": rows, "params": {"topk": 2}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    for row in answer[:2]:
        assert row["error"] == "" and row["label"] == expected["top"][0][0]
        assert row["top_classes"] == [name for name, _ in expected["top"]]
        assert row["top_probabilities"] == pytest.approx([p for _, p in expected["top"]], abs=1e-3)
    assert answer[2]["label"] == "" and "not a video this can decode" in answer[2]["error"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """A small set the tiny model does learn in seconds: three classes told apart by colour (with noise and
    movement), in the folder layout, through the pipeline's own split, cache and scratch stages."""
    import numpy as np

    from action3d.data.video import write_video

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    tints = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
    for name, tint in tints.items():
        for i in range(8):
            frames = []
            for t in range(24):
                frame = np.clip(rng.normal(tint, 30, size=(48, 64, 3)), 0, 255).astype(np.uint8)
                frame[:, (4 * t + 7 * i) % 64:][:, :8] = 255  # a white bar sweeping across
                frames.append(frame)
            write_video(root / "data/raw/finetune" / name / f"{name}_{i}.mp4", frames, fps=25)
    write_tiny_params(root, ["split.finetune_layout=folder", "split.val_fraction=0.2", "split.test_fraction=0.34",
                             "scratch.epochs=12", "scratch.workers=0", "scratch.lr=0.05"])
    (root / ".dvc").mkdir()
    (root / "runs").mkdir()
    _action3d(root, "stage", "check", "--out", "runs/params.ok")
    for stage in ("split@finetune", "cache@finetune", "scratch"):
        _stage(root, stage)
    return root


def test_predict_names_the_true_class_of_videos_the_model_learnt(colours):
    rows = [line.split(",") for line in (colours / "data/splits/finetune/test.csv").read_text().splitlines()[1:]]
    names = json.loads((colours / "data/splits/finetune/classes.json").read_text())
    videos = [(colours / "data/raw/finetune" / r[0], names[int(r[1])]) for r in rows]
    assert len(videos) >= 6 and len({truth for _, truth in videos}) == 3
    results = json.loads(_action3d(colours, "predict", *[str(v) for v, _ in videos], "--model",
                                   "runs/scratch/model.pt", "--json").stdout)
    right = sum(r["top"][0][0] == truth for r, (_, truth) in zip(results, videos))
    assert right / len(videos) >= 0.8, (right, len(videos), results)  # chance is 1/3
