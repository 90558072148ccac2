"""engine.py: training falls, evaluation aggregates every window of a video, checkpoints every epoch, exact resume,
NaN and full-disk handling, DDP."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from action3d import engine
from action3d.checkpoint import CheckpointError, read_checkpoint
from action3d.engine import (
    FitConfig,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    seed_everything,
    train_one_epoch,
)

CLASSES = 3


class TinyNet(nn.Module):
    """Conv3d + pool + linear: enough to learn the toy classes below."""

    def __init__(self, num_classes: int = CLASSES, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):  # [B, 3, T, H, W] -> [B, C]
        return self.fc(self.drop(self.pool(torch.relu(self.conv(x))).flatten(1)))


class ClipDataset(Dataset):
    """Clips as the data loaders yield them; clip i belongs to video i // clips_per_video."""

    def __init__(self, n: int = 24, clips_per_video: int = 2, seed: int = 0, nan_at: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) // clips_per_video % CLASSES
        self.videos = torch.randn(n, 3, 4, 6, 6, generator=g) * 0.5
        self.videos[torch.arange(n), self.labels] += 1.0  # the class brightens one colour channel
        if nan_at is not None:
            self.videos[nan_at] = float("nan")
        self.clips_per_video = clips_per_video

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        video_index = torch.tensor(i // self.clips_per_video)
        return {"video": self.videos[i], "label": self.labels[i], "video_index": video_index}


def loaders(seed: int = 0, batch_size: int = 4, **data):
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(ClipDataset(**data), batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
    val = DataLoader(ClipDataset(n=12, seed=1), batch_size=5, shuffle=False, num_workers=0)
    return train, val


def run_fit(tmp: Path, epochs: int, *, seed: int = 0, on_epoch_end=None, train=None, **kw):
    """A whole run as a stage would start it: seed, build, fit (resuming from tmp/last.pt if present)."""
    seed_everything(seed)
    model = TinyNet(dropout=0.3)  # dropout draws from torch's global RNG: resume must restore it
    train_loader, val_loader = loaders(seed)
    optimizer = build_optimizer(model, lr=0.5)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=epochs, warmup_epochs=int(epochs > 1))
    result = fit(
        model, train or train_loader, val_loader, FitConfig(epochs, progress=False, **kw), optimizer=optimizer,
        scheduler=scheduler, checkpoint_dir=tmp, arch="tiny", model_kwargs={"num_classes": CLASSES},
        on_epoch_end=on_epoch_end,
    )  # fmt: skip
    return model, result


def comparable(history):
    return [{k: v for k, v in h.items() if "per_s" not in k} for h in history]


# --- training --------------------------------------------------------------------------------------------------


def test_a_tiny_model_learns_and_checkpoints_every_epoch(tmp_path):
    seen = []
    _, result = run_fit(tmp_path, 5, on_epoch_end=lambda epoch, m: seen.append((epoch, m["val_video_top1"])))
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5] and [e for e, _ in seen] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_video_top1"] >= 0.8
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 5 and state["arch"] == "tiny" and state["model_kwargs"] == {"num_classes": CLASSES}
    assert len(state["history"]) == 5 and state["best_metric"] == max(h["val_video_top1"] for h in history)
    assert {"python", "numpy", "torch", "cuda", "generators"} <= set(state["rng"]) and state["rng"]["generators"]
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 5
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["best_metric"] == result["best_metric"] and best["epoch"] == result["best_epoch"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_gives_the_same_epochs_as_an_uninterrupted_run(tmp_path):
    straight_model, straight = run_fit(tmp_path / "straight", 4)

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt  # a killed job: the epoch's checkpoint is already on disk

    with pytest.raises(KeyboardInterrupt):
        run_fit(tmp_path / "cut", 4, on_epoch_end=stop_after_two)
    assert read_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    torch.manual_seed(123)  # the new process's RNG is elsewhere: resume must put it back
    resumed_model, resumed = run_fit(tmp_path / "cut", 4)

    assert resumed["epochs_resumed"] == 2
    a, b = comparable(straight["history"]), comparable(resumed["history"])
    assert [h["epoch"] for h in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["epoch"], key)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q)


def test_a_finished_run_is_not_trained_again(tmp_path):
    run_fit(tmp_path, 2)
    before = (tmp_path / "last.pt").stat().st_mtime_ns
    _, again = run_fit(tmp_path, 2)
    assert again["epochs_resumed"] == 2 and len(again["history"]) == 2
    assert (tmp_path / "last.pt").stat().st_mtime_ns == before


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    run_fit(tmp_path, 1)
    seed_everything(0)
    model = TinyNet()
    train, val = loaders()
    with pytest.raises(CheckpointError, match=r"last\.pt.*'tiny'.*'other'"):
        fit(model, train, val, FitConfig(2, progress=False), optimizer=build_optimizer(model),
            checkpoint_dir=tmp_path, arch="other", model_kwargs={"num_classes": CLASSES})  # fmt: skip


def test_resume_from_a_damaged_last_checkpoint_names_it_and_says_what_to_do(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 cut off mid-copy")
    with pytest.raises(CheckpointError, match=r"cannot resume: .*last\.pt is not a checkpoint.*Delete .*last\.pt"):
        run_fit(tmp_path, 1)


@pytest.mark.filterwarnings("ignore:the checkpoint holds 1 loader generator")  # the poisoned loader has none
def test_nan_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_fit(tmp_path, 1)
    good = read_checkpoint(tmp_path / "last.pt")
    poisoned = DataLoader(ClipDataset(nan_at=5), batch_size=4, shuffle=False)  # clip 5 is in step 1
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint is .*last\.pt \(epoch 1\)"):
        run_fit(tmp_path, 3, train=poisoned)
    after = read_checkpoint(tmp_path / "last.pt")
    assert after["epoch"] == 1
    for key, value in good["state_dict"].items():
        torch.testing.assert_close(after["state_dict"][key], value)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    with pytest.raises(CheckpointError, match="No space left.*previous last.pt.*untouched"):
        run_fit(tmp_path, 3)
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp file left behind


def test_bf16_channels_last_and_clipping_on_cpu():
    seed_everything(0)
    model = engine.prepare_model(TinyNet(), "cpu", channels_last=True)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    train, val = loaders()
    train.dataset.skipped_videos = 2  # what a data loader that skips unreadable videos exposes
    optimizer = build_optimizer(model, lr=0.05)
    before = model.fc.weight.detach().clone()
    metrics = train_one_epoch(
        model, nn.CrossEntropyLoss(), optimizer, train, "cpu", 1,
        autocast_dtype=torch.bfloat16, channels_last=True, grad_clip=1.0, progress=False,
    )  # fmt: skip
    assert np.isfinite(metrics["loss"]) and metrics["clips"] == 24 and metrics["skipped_videos"] == 2
    assert metrics["lr"] == 0.05 and metrics["clips_per_s"] > 0
    assert not torch.equal(before, model.fc.weight)
    result = evaluate(model, nn.CrossEntropyLoss(), val, "cpu", autocast_dtype=torch.bfloat16, channels_last=True,
                      progress=False)  # fmt: skip
    assert result["clips"] == 12 and result["videos"] == 6
    hits = result["video_probs"].argmax(axis=1) == result["video_labels"]  # the video score is the mean softmax's
    assert result["video_top1"] == pytest.approx(hits.mean())
    with pytest.raises(ValueError, match="bfloat16"):
        train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, train, "cpu", 1, autocast_dtype=torch.float16,
                        progress=False)  # fmt: skip


# --- evaluation ------------------------------------------------------------------------------------------------


class EchoLogits(nn.Module):
    """Returns the logits written into the clip itself: video[:, 0, 0, 0, :C]."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, 0, 0, 0, :] + 0 * self.unused


def test_evaluate_aggregates_every_window_of_a_video_across_batches():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 4, generator=g) * 2
    index = torch.tensor([4, 4, 4, 0, 0, 9, 1, 1, 1, 1])
    labels = torch.tensor([2, 2, 2, 1, 1, 3, 0, 0, 0, 0])
    batches = [
        {"video": logits[i : i + 3].reshape(-1, 1, 1, 1, 4).expand(-1, 3, 1, 1, 4), "label": labels[i : i + 3],
         "video_index": index[i : i + 3]}
        for i in range(0, 10, 3)
    ]  # fmt: skip — batches of 3 split videos 4, 0 and 1 across batches
    result = evaluate(EchoLogits(), nn.CrossEntropyLoss(), batches, "cpu", progress=False)
    probs = logits.softmax(1).numpy()  # each video's score: the mean softmax of its clips, computed here by hand
    expected = np.stack([probs[index.numpy() == video].mean(axis=0) for video in (0, 1, 4, 9)])
    np.testing.assert_allclose(result["video_probs"], expected, rtol=1e-6)
    assert result["video_index"].tolist() == [0, 1, 4, 9] and result["videos"] == 4 and result["clips"] == 10
    assert result["video_labels"].tolist() == [1, 0, 2, 3]
    assert result["video_top1"] == pytest.approx(float((expected.argmax(1) == [1, 0, 2, 3]).mean()))
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert result["confusion_matrix"].sum() == 4 and result["per_class_accuracy"].shape == (4,)
    reversed_time = evaluate(EchoLogits(), nn.CrossEntropyLoss(), batches, "cpu", progress=False,
                             input_transform=lambda v: -v)  # fmt: skip
    assert reversed_time["loss"] != pytest.approx(result["loss"])  # the hook reaches the model's input


# --- optimisation ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_optimizer_and_schedulers_follow_the_recipe():
    model = TinyNet()
    model.conv.requires_grad_(False)  # frozen layers are left out, as when fine-tuning from a later block
    sgd = build_optimizer(model)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]) == (
        0.1, 0.9, 0.9, 1e-3, False,
    )  # fmt: skip
    assert len(group["params"]) == 2  # fc weight and bias only
    with pytest.raises(ValueError, match="dampening=0"):
        build_optimizer(model, nesterov=True)

    def lrs(scheduler, optimizer, epochs, values=None):
        out = []
        for e in range(epochs):
            out.append(optimizer.param_groups[0]["lr"])
            scheduler.step(*([values[e]] if values else []))
        return out

    opt = build_optimizer(model, lr=1.0)
    cosine = lrs(build_scheduler(opt, name="cosine", epochs=6, warmup_epochs=2), opt, 6)
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[3] < 1.0 and cosine[5] < cosine[4] < cosine[3]
    opt = build_optimizer(model, lr=1.0)
    assert lrs(build_scheduler(opt, name="multistep", milestones=[2, 4]), opt, 5) == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01]
    )
    opt = build_optimizer(model, lr=1.0)
    plateau = build_scheduler(opt, name="plateau", patience=2)
    assert lrs(plateau, opt, 6, values=[1.0, 0.9, 0.9, 0.9, 0.9, 0.9]) == pytest.approx([1, 1, 1, 1, 1, 0.1])
    opt = build_optimizer(model, lr=1.0)
    per_step = build_scheduler(opt, name="cosine", epochs=2, warmup_epochs=1, steps_per_epoch=4)
    assert lrs(per_step, opt, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        build_scheduler(opt, name="step")


# --- DDP -------------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    sys.path.insert(0, sys.argv[2])
    from test_engine import TinyNet, ClipDataset, CLASSES
    from action3d import distributed, engine

    out = Path(sys.argv[1])
    info = distributed.init_distributed()
    engine.seed_everything(0)
    model = engine.prepare_model(TinyNet(), info.device)
    train_set, val_set = ClipDataset(n=16), ClipDataset(n=12, seed=1)
    train = DataLoader(train_set, batch_size=4, sampler=DistributedSampler(train_set, shuffle=False))
    val = DataLoader(val_set, batch_size=5, sampler=distributed.ShardSampler(len(val_set)))
    optimizer = engine.build_optimizer(model, lr=0.05)
    result = engine.fit(
        model, train, val, engine.FitConfig(2, device=info.device, progress=False), optimizer=optimizer,
        checkpoint_dir=out / f"ck{info.rank}", arch="tiny", model_kwargs={"num_classes": CLASSES},
    )
    (out / f"rank{info.rank}.json").write_text(json.dumps({"world": info.world_size, "history": result["history"]}))
    distributed.cleanup()
    """
)


@pytest.mark.slow
def test_torchrun_two_ranks_agree_and_match_one_process(tmp_path):
    (tmp_path / "ddp_script.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "ddp_script.py"), str(tmp_path), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world"] == 2
    assert comparable(rank0["history"]) == comparable(rank1["history"])
    assert (tmp_path / "ck0" / "last.pt").is_file() and not (tmp_path / "ck1").exists()  # rank 0 alone writes
    assert set(read_checkpoint(tmp_path / "ck0" / "last.pt")["state_dict"]) == set(TinyNet().state_dict())
    assert rank0["history"][-1]["val_clips"] == 12 and rank0["history"][-1]["val_videos"] == 6  # gathered

    # one process, batch 8 = two ranks of 4: the same gradients, so the same metrics
    seed_everything(0)
    model = TinyNet()
    train = DataLoader(ClipDataset(n=16), batch_size=8, shuffle=False)
    val = DataLoader(ClipDataset(n=12, seed=1), batch_size=5, shuffle=False)
    single = fit(model, train, val, FitConfig(2, progress=False), optimizer=build_optimizer(model, lr=0.05),
                 checkpoint_dir=tmp_path / "single", arch="tiny", model_kwargs={"num_classes": CLASSES})  # fmt: skip
    for x, y in zip(comparable(single["history"]), comparable(rank0["history"])):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


# --- every clip once an epoch across the world, the same steps as one process (our loader, sampler and engine) -----

WORLD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_engine import TinyNet, CLASSES
    from action3d import distributed, engine
    from action3d.data.loaders import make_train_loader

    out, data = Path(sys.argv[1]), Path(sys.argv[3])
    info = distributed.init_distributed()
    loader = make_train_loader(data / "splits" / "train.csv", data / "cache", clip_frames=4, crop_size=16,
                               batch_size=int(sys.argv[4]), workers=0, seed=0)
    drawn = {}
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        keys = [(int(v), float(w)) for b in loader for v, w in zip(b["video_index"], b["weight"])]
        drawn[epoch] = [k for part in distributed.all_gather_objects(keys) for k in part]
    engine.seed_everything(0)
    model = engine.prepare_model(TinyNet(), info.device)
    result = engine.fit(model, loader, None, engine.FitConfig(2, device=info.device, monitor="train_top1",
                                                              progress=False),
                        optimizer=engine.build_optimizer(model, lr=0.05), checkpoint_dir=out / "ck", arch="tiny",
                        model_kwargs={"num_classes": CLASSES})
    if distributed.is_main_process():
        (out / "world.json").write_text(json.dumps({"world": info.world_size, "drawn": drawn,
                                                    "history": result["history"]}))
    distributed.cleanup()
    """
)


@pytest.fixture(scope="module")
def fifteen_videos(tmp_path_factory):
    """15 tiny real videos in class folders, split (all in train) and cached: 15 does not divide among 2 or 4."""
    from action3d.data.annotations import build_manifests
    from action3d.data.cache import build_cache
    from tests.helpers import write_video

    root = tmp_path_factory.mktemp("fifteen")
    for i in range(15):
        write_video(root / "raw" / f"class{i % CLASSES}" / f"v{i:02d}.mp4", frames=8, width=32, height=24, seed=i)
    build_manifests("folder", root / "raw", root / "splits", val_fraction=0.0, test_fraction=0.0, workers=1,
                    progress=False)
    build_cache(root / "splits", root / "raw", root / "cache", short_side=16, workers=1, progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("nodes, per_node", [(1, 2), (2, 2)])
def test_every_clip_counts_once_an_epoch_and_the_world_steps_as_one_process(tmp_path, fifteen_videos, nodes, per_node):
    """2 processes on one machine, and 2 machines of 2 processes (two torchrun agents meeting at a c10d rendezvous
    on loopback), each with batch 4 per process: every video counts once an epoch (the fillers that even out the
    ranks' shares weigh 0), and training matches one process with the global batch (4 x world)."""
    (tmp_path / "world_script.py").write_text(WORLD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [str(tmp_path / "world_script.py"), str(tmp_path), str(Path(__file__).parent), str(fifteen_videos), "4"]
    if nodes == 1:
        launches = [["--standalone", "--nproc-per-node", str(per_node)]]
    else:
        from tests.helpers import free_port

        port = free_port()
        launches = [["--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "world-test"]] * nodes
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, *script], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for launch in launches]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["world"] == nodes * per_node
    for epoch, keys in world["drawn"].items():
        counted = sorted(v for v, w in keys if w > 0)
        assert counted == list(range(15)), epoch  # each video once
        assert len(keys) - len(counted) == -15 % world["world"]  # the fillers, weighing nothing

    from action3d.data.loaders import make_train_loader

    seed_everything(0)
    model = TinyNet()
    one = make_train_loader(fifteen_videos / "splits" / "train.csv", fifteen_videos / "cache", clip_frames=4,
                            crop_size=16, batch_size=4 * world["world"], workers=0, seed=0)
    single = fit(model, one, None, FitConfig(2, monitor="train_top1", progress=False),
                 optimizer=build_optimizer(model, lr=0.05), checkpoint_dir=tmp_path / "one", arch="tiny",
                 model_kwargs={"num_classes": CLASSES})
    for x, y in zip(comparable(single["history"]), comparable(world["history"])):
        assert x["train_clips"] == y["train_clips"] == 15
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
