"""Raw videos packed into a few tar files and read in place: the same manifests, fingerprints and cache bytes as the
unpacked set, a few files for DVC, and the cache slices' videos in a share of the tars."""

from __future__ import annotations

import csv
import hashlib
import tarfile
from pathlib import Path

import pytest

from action3d.cli import main
from action3d.data import raw
from action3d.data.annotations import build_manifests
from action3d.data.cache import build_cache, slice_of
from action3d.data.video import fingerprint, probe_video

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures

FAST = dict(workers=1, progress=False)


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".build" not in p.as_posix()}


@pytest.mark.parametrize("layout, fixture", [("ucf101", "ucf_root"), ("kinetics", "kinetics_root"),
                                             ("hmdb51", "hmdb_root")])
def test_a_packed_set_reads_as_the_set_it_packs(layout, fixture, request, tmp_path):
    source = request.getfixturevalue(fixture)
    packed = tmp_path / "packed"
    videos = [r for r in raw.listing(source) if r.endswith((".avi", ".mp4", ".mkv"))]
    about_4 = sum((source / v).stat().st_size for v in videos) / 2**20 / 3.5  # MB for about 4 tar files
    assert main(["data", "pack", str(source), str(packed), "--shard-mb", f"{about_4:.6f}"]) == 0
    tars = sorted((packed / "videos").glob("*.tar"))
    assert 1 < len(tars) < len(videos)  # a few files, not one per video
    assert not any(p.suffix in (".avi", ".mp4", ".mkv") for p in packed.rglob("*"))  # no loose video left
    for tar in tars:  # real tar files, for any tool
        with tarfile.open(tar) as t:
            assert all(m.isfile() for m in t.getmembers())

    for rel in videos:  # every video, where it was, with the same bytes
        with raw.open_video(packed / rel) as f:
            assert f.read() == (source / rel).read_bytes()
        assert fingerprint(packed / rel) == fingerprint(source / rel)
    result = probe_video(packed / videos[0])
    assert result.ok and result.frames == probe_video(source / videos[0]).frames

    build_manifests(layout, source, tmp_path / "a", **FAST)
    build_manifests(layout, packed, tmp_path / "b", **FAST)
    assert {k: v for k, v in _tree(tmp_path / "a").items() if k != "report.json"} == {
        k: v for k, v in _tree(tmp_path / "b").items() if k != "report.json"}
    build_cache(tmp_path / "a", source, tmp_path / "cache-a", short_side=24, shard_mb=0.02, **FAST)
    build_cache(tmp_path / "b", packed, tmp_path / "cache-b", short_side=24, shard_mb=0.02, **FAST)
    assert _tree(tmp_path / "cache-a") == _tree(tmp_path / "cache-b")


def test_a_slice_of_the_cache_reads_a_share_of_the_tars(ucf_root, tmp_path):
    """With power-of-two counts a video's tar and its cache slice come from the same hash: slice k of 2 is in the
    tars t with t % 2 == k, so a worker building it pulls half the tars."""
    packed = tmp_path / "packed"
    done = raw.pack(ucf_root, packed, shard_mb=0.1, progress=False)
    assert done["tars"] >= 2 and done["tars"] & (done["tars"] - 1) == 0
    with open(packed / raw.INDEX, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert int(row["tar"].split(".")[0]) % 2 == slice_of(row["path"], 2)


def test_a_video_listed_but_not_packed_is_missing_and_named(ucf_root, tmp_path):
    packed = tmp_path / "packed"
    raw.pack(ucf_root, packed, shard_mb=0.1, progress=False)
    index = (packed / raw.INDEX).read_text().splitlines(keepends=True)
    gone = index[1].split(",")[0]
    (packed / raw.INDEX).write_text("".join(index[:1] + index[2:]))
    raw.packed_index.cache_clear()
    report = build_manifests("ucf101", packed, tmp_path / "out", **FAST)
    assert any(m.startswith(gone) for m in report.missing)
    with pytest.raises(FileNotFoundError, match="neither a file nor in a packed set"):
        raw.open_video(packed / gone)


def test_packing_into_a_packed_set_is_refused(ucf_root, tmp_path, capsys):
    raw.pack(ucf_root, tmp_path / "packed", shard_mb=1, progress=False)
    assert main(["data", "pack", str(ucf_root), str(tmp_path / "packed")]) == 2
    assert "already holds a packed set" in capsys.readouterr().err
