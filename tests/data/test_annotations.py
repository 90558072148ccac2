"""Every layout parsed into manifests from small fixtures in the official formats, and every bad input named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from action3d.data.annotations import (
    MANIFEST_COLUMNS,
    AnnotationError,
    build_manifests,
    read_classes,
    read_manifest,
)
from action3d.data.synthetic import FINETUNE_CLASSES

pytestmark = pytest.mark.slow  # real videos, encoded by the session fixtures


FAST = dict(workers=1, progress=False)


def _rows(out: Path, subset: str) -> list[dict[str, str]]:
    return read_manifest(out / f"{subset}.csv")


def test_ucf101_split_by_groups_in_classind_order(ucf_root, tmp_path):
    report = build_manifests("ucf101", ucf_root, tmp_path, split=2, val_fraction=0.4, seed=0, **FAST)
    assert read_classes(tmp_path / "classes.json") == list(FINETUNE_CLASSES)[:3]
    test = _rows(tmp_path, "test")
    assert {r["group"].rsplit("_", 1)[1] for r in test} == {"g02"}  # split 2 tests group 2
    train, val = _rows(tmp_path, "train"), _rows(tmp_path, "val")
    assert report.counts == {"train": len(train), "val": len(val), "test": len(test)} and len(train + val + test) == 18
    assert val and not {r["group"] for r in train} & {r["group"] for r in val}  # val carved by whole groups
    with open(tmp_path / "train.csv", newline="") as f:
        assert next(csv.reader(f)) == list(MANIFEST_COLUMNS)
    for row in train + val + test:
        assert (ucf_root / row["path"]).is_file()
        assert read_classes(tmp_path / "classes.json")[int(row["label"])] == row["label_name"]
    assert report.problems == 0 and not report.unlisted


def test_val_carving_is_seeded(ucf_root, tmp_path):
    build_manifests("ucf101", ucf_root, tmp_path / "a", val_fraction=0.4, seed=5, probe=False, **FAST)
    build_manifests("ucf101", ucf_root, tmp_path / "b", val_fraction=0.4, seed=5, probe=False, **FAST)
    assert (tmp_path / "a" / "val.csv").read_text() == (tmp_path / "b" / "val.csv").read_text()


def test_hmdb51_flags(hmdb_root, tmp_path):
    report = build_manifests("hmdb51", hmdb_root, tmp_path, split=1, val_fraction=0.0, **FAST)
    classes = read_classes(tmp_path / "classes.json")
    assert classes == sorted(classes) and len(classes) == 3
    assert report.unused == 3 and not report.unlisted  # one source video per action flagged 0, still "listed"
    assert report.counts["test"] == 3 and report.counts["train"] == 9
    assert all(r["group"].startswith(r["label_name"] + "/") for r in _rows(tmp_path, "train"))


def test_kinetics_csvs_with_is_cc_and_an_unlabelled_test(kinetics_root, copy_of, tmp_path):
    root = copy_of(kinetics_root)
    train_csv = root / "kinetics_train.csv"
    lines = train_csv.read_text().splitlines()
    train_csv.write_text("\n".join([lines[0] + ",is_cc"] + [ln + ",0" for ln in lines[1:]]) + "\n")  # K400 style
    test_csv = root / "kinetics_test.csv"
    rows = list(csv.DictReader(test_csv.open()))
    test_csv.write_text("youtube_id,time_start,time_end,split\n"
                        + "".join(f"{r['youtube_id']},{r['time_start']},{r['time_end']},test\n" for r in rows))
    label = rows[0]["label"]  # a downloader that writes label folders with underscores
    (root / "test" / label).rename(root / "test" / label.replace(" ", "_"))
    out = tmp_path / "out"
    report = build_manifests("kinetics", root, out, **FAST)
    assert read_classes(out / "classes.json") == sorted(read_classes(out / "classes.json"))
    assert report.counts == {"train": 6, "val": 3, "test": 3} and not report.missing
    test = _rows(out, "test")
    assert {r["label"] for r in test} == {"-1"} and report.unlabelled == {"test": 3}
    assert all((root / r["path"]).is_file() for r in test)
    assert all(r["group"] == r["video_id"][:11] for r in _rows(out, "train"))


def test_folder_layout_is_a_seeded_stratified_split(tmp_path, tiny_video):
    root = tmp_path / "videos"
    for c in ("b_jump", "a_run"):
        for i in range(5):
            tiny_video(root / c / f"{c}_{i}.mp4", frames=20, seed=i)
    (root / "a_run" / "notes.txt").write_text("not a video")
    (root / "c_empty").mkdir()
    report = build_manifests("folder", root, tmp_path / "out", val_fraction=0.2, test_fraction=0.2, seed=3, **FAST)
    assert read_classes(tmp_path / "out" / "classes.json") == ["a_run", "b_jump", "c_empty"]
    assert report.counts == {"train": 6, "val": 2, "test": 2}
    assert {r["label_name"] for r in _rows(tmp_path / "out", "test")} == {"a_run", "b_jump"}  # stratified
    assert report.non_video == ["a_run/notes.txt"]
    assert report.empty_classes["train"] == ["c_empty"]
    assert "notes.txt" in report.summary()
    build_manifests("folder", root, tmp_path / "again", val_fraction=0.2, test_fraction=0.2, seed=3, **FAST)
    assert (tmp_path / "again" / "test.csv").read_text() == (tmp_path / "out" / "test.csv").read_text()


# --- bad input ---------------------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(ucf_root, copy_of):
    root = copy_of(ucf_root)
    with open(root / "trainlist01.txt", "a") as f:
        f.write("this line is wrong 1 2\r\n")
    n = len((root / "trainlist01.txt").read_text().splitlines())
    with pytest.raises(AnnotationError, match=rf"trainlist01\.txt line {n}: expected"):
        build_manifests("ucf101", root, root / "out", probe=False, **FAST)


def test_unknown_class_in_a_trainlist(ucf_root, copy_of):
    root = copy_of(ucf_root)
    with open(root / "trainlist01.txt", "a") as f:
        f.write("Juggling/v_Juggling_g01_c01.avi 2\r\n")
    with pytest.raises(AnnotationError, match=r"class 'Juggling' is not in classInd\.txt"):
        build_manifests("ucf101", root, root / "out", probe=False, **FAST)


def test_hmdb_flag_outside_0_1_2(hmdb_root, copy_of):
    root = copy_of(hmdb_root)
    split_file = sorted((root / "splits").glob("*_test_split1.txt"))[0]
    split_file.write_text(split_file.read_text() + "extra.avi 7\n")
    with pytest.raises(AnnotationError, match=rf"{split_file.name} line \d+: expected '<video>.avi <0\|1\|2>'"):
        build_manifests("hmdb51", root, root / "out", probe=False, **FAST)


def test_csv_missing_a_column(kinetics_root, copy_of):
    root = copy_of(kinetics_root)
    path = root / "kinetics_train.csv"
    path.write_text(path.read_text().replace("time_end,", "end,", 1))
    with pytest.raises(AnnotationError, match=r"kinetics_train\.csv: missing column\(s\) time_end"):
        build_manifests("kinetics", root, root / "out", probe=False, **FAST)


def test_csv_row_with_wrong_field_count(kinetics_root, copy_of):
    root = copy_of(kinetics_root)
    with open(root / "kinetics_val.csv", "a") as f:
        f.write("approach,abc\n")
    with pytest.raises(AnnotationError, match=r"kinetics_val\.csv line 5: 2 fields"):
        build_manifests("kinetics", root, root / "out", probe=False, **FAST)


def test_missing_corrupt_zero_byte_and_short_videos_are_reported(ucf_root, copy_of, tiny_video):
    root = copy_of(ucf_root)
    train = [ln.split()[0] for ln in (root / "trainlist01.txt").read_text().splitlines()]
    (root / train[0]).unlink()  # a split line naming a missing video
    (root / train[1]).write_bytes(b"")  # zero bytes
    (root / train[2]).write_bytes(b"\x00garbage" * 100)  # corrupt
    tiny_video(root / train[3], frames=5)  # shorter than a 16-frame clip
    report = build_manifests("ucf101", root, root / "out", val_fraction=0.0, **FAST)
    assert report.missing == [f"{train[0]} (trainlist01.txt line 1)"]
    assert report.unreadable[train[1]] == "zero-byte file"
    assert train[2] in report.unreadable
    assert report.short == {train[3]: 5}
    kept = {r["path"] for r in _rows(root / "out", "train")}
    assert not kept & set(train[:3]) and train[3] in kept
    summary = report.summary()
    assert all(p in summary for p in train[:4])
    saved = json.loads((root / "out" / "report.json").read_text())
    assert saved["unreadable"][train[1]] == "zero-byte file"


def test_coverage_per_subset_and_a_minimum_that_stops_naming_the_numbers(ucf_root, copy_of):
    """Public copies of Kinetics miss some of their videos: each subset's coverage (found and readable / listed) is
    in the report; under split.min_coverage the split stops with the numbers, the report written for a look."""
    root = copy_of(ucf_root)
    train = [ln.split()[0] for ln in (root / "trainlist01.txt").read_text().splitlines()]
    (root / train[0]).unlink()
    (root / train[1]).write_bytes(b"\x00garbage" * 100)
    report = build_manifests("ucf101", root, root / "out", val_fraction=0.0, **FAST)
    listed = len(train)
    assert report.coverage == {"train": {"listed": listed, "found": listed - 2}, "test": {"listed": 6, "found": 6}}
    assert f"train {listed - 2}/{listed}" in report.summary()
    with pytest.raises(AnnotationError, match=rf"train: {listed - 2} of {listed} listed videos found and readable "
                                              rf"\(83.3%\), under split.min_coverage 90%.*report.json"):
        build_manifests("ucf101", root, root / "out2", val_fraction=0.0, min_coverage=0.9, **FAST)
    assert json.loads((root / "out2" / "report.json").read_text())["coverage"]["train"]["found"] == listed - 2
    build_manifests("ucf101", root, root / "out3", val_fraction=0.0, min_coverage=0.8, **FAST)  # 83% is enough


def test_slice_lists_hold_every_kept_video_once_with_its_fingerprint(ucf_root, copy_of, tiny_video):
    """slices/<k>.csv: what cache@<role>-<k> depends on. A changed video changes its own slice's list alone."""
    from action3d.data.annotations import read_slice
    from action3d.data.cache import slice_of
    from action3d.data.video import fingerprint

    root = copy_of(ucf_root)
    build_manifests("ucf101", root, root / "out", val_fraction=0.0, slices=3, probe=False, **FAST)
    kept = {r["path"] for subset in ("train", "val", "test") for r in _rows(root / "out", subset)}
    lists = {k: read_slice(root / "out" / "slices" / f"{k}.csv") for k in range(3)}
    assert sorted(p for paths in lists.values() for p in paths) == sorted(kept)
    assert all(slice_of(p, 3) == k for k, paths in lists.items() for p in paths)
    rows = list(csv.DictReader(open(root / "out" / "slices" / "0.csv", newline="")))
    assert all(r["fingerprint"] == fingerprint(root / r["path"]).hex() for r in rows)
    before = {k: (root / "out" / "slices" / f"{k}.csv").read_bytes() for k in range(3)}
    changed = lists[1][0]
    tiny_video(root / changed, frames=30, seed=7)
    build_manifests("ucf101", root, root / "out", val_fraction=0.0, slices=3, probe=False, **FAST)
    after = {k: (root / "out" / "slices" / f"{k}.csv").read_bytes() for k in range(3)}
    assert [k for k in range(3) if before[k] != after[k]] == [1]
    build_manifests("ucf101", root, root / "out", val_fraction=0.0, slices=1, probe=False, **FAST)
    assert sorted(p.name for p in (root / "out" / "slices").iterdir()) == ["0.csv"]  # no stale slice left


def test_duplicates_and_videos_in_no_split(ucf_root, copy_of, tiny_video):
    root = copy_of(ucf_root)
    first = (root / "trainlist01.txt").read_text().splitlines()[0]
    with open(root / "trainlist01.txt", "a") as f:
        f.write(first + "\r\n")
    cls = first.split("/")[0]
    tiny_video(root / cls / f"v_{cls}_g09_c01.avi")
    report = build_manifests("ucf101", root, root / "out", probe=False, **FAST)
    assert len(report.duplicates) == 1 and first.split()[0] in report.duplicates[0]
    assert report.unlisted == [f"{cls}/v_{cls}_g09_c01.avi"]


def test_group_leakage_is_detected(ucf_root, copy_of, tmp_path):
    root = copy_of(ucf_root)
    test_lines = (root / "testlist01.txt").read_text().splitlines()
    cls, name = test_lines[0].split("/")  # move one clip of a test group into training
    (root / "testlist01.txt").write_text("\r\n".join(test_lines[1:]) + "\r\n")
    with open(root / "trainlist01.txt", "a") as f:
        f.write(f"{test_lines[0]} 1\r\n")
    group = name.rsplit("_c", 1)[0]
    with pytest.raises(AnnotationError, match=rf"train/test: {group}"):
        build_manifests("ucf101", root, tmp_path / "out", val_fraction=0.0, probe=False, **FAST)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["leaked_groups"] == {"train/test": [group]}
    report = build_manifests("ucf101", root, tmp_path / "ok", val_fraction=0.0, probe=False, allow_leakage=True, **FAST)
    assert report.leaked_groups == {"train/test": [group]}


def test_unknown_layout_and_missing_annotation_files(tmp_path):
    with pytest.raises(AnnotationError, match="unknown layout 'ucf'"):
        build_manifests("ucf", tmp_path, tmp_path / "out")
    with pytest.raises(AnnotationError, match="no classInd.txt in "):
        build_manifests("ucf101", tmp_path, tmp_path / "out")
