"""Official dataset layouts -> one manifest format, with a validation report.

Layouts read (`build_manifests(layout, ...)`):

- "ucf101": `classInd.txt` (`1 ApplyEyeMakeup`), `trainlist0N.txt` (`Class/v_Class_g08_c01.avi 1`) and
  `testlist0N.txt` (`Class/v_Class_g01_c01.avi`), in the data root or its `ucfTrainTestlist/`. Class order: classInd.
  Group: `v_<Class>_gNN` (clips of one group share actor and scene). Val: whole groups carved from train.
- "hmdb51": `<action>_test_splitN.txt` files anywhere under the annotation folder, lines `<video>.avi <0|1|2>`
  (1 train, 2 test, 0 unused), videos at `<action>/<video>.avi`. Class order: sorted action names (as the
  reference's hmdb51_json.py). Group: the video name without its trailing `_<clip number>` (its source video).
  Val: whole groups carved from train.
- "kinetics": Kinetics-400/600/700 CSVs (`label,youtube_id,time_start,time_end,split[,is_cc]`; a test CSV may lack
  `label`), videos at `<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.<mp4|mkv|webm>` as the usual downloaders
  write them (label folders with spaces or underscores, or no label folder). Class order: sorted train labels (as
  the reference's kinetics_json.py). Group: youtube_id. Val: the val CSV. Unlabelled test rows get label -1.
- "folder": `<class>/<video>` with no split files: a seeded split stratified by class (per class, `test_fraction`
  and `val_fraction` of its videos, at least one left to train). Class order: sorted folder names. Group: file stem.

Output in `out_dir`: `train.csv`, `val.csv`, `test.csv` (columns `path,label,label_name,video_id,group`; path
relative to the data root), `classes.json` (names in label order) and `report.json`. Every file atomically.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import random
import re
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple

from tqdm import tqdm

from action3d.data import raw
from action3d.data.video import ProbeResult, is_video_name, probe_video, write_atomic_text
from action3d.errors import Action3dError
from action3d.progress import show_bars

MANIFEST_COLUMNS = ("path", "label", "label_name", "video_id", "group")
SUBSETS = ("train", "val", "test")
SLICES = "slices"  # the folder of slice lists in a set's manifests (slices/<k>.csv)
LAYOUTS = ("ucf101", "hmdb51", "kinetics", "folder")


class AnnotationError(Action3dError):
    """An annotation file is malformed or inconsistent; the message names the file (and line) and the fix."""


class Entry(NamedTuple):
    """One video of a subset before validation. `source` says where it was listed ("trainlist01.txt line 3")."""

    path: str
    label_name: str
    video_id: str
    group: str
    source: str


@dataclass
class SplitReport:
    """What `build_manifests` found. Problems are listed, never silently dropped."""

    layout: str
    data_root: str
    split: int
    classes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # listed in an annotation file, not on disk
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> why the probe failed
    unlisted: list[str] = field(default_factory=list)  # videos on disk in no subset
    non_video: list[str] = field(default_factory=list)  # files in class folders that are not videos
    duplicates: list[str] = field(default_factory=list)  # listed more than once
    empty_classes: dict[str, list[str]] = field(default_factory=dict)  # subset -> classes without a video
    leaked_groups: dict[str, list[str]] = field(default_factory=dict)  # "train/test" -> groups in both
    short: dict[str, int] = field(default_factory=dict)  # fewer frames than min_frames (will be loop-padded)
    unused: int = 0  # HMDB-51 videos marked 0 in this split
    unlabelled: dict[str, int] = field(default_factory=dict)  # subset -> rows without a label (Kinetics test)
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)  # subset -> listed, found (and readable)

    @property
    def problems(self) -> int:
        return (len(self.missing) + len(self.unreadable) + len(self.duplicates) + len(self.non_video)
                + sum(map(len, self.leaked_groups.values())) + sum(map(len, self.empty_classes.values())))

    def summary(self, limit: int = 10) -> str:
        """A human-readable report: counts, then each kind of problem with up to `limit` examples."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"{self.layout} split {self.split} in {self.data_root}: {self.classes} classes; {counts}"]
        if any(c["found"] < c["listed"] for c in self.coverage.values()):
            lines.append("coverage: " + ", ".join(f"{s} {c['found']}/{c['listed']} ({c['found'] / c['listed']:.1%})"
                                                  for s, c in self.coverage.items()))

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"{title}: {len(items)}")
                lines.extend(f"  {x}" for x in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more (see report.json)")

        section("missing (listed, not on disk)", self.missing)
        section("unreadable (left out)", [f"{p}: {why}" for p, why in self.unreadable.items()])
        section("duplicates (listed more than once)", self.duplicates)
        section("not videos (ignored)", self.non_video)
        section("videos in no split", self.unlisted)
        for pair, groups in self.leaked_groups.items():
            section(f"groups in both {pair} (leakage)", groups)
        for subset, names in self.empty_classes.items():
            section(f"classes without a {subset} video", names)
        section(f"shorter than a clip (loop-padded)", [f"{p}: {n} frames" for p, n in self.short.items()])
        if self.unused:
            lines.append(f"unused in this split (HMDB-51 flag 0): {self.unused}")
        for subset, n in self.unlabelled.items():
            lines.append(f"{subset}: {n} rows without a label (label -1: not usable for accuracy)")
        return "\n".join(lines)


# --- reading the layouts ------------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """Non-empty stripped lines with 1-based numbers (tolerates CRLF and a BOM)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield number, line


_ANNOTATION_FOLDERS = ("", "ucfTrainTestlist", "splits", "annotations")


def _lookup(root: Path, names: Iterable[str]) -> Path | None:
    """The first existing file among `names` in `root` or its ucfTrainTestlist/, splits/, annotations/ folders."""
    for folder in _ANNOTATION_FOLDERS:
        for name in names:
            if (root / folder / name).is_file():
                return root / folder / name
    return None


def _find(root: Path, names: Iterable[str], what: str) -> Path:
    names = list(names)
    found = _lookup(root, names)
    if found is None:
        looked = "" if names == [what] else f" (looked for {', '.join(names)})"
        raise AnnotationError(f"no {what} in {root} or its {', '.join(f + '/' for f in _ANNOTATION_FOLDERS if f)} "
                              f"folders{looked}: put the layout's files there")
    return found


def missing_files(layout: str, root: Path, split: int = 1) -> str | None:
    """What `layout` needs in `root` that is not there (the split files of `split`), or None: checked before any
    stage runs, so a wrong layout knob is named then, not half way through the pipeline."""
    if layout == "ucf101":
        needed = ["classInd.txt", f"trainlist{split:02d}.txt", f"testlist{split:02d}.txt"]
        absent = [name for name in needed if _lookup(root, [name]) is None]
        return f"UCF-101's {', '.join(absent)}" if absent else None
    if layout == "hmdb51":
        found = next(root.rglob(f"*_test_split{split}.txt"), None) if root.is_dir() else None
        return None if found else f"HMDB-51's split files (*_test_split{split}.txt)"
    if layout == "kinetics":
        return None if _lookup(root, _KINETICS_FILES["train"]) else "a Kinetics train CSV (kinetics_train.csv, ...)"
    videos = root.is_dir() and any(rel.count("/") == 1 and is_video_name(rel) for rel in raw.listing(root))
    return None if videos else "class folders holding videos (<root>/<class>/<video>)"


def looks_like(root: Path, split: int = 1) -> list[str]:
    """The layouts whose files `root` holds (folder last: any tree of class folders is one)."""
    return [layout for layout in LAYOUTS if missing_files(layout, root, split) is None]


def _disk_videos(root: Path, depth: int) -> tuple[set[str], list[str]]:
    """(videos, non-video files) at exactly `depth` folders below `root`, as paths relative to it (a packed set's
    videos from its index: `raw`)."""
    videos, others = set(), []
    for rel in raw.listing(root):
        if rel.count("/") == depth:
            (videos.add(rel) if is_video_name(rel) else others.append(rel))
    return videos, sorted(others)


_UCF_NAME = re.compile(r"^(v_.+_g\d+)_c\d+$", re.IGNORECASE)


def _ucf101(root: Path, ann: Path, split: int) -> tuple[list[str], dict[str, list[Entry]], SplitReport]:
    class_file = _find(ann, ["classInd.txt"], "classInd.txt")
    indexed = {}
    for number, line in _lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(f"{class_file} line {number}: expected '<index> <ClassName>', got {line!r}")
        indexed[int(parts[0])] = parts[1]
    if sorted(indexed) != list(range(1, len(indexed) + 1)):
        raise AnnotationError(f"{class_file}: class indices must run 1..{len(indexed)} without gaps")
    classes = [indexed[i] for i in range(1, len(indexed) + 1)]
    lookup = {c: c for c in classes} | {c.lower(): c for c in classes}
    subsets: dict[str, list[Entry]] = {"train": [], "test": []}
    for subset, name in (("train", f"trainlist{split:02d}.txt"), ("test", f"testlist{split:02d}.txt")):
        list_file = _find(ann, [name], name)
        for number, line in _lines(list_file):
            parts = line.split()
            where = f"{list_file.name} line {number}"
            if len(parts) not in (1, 2) or (len(parts) == 2 and not parts[1].isdigit()) or "/" not in parts[0]:
                raise AnnotationError(
                    f"{list_file} line {number}: expected '<Class>/<video>.avi [<index>]', got {line!r}")
            rel = parts[0].replace("\\", "/")
            folder = rel.split("/")[0]
            label = lookup.get(folder, lookup.get(folder.lower()))
            if label is None:
                raise AnnotationError(f"{list_file} line {number}: class {folder!r} is not in {class_file.name}; "
                                      "fix the line or the class list")
            if len(parts) == 2 and not (0 < int(parts[1]) <= len(classes) and classes[int(parts[1]) - 1] == label):
                raise AnnotationError(f"{list_file} line {number}: index {parts[1]} is not the index of {label!r} "
                                      f"in {class_file.name}")
            stem = Path(rel).stem
            match = _UCF_NAME.match(stem)
            subsets[subset].append(Entry(rel, label, stem, match.group(1) if match else stem, where))
    report = SplitReport("ucf101", str(root), split)
    return classes, subsets, report


def _hmdb51(root: Path, ann: Path, split: int) -> tuple[list[str], dict[str, list[Entry]], SplitReport, set[str]]:
    suffix = f"_test_split{split}.txt"
    files = sorted(p for p in ann.rglob(f"*{suffix}") if p.is_file())
    if not files:
        raise AnnotationError(f"no '*{suffix}' files under {ann}: put HMDB-51's split files "
                              "(testTrainMulti_7030_splits) in the data folder")
    classes = sorted({p.name[: -len(suffix)] for p in files})
    report = SplitReport("hmdb51", str(root), split)
    subsets: dict[str, list[Entry]] = {"train": [], "test": []}
    unused: set[str] = set()
    for split_file in files:
        action = split_file.name[: -len(suffix)]
        for number, line in _lines(split_file):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f"{split_file} line {number}: expected '<video>.avi <0|1|2>', got {line!r}")
            if parts[1] == "0":
                report.unused += 1
                unused.add(f"{action}/{parts[0]}")
                continue
            stem = Path(parts[0]).stem
            group = re.sub(r"_\d+$", "", stem)
            entry = Entry(f"{action}/{parts[0]}", action, stem, f"{action}/{group}", f"{split_file.name} line {number}")
            subsets["train" if parts[1] == "1" else "test"].append(entry)
    return classes, subsets, report, unused


_KINETICS_FILES = {
    "train": ["kinetics_train.csv", "train.csv", "kinetics_400_train.csv", "kinetics_600_train.csv",
              "kinetics_700_train.csv", "kinetics-400_train.csv", "kinetics-600_train.csv", "kinetics-700_train.csv",
              "kinetics_700_2020_train.csv"],
    "val": ["kinetics_val.csv", "val.csv", "validate.csv", "kinetics_400_val.csv", "kinetics_600_val.csv",
            "kinetics_700_val.csv", "kinetics-400_val.csv", "kinetics-600_val.csv", "kinetics-700_val.csv",
            "kinetics_700_2020_val.csv"],
    "test": ["kinetics_test.csv", "test.csv", "kinetics_400_test.csv", "kinetics_600_test.csv",
             "kinetics_700_test.csv", "kinetics-400_test.csv", "kinetics-600_test.csv", "kinetics-700_test.csv",
             "kinetics_700_2020_test.csv"],
}
_KINETICS_DIRS = {"train": ("train",), "val": ("val", "validate", "valid"), "test": ("test",)}


def _kinetics_rows(csv_file: Path, need_label: bool) -> list[tuple[int, dict[str, str]]]:
    with open(csv_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise AnnotationError(
                f"{csv_file}: empty file; expected a header 'label,youtube_id,time_start,time_end,split'")
        header = [h.strip() for h in header]
        required = ["youtube_id", "time_start", "time_end"] + (["label"] if need_label else [])
        absent = [c for c in required if c not in header]
        if absent:
            raise AnnotationError(f"{csv_file}: missing column(s) {', '.join(absent)} in header {','.join(header)}")
        rows = []
        for row in reader:
            number = reader.line_num
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) != len(header):
                raise AnnotationError(f"{csv_file} line {number}: {len(row)} fields, the header has {len(header)}")
            values = dict(zip(header, (x.strip() for x in row)))
            for key in ("time_start", "time_end"):
                try:
                    values[key] = str(int(float(values[key])))
                except ValueError:
                    raise AnnotationError(f"{csv_file} line {number}: {key} {values[key]!r} is not a number") from None
            rows.append((number, values))
    return rows


def _kinetics(root: Path, ann: Path, split: int) -> tuple[list[str], dict[str, list[Entry]], SplitReport]:
    report = SplitReport("kinetics", str(root), split)
    files = {"train": _find(ann, _KINETICS_FILES["train"], "Kinetics train CSV")}
    for subset in ("val", "test"):
        try:
            files[subset] = _find(ann, _KINETICS_FILES[subset], f"Kinetics {subset} CSV")
        except AnnotationError:
            pass
    train_rows = _kinetics_rows(files["train"], need_label=True)
    classes = sorted({values["label"] for _, values in train_rows})
    known = set(classes)
    by_key: dict[str, list[str]] = defaultdict(list)  # "<id>_<start>_<end>" -> relative paths on disk
    for rel in raw.listing(root):
        if is_video_name(rel):
            by_key[Path(rel).stem].append(rel)
    subsets: dict[str, list[Entry]] = {s: [] for s in files}
    for subset, csv_file in files.items():
        rows = train_rows if subset == "train" else _kinetics_rows(csv_file, need_label=False)
        for number, values in rows:
            label = values.get("label", "")
            if label and label not in known:
                raise AnnotationError(
                    f"{csv_file} line {number}: label {label!r} is not a class of {files['train'].name}")
            if not label:
                report.unlabelled[subset] = report.unlabelled.get(subset, 0) + 1
            key = f"{values['youtube_id']}_{int(values['time_start']):06d}_{int(values['time_end']):06d}"
            rel = _pick_kinetics_path(by_key.get(key, []), subset, values.get("split", ""), label)
            if rel is None:  # not on disk: name the path the downloader would have written
                rel = f"{values.get('split') or subset}/{label + '/' if label else ''}{key}.mp4"
            subsets[subset].append(Entry(rel, label, key, values["youtube_id"], f"{csv_file.name} line {number}"))
    return classes, subsets, report


def _pick_kinetics_path(candidates: list[str], subset: str, split_value: str, label: str) -> str | None:
    """Among files named <id>_<start>_<end>, prefer the one under this subset's folder and label folder."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    dirs = {split_value, *_KINETICS_DIRS[subset]}
    labels = {label, label.replace(" ", "_")}

    def score(rel: str) -> int:
        parts = rel.split("/")
        return 2 * (parts[0] in dirs) + (len(parts) > 1 and parts[-2] in labels)

    return max(candidates, key=score)


def _folder(root: Path, ann: Path, split: int, *, seed: int, val_fraction: float, test_fraction: float
            ) -> tuple[list[str], dict[str, list[Entry]], SplitReport]:
    report = SplitReport("folder", str(root), split)
    by_class: dict[str, list[str]] = defaultdict(list)
    for rel in raw.listing(root):
        if rel.count("/") == 1 and is_video_name(rel):
            by_class[rel.split("/")[0]].append(rel.split("/")[1])
    if raw.packed_index(str(root)) is None:  # a class folder without videos is a class, reported empty
        by_class.update({p.name: [] for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name not in by_class})
    if not by_class:
        raise AnnotationError(f"{root}: no class folders; the folder layout is <root>/<class>/<video>")
    classes = sorted(by_class)
    subsets: dict[str, list[Entry]] = {s: [] for s in SUBSETS}
    for folder in [root / c for c in classes]:
        videos = sorted(by_class[folder.name])
        random.Random(f"{seed}:{folder.name}").shuffle(videos)
        n = len(videos)
        n_test = min(round(n * test_fraction), max(n - 1, 0))
        n_val = min(round(n * val_fraction), max(n - 1 - n_test, 0))
        for i, name in enumerate(videos):
            subset = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            stem = Path(name).stem
            subsets[subset].append(Entry(f"{folder.name}/{name}", folder.name, stem, f"{folder.name}/{stem}",
                                         f"{folder.name}/ (seeded split)"))
    return classes, subsets, report


def carve_val(entries: list[Entry], fraction: float, seed: int) -> tuple[list[Entry], list[Entry]]:
    """Split training entries into (train, val) by whole groups, per class, seeded.

    Each class gives round(fraction x its groups) groups to val (at least one when it has two or more groups and
    fraction > 0), so no group is in both and every class keeps training groups.
    """
    if fraction <= 0:
        return entries, []
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        if e.group not in groups[e.label_name]:
            groups[e.label_name].append(e.group)
    val_groups = set()
    for label, names in sorted(groups.items()):
        names = sorted(names)
        k = min(max(round(fraction * len(names)), 1), len(names) - 1)
        val_groups |= set(random.Random(f"{seed}:{label}").sample(names, k)) if k > 0 else set()
    return [e for e in entries if e.group not in val_groups], [e for e in entries if e.group in val_groups]


# --- validation and writing ----------------------------------------------------------------------------------------


def probe_all(paths: list[Path], *, workers: int | None = None, progress: bool = True,
              open_video: bool = True) -> list[ProbeResult]:
    """Probe every file (fingerprint; with `open_video` also open it, read the header, decode the first frame) in
    parallel, with a progress bar. At most a few thousand paths are in flight at a time, whatever the set's size."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) or 1))
    probe = functools.partial(probe_video, open_video=open_video)
    bar = tqdm(total=len(paths), desc="probe" if open_video else "fingerprint", unit="video",
               disable=not show_bars(progress))
    results: list[ProbeResult] = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for start in range(0, len(paths), 4096):  # pool.map submits all it is given: feed it in blocks
            block = paths[start:start + 4096]
            for r in (pool.map(probe, block, chunksize=16) if pool else map(probe, block)):
                results.append(r)
                bar.update()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


def _write_slices(folder: Path, paths: list[str], probed: dict[str, ProbeResult], slices: int) -> None:
    """slices/<k>.csv: the videos of slice k with their size and fingerprint (what cache@<role>-<k> depends on)."""
    from action3d.data.cache import slice_of

    rows: dict[int, list[str]] = {k: [] for k in range(slices)}
    for rel in paths:
        rows[slice_of(rel, slices)].append(f"{_csv_field(rel)},{probed[rel].bytes},{probed[rel].fingerprint}\n")
    if folder.is_dir():
        for stale in folder.glob("*.csv"):  # slices of an earlier count
            if not stale.stem.isdigit() or int(stale.stem) >= slices:
                stale.unlink()
    for k, lines in rows.items():
        write_atomic_text(folder / f"{k}.csv", "path,bytes,fingerprint\n" + "".join(lines))


def _csv_field(value: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([value])
    return buf.getvalue()


def read_slice(path: str | Path) -> list[str]:
    """The video paths a slices/<k>.csv lists."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "fingerprint" not in reader.fieldnames:
            raise AnnotationError(f"{path}: not a slice list (path, bytes, fingerprint); the split stage writes them")
        return [row["path"] for row in reader]


def _manifest_text(entries: list[Entry], classes: list[str]) -> str:
    index = {c: i for i, c in enumerate(classes)}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for e in entries:
        writer.writerow([e.path, index.get(e.label_name, -1), e.label_name, e.video_id, e.group])
    return buf.getvalue()


def build_manifests(
    layout: str,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    split: int = 1,
    annotations: str | Path | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    probe: bool = True,
    min_frames: int = 16,
    allow_leakage: bool = False,
    min_coverage: float = 0.0,
    slices: int = 1,
    workers: int | None = None,
    progress: bool = True,
) -> SplitReport:
    """Read `layout` under `data_root` and write train/val/test manifests, classes.json and report.json to `out_dir`.

    `annotations` is the folder holding the split files (default: the data root). `split` picks UCF-101 / HMDB-51
    split 1, 2 or 3. `val_fraction` is the share of training groups moved to val (UCF-101, HMDB-51, folder; Kinetics
    has its own val CSV); `test_fraction` is the folder layout's test share; `seed` makes those choices repeatable.
    With `probe`, every listed video is opened and its first frame decoded (in parallel): unreadable ones are left
    out of the manifests and reported. Missing files are left out and reported, and each subset's coverage (videos
    found and readable over videos listed) is in the report: below `min_coverage` in any subset is an
    `AnnotationError` naming the numbers (public copies of Kinetics miss 5-10% of their videos). Malformed
    annotation lines, unknown classes and missing CSV columns raise `AnnotationError`; so does a group found in two
    subsets, unless `allow_leakage` (the report is written first either way).

    Every kept video is fingerprinted (size, first and last bytes) and listed with it in `slices/<k>.csv`, k its
    slice of `slices` (a stable hash of its path): slice k of the cache depends on that file alone, so a changed
    video rebuilds one slice.
    """
    if layout not in LAYOUTS:
        raise AnnotationError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if split not in (1, 2, 3):
        raise AnnotationError(f"split must be 1, 2 or 3; got {split}")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise AnnotationError(f"val_fraction and test_fraction must be in [0, 1); got {val_fraction}, {test_fraction}")
    root = Path(data_root)
    if not root.is_dir():
        raise AnnotationError(f"data root {root} does not exist or is not a folder")
    ann = Path(annotations) if annotations is not None else root
    unused: set[str] = set()  # HMDB-51 videos flagged 0: listed, on purpose in no subset
    if layout == "ucf101":
        classes, subsets, report = _ucf101(root, ann, split)
        depth = 1
    elif layout == "hmdb51":
        classes, subsets, report, unused = _hmdb51(root, ann, split)
        depth = 1
    elif layout == "kinetics":
        classes, subsets, report = _kinetics(root, ann, split)
        depth = None
    else:
        classes, subsets, report = _folder(root, ann, split, seed=seed, val_fraction=val_fraction,
                                           test_fraction=test_fraction)
        depth = 1
    if "val" not in subsets:
        subsets["train"], subsets["val"] = carve_val(subsets["train"], val_fraction, seed)
    subsets.setdefault("test", [])
    subsets = {s: subsets[s] for s in SUBSETS}

    # what is on disk: non-video files in class folders, videos in no subset
    if depth is not None:
        on_disk, report.non_video = _disk_videos(root, depth)
    else:
        on_disk = {rel for rel in raw.listing(root) if is_video_name(rel)}
    listed = {e.path for entries in subsets.values() for e in entries} | unused
    report.unlisted = sorted(on_disk - listed)

    # duplicates and missing files
    listed_per_subset = {subset: len(subsets[subset]) for subset in SUBSETS}
    seen: dict[str, str] = {}
    for subset in SUBSETS:
        kept = []
        for e in subsets[subset]:
            if e.path in seen:
                report.duplicates.append(f"{e.path} ({e.source}; first in {seen[e.path]})")
                continue
            seen[e.path] = f"{subset}, {e.source}"
            if not raw.exists(root / e.path):
                report.missing.append(f"{e.path} ({e.source})")
                continue
            kept.append(e)
        subsets[subset] = kept

    paths = [e.path for s in SUBSETS for e in subsets[s]]
    probed = dict(zip(paths, probe_all([root / p for p in paths], workers=workers, progress=progress,
                                       open_video=probe)))
    for rel, result in probed.items():
        if not result.ok:
            report.unreadable[rel] = result.error
        elif probe and result.frames < min_frames:
            report.short[rel] = result.frames
    subsets = {s: [e for e in subsets[s] if e.path not in report.unreadable] for s in SUBSETS}
    report.coverage = {s: {"listed": listed_per_subset[s], "found": len(subsets[s])} for s in SUBSETS
                       if listed_per_subset[s]}

    # leakage and empty classes
    groups = {s: {e.group for e in subsets[s]} for s in SUBSETS}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        both = sorted(groups[a] & groups[b])
        if both:
            report.leaked_groups[f"{a}/{b}"] = both
    for subset in SUBSETS:
        labelled = [e for e in subsets[subset] if e.label_name]
        if subsets[subset] and not labelled:
            continue  # an unlabelled test set: nothing to say per class
        present = {e.label_name for e in labelled}
        empty = [c for c in classes if c not in present]
        if empty and (subsets[subset] or subset == "train"):
            report.empty_classes[subset] = empty

    report.classes = len(classes)
    report.counts = {s: len(subsets[s]) for s in SUBSETS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for subset in SUBSETS:
        write_atomic_text(out / f"{subset}.csv", _manifest_text(subsets[subset], classes))
    write_atomic_text(out / "classes.json", json.dumps(classes, indent=1) + "\n")
    write_atomic_text(out / "report.json", json.dumps(asdict(report), indent=1) + "\n")
    _write_slices(out / SLICES, sorted({e.path for s in SUBSETS for e in subsets[s]}), probed, slices)
    low = {s: c for s, c in report.coverage.items() if c["found"] < min_coverage * c["listed"]}
    if low:
        found = "; ".join(f"{s}: {c['found']:,} of {c['listed']:,} listed videos found and readable "
                          f"({c['found'] / c['listed']:.1%})" for s, c in low.items())
        raise AnnotationError(f"{root}: {found}, under split.min_coverage {min_coverage:.0%}. Fetch the missing "
                              f"videos (report.json lists them) or lower split.min_coverage. Report: "
                              f"{out / 'report.json'}")
    if report.leaked_groups and not allow_leakage:
        pairs = "; ".join(f"{pair}: {', '.join(g[:5])}{' ...' if len(g) > 5 else ''}"
                          for pair, g in report.leaked_groups.items())
        raise AnnotationError(f"groups appear in two subsets ({pairs}); clips of one group would be in training and "
                              "evaluation. Fix the split files or pass allow_leakage=True. "
                              f"Report: {out / 'report.json'}")
    if not subsets["train"]:
        raise AnnotationError(
            f"no readable training video in {root} for {layout} split {split}; see {out / 'report.json'}")
    return report


def _require_split_file(path: Path) -> None:
    if not path.is_file():
        missing = f"{path}: no such file" if path.parent.is_dir() else f"{path.parent}: no such folder"
        raise AnnotationError(f"{missing}. --manifests must name the folder that the split stage writes "
                              "(train/val/test.csv, classes.json): run `action3d stage split` or `dvc repro`")


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV as dicts (columns MANIFEST_COLUMNS); errors name the file and the missing column."""
    _require_split_file(Path(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        absent = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise AnnotationError(f"{path}: not a manifest, missing column(s) {', '.join(absent)}; "
                                  "build it with `action3d data split`")
        return list(reader)


def read_classes(path: str | Path) -> list[str]:
    """classes.json: class names in label order."""
    _require_split_file(Path(path))
    names = json.loads(Path(path).read_text())
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AnnotationError(f"{path}: expected a JSON list of class names")
    return names
