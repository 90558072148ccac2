"""`action3d predict` and `action3d registry` on the session's tiny pipeline (its fine-tuned model, its registered
champion): predictions on raw video files (mp4, avi, mkv, webm), by checkpoint and by registry alias, read as a
stream; the registry's commands; and a model that learnt something names the right classes.

The tiny demo's model stays near chance after the seconds of training a test can afford, so most tests check what
predict computes (every window, the evaluate stage's windows, probabilities, the same answer from every container);
the last one trains a model that does learn, to check that the classes it names are right."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from action3d.cli import main
from action3d.predict import Classifier, scaled_frames
from tests.helpers import run, write_tiny_params, write_video

pytestmark = pytest.mark.slow

MODEL = "runs/finetune/model.pt"


def action3d(repo: Path, *args: str, check: bool = True):
    return run(repo, "action3d", *args, check=check)


@pytest.fixture
def cli(pipeline, monkeypatch, capsys):
    """`action3d ARGS` in this process, in the pipeline's folder: (exit status, stdout, stderr)."""
    monkeypatch.chdir(pipeline.repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def call(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def held_out(repo: Path) -> list[tuple[Path, str]]:
    names = json.loads((repo / "data/splits/finetune/classes.json").read_text())
    rows = [line.split(",") for line in (repo / "data/splits/finetune/test.csv").read_text().splitlines()[1:]]
    return [(repo / "data/demo/finetune" / r[0], names[int(r[1])]) for r in rows]


def test_predict_scores_every_window_the_evaluate_stage_scores(pipeline, cli):
    repo = pipeline.repo
    videos = held_out(repo)
    results = json.loads(cli("predict", *[str(v) for v, _ in videos], "--model", MODEL, "--json")[1])
    assert [r["video"] for r in results] == [str(v) for v, _ in videos]
    classes = json.loads((repo / "data/splits/finetune/classes.json").read_text())
    for result in results:
        names, probs = [n for n, _ in result["top"]], [p for _, p in result["top"]]
        assert sorted(names) == sorted(classes)  # top-5 of 3 classes: all of them, from the model's own card
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)
    # the card predict reads is the run's own: its classes in label order, its clip and frame sizes
    import torch

    from action3d.config import load_params

    card = torch.load(repo / MODEL, map_location="cpu", weights_only=True)["card"]
    params = load_params(repo / "params.yaml")
    assert card["classes"] == classes
    assert (card["clip_frames"], card["stride"], card["crop_size"], card["short_side"]) == (
        params.clip.frames, params.clip.stride, params.clip.crop_size, params.cache.short_side)
    # the evaluate stage scored the same test videos window by window: as many windows here
    metrics = json.loads((repo / "runs/evaluate/finetune/metrics.json").read_text())
    assert sum(len(r["windows"]) for r in results) == metrics["clips"]


def test_a_long_video_is_read_as_a_stream_and_scored_window_by_window(pipeline, tmp_path):
    """A video many windows long: the frames come one at a time, and the windows are scored in batches as they
    fill, so memory holds a window and a batch, never the video; the answer is the one for the whole video."""
    classifier = Classifier.from_file(pipeline.repo / MODEL)
    video = write_video(tmp_path / "long.mp4", frames=200, width=64, height=48)
    frames, fps = scaled_frames(video, classifier.card.short_side)
    assert not isinstance(frames, (list, tuple)) and fps == 25  # a generator: nothing decoded yet
    first = next(frames)
    assert min(first.shape[:2]) == classifier.card.short_side
    probs, _ = classifier.probabilities(video)
    span = classifier.card.clip_frames * classifier.card.stride
    assert len(probs) == 200 // span  # every whole window, as in evaluation
    same, _ = classifier.probabilities(io.BytesIO(video.read_bytes()))  # bytes in memory: the same answer
    assert same.tolist() == probs.tolist()
    from action3d.predict import TooLong

    with pytest.raises(TooLong, match="longer than the limit of 2 s"):
        classifier.predict(video, max_seconds=2)


def test_other_containers_give_the_same_answer(pipeline, cli, tmp_path):
    import av

    source, _ = held_out(pipeline.repo)[0]
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
    results = json.loads(cli("predict", str(source), *targets, "--model", MODEL, "--json")[1])
    for result in results[1:]:  # same frames, other containers and codecs
        assert result["error"] is None and len(result["windows"]) == len(results[0]["windows"])
        assert dict(result["top"]) == pytest.approx(dict(results[0]["top"]), abs=0.05)


def test_the_timeline_covers_the_video(pipeline, cli):
    import av

    video, _ = held_out(pipeline.repo)[0]
    result = json.loads(cli("predict", str(video), "--model", MODEL, "--timeline", "--json")[1])[0]
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        seconds = stream.frames / float(stream.average_rate)
    windows = result["windows"]
    window = windows[0]["end_s"] - windows[0]["start_s"]
    # from the first frame to the last whole window (what is left is shorter than a window, as in evaluation)
    assert windows[0]["start_s"] == 0 and 0 <= seconds - windows[-1]["end_s"] < window
    assert all(a["end_s"] == pytest.approx(b["start_s"]) for a, b in zip(windows, windows[1:]))  # no gap, no overlap
    text = cli("predict", str(video), "--model", MODEL, "--timeline")[1]
    assert text.count(" s  ") == len(windows)


def test_predict_by_alias_and_the_registry_commands(pipeline, cli):
    from action3d.project import file_md5

    repo = pipeline.repo
    video, _ = held_out(repo)[0]
    by_file = json.loads(cli("predict", str(video), "--model", MODEL, "--json")[1])[0]
    by_alias = json.loads(cli("predict", str(video), "--json")[1])[0]  # the champion
    assert by_alias["top"] == by_file["top"]

    listed = json.loads(cli("registry", "list", "--json")[1])
    champion = next(row for row in listed if "champion" in row["aliases"])
    run_id = json.loads((repo / "runs/finetune/run.json").read_text())["run_id"]
    registration = json.loads((repo / "runs/register/registration.json").read_text())
    assert champion["run_id"] == run_id and champion["version"] == str(registration["version"])
    text = cli("registry", "list")[1]
    assert text.startswith(f"action3d-demo ({len(listed)} version{'' if len(listed) == 1 else 's'}, newest first)")

    shown = json.loads(cli("registry", "show", "champion")[1])
    assert shown["version"] == champion["version"] and shown["run_id"] == run_id
    lineage = json.loads(cli("registry", "lineage", "action3d-demo@champion")[1])
    assert lineage["runs"][0]["run_id"] == run_id
    assert lineage["runs"][0]["data"]["train"] == file_md5(repo / "data/splits/finetune/train.csv")


def test_bad_models_and_bad_videos_are_named_and_the_rest_still_predicted(pipeline, cli, tmp_path):
    video, _ = held_out(pipeline.repo)[0]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    code, out, err = cli("predict", str(video), str(text), "--model", MODEL)
    assert code == 1 and f"{text}: error:" in out and f"{video}:" in out
    assert "1 of 2 video(s) could not be classified" in err

    for model, message in [("models:/action3d-demo@nope", "has no alias 'nope'; its aliases: "),
                           ("models:/action3d-demo/1x", "is not a registered model URI"),
                           ("models:/action3d-demo/99", "has no version 99; its versions: 1"),
                           ("models:/nobody@champion", "no registered model 'nobody'"),
                           (str(text), "is not a checkpoint"), ("missing.pt", "no such file")]:
        code, _, err = cli("predict", str(video), "--model", model)
        assert code == 2 and message in err and "Traceback" not in err, (model, err)
        assert "@nope" not in model or "champion (v" in err  # the aliases there are listed


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """A small set the tiny model does learn in seconds: three classes told apart by colour (with noise and
    movement), in the folder layout, through the pipeline's own split, cache and scratch stages."""
    import numpy as np

    from action3d.data.video import write_video as encode

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
            encode(root / "data/colours" / name / f"{name}_{i}.mp4", frames, fps=25)
    write_tiny_params(root, ["data={finetune: {path: data/colours, layout: folder}}", "synth.sets={}",
                             "split.val_fraction=0.2", "split.test_fraction=0.34", "scratch.finetune.epochs=12",
                             "scratch.finetune.lr=0.05"])
    (root / ".dvc").mkdir()
    for argv in (["split", "--role", "finetune", "--out", "data/splits/finetune"],
                 ["cache", "--role", "finetune", "--videos", "data/splits/finetune/slices/0.csv", "--out",
                  "data/cache/finetune/slice-0"],
                 ["scratch", "--role", "finetune", "--manifests", "data/splits/finetune", "--cache",
                  "data/cache/finetune", "--out", "runs/scratch/finetune"]):  # as dvc.yaml runs them
        action3d(root, "stage", *argv, "--quiet")
    return root


def test_predict_names_the_true_class_of_videos_the_model_learnt(colours):
    rows = [line.split(",") for line in (colours / "data/splits/finetune/test.csv").read_text().splitlines()[1:]]
    names = json.loads((colours / "data/splits/finetune/classes.json").read_text())
    videos = [(colours / "data/colours" / r[0], names[int(r[1])]) for r in rows]
    assert len(videos) >= 6 and len({truth for _, truth in videos}) == 3
    results = json.loads(action3d(colours, "predict", *[str(v) for v, _ in videos], "--model",
                                  "runs/scratch/finetune/model.pt", "--json").stdout)
    right = sum(r["top"][0][0] == truth for r, (_, truth) in zip(results, videos))
    assert right / len(videos) >= 0.8, (right, len(videos), results)  # chance is 1/3
