"""The dataset command line: check a copy of a dataset, re-encode one so that it decodes fast, write
the synthetic set as video files, and set finished runs beside the paper's numbers. None of this is
on a clip's way from its file to the logits (that is data.py); it works on the files themselves.

    python tools.py check --dataset ucf101 --root DIR [--shots 8]
        # per list train.py reads: missing, unreadable; exit 1 if any, 2 for a wrong root or flags
    python tools.py prepare --dataset k400 --root DIR --out FAST
        # a copy with a keyframe every 8 frames, then train with --root FAST
    python tools.py synth-ucf DIR [--frames 8 --size 32]
        # the synthetic set as UCF101-style AVI files
    python tools.py table RUN_DIR... [--out DIR]
        # the paper's table: ours, the paper's, the difference; also table.md and table.csv

check     reads the lists train.py reads with the same data flags (protocols.py picks them: the
          official lists by default, every one of the dataset's when no flag names a protocol),
          decodes the first and the last frame of every video found once, in parallel, and prints
          per list the videos listed, found, missing and unreadable, with the first names.
prepare   re-encodes every video the dataset lists (all splits and folds) into --out under the same
          relative path: a short keyframe interval, so a clip's segments decode from a near keyframe
          instead of from the start of a long group of pictures, and x264's fastdecode tuning
          (docs/speed.md: the trade-off, measured). Other files under --root (annotations) are
          copied, so `--root FAST` works with every command. Resumable.
synth-ucf writes data.SyntheticVideos' clips as MPEG-4 AVI files with UCF101's folders and list
          files, so the file path (decoding, parsing UCF101's lists) can be tried end to end without
          a download.
table     reads the results.json of finished runs and lays them out as the paper's tables do, beside
          the paper's numbers, marking what in a run is not the paper's (splits, seeds, settings).

Also here for the tests and bench.py: make_test_video, a generated video whose frames show their
own index.
"""

import argparse
import csv
import itertools
import json
import os
import shutil
import sys
import time
import warnings
from fractions import Fraction
from multiprocessing import Pool

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import archive
import data
import protocols
import train
import vifi

# --------------------------------------------------------------------------------------------------
# check

def _probe(path):
    """'' if the first and last frames of `path` decode, else the reason (a frame size training
    cannot use too)."""
    try:
        with data.VideoReader(path) as video:
            # scaled as training reads them: memory stays small
            video.read([0, len(video) - 1], short_side=256)
        return ""
    except data.VideoError as error:
        return str(error)


# Without a flag that names a protocol, check reads every list the paper has for the dataset: these
# protocols, each skipped where the paper has no split of it (protocols.official_files says which).
ALL_LISTS = ([dict(protocol="few-shot", shots=k) for k in protocols.OFFICIAL_SHOTS] +
             [dict(protocol="base-novel", seed=s) for s in (1, 2, 3)] +
             [dict(protocol="zero-shot", eval_only=True),
              dict(protocol="supervised", eval_only=False)])


def check_lists(args):
    """{list name: VideoDataset, or the DatasetError that reading it raised} of what train.py reads
    with these flags: the official list files (train.py's default for the paper's datasets; all of
    the dataset's when no flag names a protocol), or with --splits native / --dataset list the
    dataset's own lists."""
    named = args.protocol or args.shots or args.base_novel or args.eval_datasets or args.eval_only
    protocols.resolve(args)
    protocols.check_data(args)
    if args.dataset == "list":  # the lists given (train.py needs both to train, one to evaluate)
        lists = (("train", args.train_list), ("test", args.test_list))
        given = {split: path for split, path in lists if path}
        if not given:
            raise data.DatasetError("--dataset list: name the lists to check with --train-list "
                                    "and/or --test-list, and their class names with --labels")
        return {f"{path} ({split})": data.build_dataset("list", args.root, split, list_file=path,
                                                        labels_file=args.labels)
                for split, path in given.items()}
    if args.splits == "native":  # as train.py: one error stops it, so it stops check
        train, tests = protocols.datasets(args)
        named_sets = {"train": train, **tests}.items()
        return {f"{args.dataset} {name}": dataset for name, dataset in named_sets
                if dataset is not None}
    roots, sets = protocols.data_roots(args), {}
    for config in [{}] if named else ALL_LISTS:
        run = argparse.Namespace(**{**vars(args), **config})
        try:
            files = protocols.official_files(run)
        except data.DatasetError:
            if named:
                raise
            continue  # the paper has no split of this protocol for the dataset
        folder = protocols.fetch_splits(run)
        for name, official in files.items():  # official: (dataset, list file, labels file) or None
            key = (official[1] if official else
                   f"{args.dataset}'s own training list (train.py reads it for {run.protocol})")
            if key in sets:
                continue
            split = "train" if name == "train" else "test"
            try:
                sets[key] = (
                    protocols.official_list(roots[official[0]], official, folder, split, {})
                    if official else data.build_dataset(args.dataset, args.root, "train"))
            except data.DatasetError as error:
                sets[key] = error
    return sets


def _names(items, first=3):
    more = f" and {len(items) - first} more" if len(items) > first else ""
    return ", ".join(items[:first]) + more


def check(args):
    """Per list train.py reads: videos listed, found, missing, unreadable (counts and the first
    names). Returns the exit code: 1 if a video is missing or unreadable or a list cannot be read, 2
    for wrong flags, root or splits."""
    try:
        # build_dataset's warning about missing videos: the report below says it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sets = check_lists(args)
    except data.DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = sorted({path for dataset in sets.values() if isinstance(dataset, data.VideoDataset)
                    for path, _ in dataset.samples})
    # each video decoded once, however many lists name it; one torch thread per process, as in
    # DataLoader workers: a forked child entering OpenMP after the parent used it can hang (the
    # probe scales frames with torch)
    with Pool(max(1, args.workers), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        probes = pool.imap(_probe, paths, chunksize=8)
        bar = tqdm(probes, total=len(paths), desc="checking", unit="video", leave=False,
                   disable=not sys.stderr.isatty())
        errors = dict(zip(paths, bar))
    print(f"{args.dataset} under {args.root} ({protocols.splits_used(args)}):")
    bad = 0
    for name, dataset in sets.items():
        if isinstance(dataset, data.DatasetError):
            print(f"{name}: {dataset}")
            bad += 1
            continue
        unreadable = [errors[path] for path, _ in dataset.samples if errors[path]]
        listed = len(dataset) + len(dataset.missing)
        print(f"{name}: {listed} videos listed in {len(dataset.classnames)} classes, "
              f"{len(dataset)} found, {len(dataset.missing)} missing, {len(unreadable)} unreadable")
        if dataset.missing:
            print(f"  missing: {_names(dataset.missing)}")
        for reason in unreadable[:3]:
            print(f"  unreadable: {reason}")
        if len(unreadable) > 3:
            print(f"  and {len(unreadable) - 3} more unreadable")
        bad += bool(dataset.missing or unreadable)
    print(f"{bad} of {len(sets)} lists name videos that train.py cannot read" if bad else
          f"all {len(sets)} lists complete: {len(paths)} videos, every one readable")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# prepare: a copy that decodes fast at any position

# Per file extension (kept, so names stay): the container and the encoder PyAV ships for it.
# Quality: lower is better and bigger; CRF for x264 (0-51) and VP9 (0-63), a fixed quantizer for
# MPEG-4 (1-31). The defaults here and of prepare_video are chosen from the measurements in
# docs/speed.md (bench.py --e2e).
ENCODERS = {".mp4": ("mp4", "libx264"), ".m4v": ("mp4", "libx264"), ".mov": ("mov", "libx264"),
            ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"),
            ".avi": ("avi", "mpeg4")}
QUALITY = {"libx264": 20, "libvpx-vp9": 32, "mpeg4": 3}


def prepare_video(src, dst, keyint=8, quality=None, short_side=256, fast_decode=True):
    """Re-encode `src` into `dst` (container and encoder from dst's extension) with a keyframe every
    `keyint` frames, scaled down to `short_side` if its short side is longer. Every frame is kept,
    at the source's average rate; audio is dropped. Written through archive.replacing: dst exists
    only complete."""
    extension = os.path.splitext(dst)[1]
    if extension.lower() not in ENCODERS:
        raise data.VideoError(f"{src}: cannot write {extension!r} here, only {', '.join(ENCODERS)}")
    container, codec = ENCODERS[extension.lower()]
    level = {**QUALITY, **(quality or {})}[codec]
    with data.VideoReader(src) as video, data._video_errors(src, "cannot decode"), \
            archive.replacing(dst, "wb") as f, av.open(f, "w", container) as out:
        h, w = video.stream.height, video.stream.width
        scale = min(1.0, short_side / min(h, w)) if short_side else 1.0
        # 4:2:0 chroma needs even sides
        height, width = 2 * round(h * scale / 2), 2 * round(w * scale / 2)
        rate = Fraction(video.stream.average_rate or 25)
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.codec_context.gop_size = keyint
        stream.codec_context.thread_count = 1  # one process per core
        if codec == "mpeg4":
            # a fixed quantizer: constant quality
            stream.codec_context.qmin = stream.codec_context.qmax = level
        elif codec == "libx264":
            # fastdecode: no CABAC, deblocking or weighted B-frames (docs/speed.md: the trade-off)
            stream.options = {"crf": str(level), "preset": "fast",
                              **({"tune": "fastdecode"} if fast_decode else {})}
        else:
            # VP9's constant-quality mode needs bit rate 0; cpu-used 5 encodes far faster than the
            # default
            stream.bit_rate, stream.options = 0, {"crf": str(level), "cpu-used": "5", "row-mt": "0"}
        for i, (_, frame) in enumerate(video._decode(video.keyframes[0])):
            frame = frame.reformat(width, height, "yuv420p", interpolation="AREA")
            frame.pts, frame.time_base = i, 1 / rate  # frame i at i / rate: no gaps
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _prepare_one(task):
    """Pool worker: (src, dst, settings) -> (bytes of src, bytes of dst, error or ''). A dst that
    exists was finished by an earlier run (see prepare_video)."""
    src, dst, settings = task
    try:
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            prepare_video(src, dst, **settings)
        return os.path.getsize(src), os.path.getsize(dst), ""
    except (data.VideoError, OSError) as error:
        return 0, 0, str(error).replace("\n", " ")


def _quality(text):
    """--quality ENCODER=N -> (encoder, N)."""
    encoder, _, value = text.partition("=")
    if encoder not in QUALITY or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected ENCODER=NUMBER, ENCODER one of "
                                         f"{', '.join(QUALITY)}; got {text}")
    return encoder, int(value)


def prepare(args):
    """Every video the dataset lists (all splits and folds) re-encoded into --out under the same
    relative path, and every other file under --root of at most 256 MB (annotations) copied; links
    that lead out of --root, loop or dangle are skipped, each named. One prepare per --out at a time
    (a lock). Returns the exit code."""
    # real paths: a link cannot hide --out in --root
    root, out = os.path.realpath(args.root), os.path.realpath(args.out)
    if out == root or out.startswith(root + os.sep):
        print(f"error: --out {args.out} must lie outside --root {args.root}", file=sys.stderr)
        return 2
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {args.out} is a file; expected a folder for the prepared copy (new or "
              "from an earlier prepare)", file=sys.stderr)
        return 2
    try:
        with archive.lock_folder(out, "--out"):
            archive.remove_temps(out)  # a killed prepare's half-written files
            return prepare_locked(args, root, out)
    except archive.FolderInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def outside(path, root):
    """Why `path` under `root` is skipped ('' if it is not): a link whose target is missing, loops,
    or lies outside `root` (its contents would be copied out of a folder the user did not name)."""
    real = os.path.realpath(path)
    if not os.path.exists(path):
        return f"skipped {path}: a link that loops or whose target is missing"
    if real != root and not real.startswith(root + os.sep):
        return f"skipped {path}: a link to {real}, outside --root"
    return ""


def prepare_locked(args, root, out):
    # every fold: a fold's unused videos are another's
    folds = (1, 2, 3) if args.dataset in ("ucf101", "hmdb51") else (1,)
    if args.dataset == "list":
        lists = [("train", 1, path) for path in args.list_file or [None]]
    else:
        lists = [(split, fold, None) for split in ("train", "test") for fold in folds]
    paths = set()
    for split, fold, list_file in lists:
        try:
            dataset = data.build_dataset(args.dataset, root, split, fold, list_file=list_file,
                                         labels_file=args.labels_file)
            paths |= {path for path, _ in dataset.samples}
        except data.DatasetError as error:
            # folds 2 and 3 may be absent from a copy: the same videos, split otherwise
            if fold == 1:
                print(f"error: {error}", file=sys.stderr)
                return 2
    skipped = {path: why for path in paths if (why := outside(path, root))}
    settings = dict(keyint=args.keyint, quality=dict(args.quality), short_side=args.short_side)
    tasks = [(path, os.path.join(out, os.path.relpath(path, root)), settings)
             for path in sorted(paths - skipped.keys())]
    start, sizes, errors = time.time(), [], []
    with Pool(max(1, args.workers)) as pool:
        bar = tqdm(pool.imap_unordered(_prepare_one, tasks), total=len(tasks), desc="preparing",
                   unit="video", smoothing=0.05, disable=not sys.stderr.isatty())
        for before, after, error in bar:
            (errors.append(error) if error else sizes.append((before, after)))
    before, after = (sum(column) for column in zip(*sizes)) if sizes else (0, 0)
    # os.walk follows no link to a folder; a link to a file is checked as the videos are
    others = []
    for src in (os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names):
        if src.lower().endswith(data.VIDEO_EXTENSIONS) or src in skipped:
            continue
        if why := outside(src, root):
            skipped[src] = why
        elif os.path.getsize(src) <= 2 ** 28:
            others.append(src)
    for src in others:
        dst = os.path.join(out, os.path.relpath(src, root))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as source, archive.replacing(dst, "wb") as target:
            shutil.copyfileobj(source, target)
    print(f"{len(sizes)} of {len(tasks)} videos in {out}, {len(errors)} unreadable and left out: "
          f"{before / 1e9:.3g} GB -> {after / 1e9:.3g} GB ({after / max(before, 1):.2f}x); "
          f"{len(others)} other files copied; {time.time() - start:.0f} s")
    for error in errors:
        print(f"  unreadable: {error}")
    for why in skipped.values():
        print(f"  {why}")
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------------
# table: finished runs beside the paper's numbers

# The paper's ViT-B/16 top-1 (%) per model, protocol, dataset and metric, as the official
# repository's README at e2d1948 lists them (the paper's Tables 1-5): few-shot on split 1 (K shots),
# base-to-novel averaged over seeds 1-3 with HM the harmonic mean of the averages, zero-shot
# (trained on K400) as mean ± std over the three folds or subsets, fully supervised K400 with 4
# clips x 3 crops.
PAPER = {
    ("ViFi-CLIP", "few-shot", "hmdb51"): {"K=2": 57.2, "K=4": 62.7, "K=8": 64.5, "K=16": 66.8},
    ("ViFi-CLIP", "few-shot", "ucf101"): {"K=2": 80.7, "K=4": 85.1, "K=8": 90.0, "K=16": 92.7},
    ("ViFi-CLIP", "few-shot", "ssv2"): {"K=2": 6.2, "K=4": 7.4, "K=8": 8.5, "K=16": 12.4},
    ("bridge and prompt", "few-shot", "hmdb51"): {"K=2": 63.0, "K=4": 65.1, "K=8": 69.6,
                                                  "K=16": 72.0},
    ("bridge and prompt", "few-shot", "ucf101"): {"K=2": 91.0, "K=4": 93.7, "K=8": 95.0,
                                                  "K=16": 96.4},
    ("bridge and prompt", "few-shot", "ssv2"): {"K=2": 6.7, "K=4": 7.9, "K=8": 10.2, "K=16": 13.5},
    ("ViFi-CLIP", "base-novel", "k400"): {"base": 76.4, "novel": 61.1, "HM": 67.9},
    ("ViFi-CLIP", "base-novel", "hmdb51"): {"base": 73.8, "novel": 53.3, "HM": 61.9},
    ("ViFi-CLIP", "base-novel", "ucf101"): {"base": 92.9, "novel": 67.7, "HM": 78.3},
    ("ViFi-CLIP", "base-novel", "ssv2"): {"base": 16.2, "novel": 12.1, "HM": 13.9},
    ("CLIP image-FT", "base-novel", "k400"): {"base": 72.9, "novel": 58.0, "HM": 64.6},
    ("CLIP image-FT", "base-novel", "hmdb51"): {"base": 62.6, "novel": 47.5, "HM": 54.0},
    ("CLIP image-FT", "base-novel", "ucf101"): {"base": 86.4, "novel": 65.3, "HM": 74.4},
    ("CLIP image-FT", "base-novel", "ssv2"): {"base": 9.2, "novel": 8.5, "HM": 8.8},
    ("CLIP text-FT", "base-novel", "k400"): {"base": 73.4, "novel": 59.7, "HM": 65.8},
    ("CLIP text-FT", "base-novel", "hmdb51"): {"base": 70.0, "novel": 51.2, "HM": 59.1},
    ("CLIP text-FT", "base-novel", "ucf101"): {"base": 90.9, "novel": 67.4, "HM": 77.4},
    ("CLIP text-FT", "base-novel", "ssv2"): {"base": 12.4, "novel": 9.5, "HM": 10.8},
    ("bridge and prompt", "base-novel", "hmdb51"): {"base": 77.1, "novel": 54.9, "HM": 64.1},
    ("bridge and prompt", "base-novel", "ucf101"): {"base": 95.9, "novel": 74.1, "HM": 83.6},
    ("bridge and prompt", "base-novel", "ssv2"): {"base": 15.8, "novel": 11.5, "HM": 13.3},
    ("ViFi-CLIP", "zero-shot", "hmdb51"): {"top-1": (51.3, 0.6)},
    ("ViFi-CLIP", "zero-shot", "ucf101"): {"top-1": (76.8, 0.7)},
    ("ViFi-CLIP", "zero-shot", "k600"): {"top-1": (71.2, 1.0)},
    ("CLIP image-FT", "zero-shot", "hmdb51"): {"top-1": 49.0},
    ("CLIP image-FT", "zero-shot", "ucf101"): {"top-1": 72.9},
    ("CLIP image-FT", "zero-shot", "k600"): {"top-1": 62.2},
    ("CLIP text-FT", "zero-shot", "hmdb51"): {"top-1": 48.5},
    ("CLIP text-FT", "zero-shot", "ucf101"): {"top-1": 69.8},
    ("CLIP text-FT", "zero-shot", "k600"): {"top-1": 68.5},
    ("ViFi-CLIP", "supervised", "k400"): {"top-1": 83.9, "top-5": 96.3},
    ("CLIP image-FT", "supervised", "k400"): {"top-1": 82.8, "top-5": 96.2},
    ("CLIP text-FT", "supervised", "k400"): {"top-1": 73.1, "top-5": 91.2},
}
PAPER_INPUT_SIZE = 224  # every run of the paper: ViT-B/16 at 224 px
# The settings that change what a run computes, compared with what train.py picks for the run's
# protocol (of them, those that only act in training are not compared for a run that only
# evaluated).
COMPARED = ["model", "frames", "views", "template", "clean_names", "norm"]
TRAINING = ["batch_size", "lr", "epochs", "warmup_epochs", "weight_decay", "label_smoothing",
            "mixup", "cutmix", "mix_switch", "eval_every", "n_ctx", "depth"]


class RunError(Exception):
    """A folder given to `table` that does not hold a finished run's results.json."""


def read_run(folder):
    """A run's results.json, checked for what `table` reads (RunError otherwise)."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise RunError(f"{folder} holds no results.json: expected the --out folder of a finished "
                       "train.py run")
    try:
        with open(path) as f:
            run = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path} is not valid JSON ({error}): rerun the evaluation (train.py "
                       "--eval-only --checkpoint best.pt) or leave the folder out") from None
    keys = ("protocol", "dataset", "splits", "mode", "results", "settings")
    missing = [k for k in keys if k not in run] if isinstance(run, dict) else list(keys)
    if missing or not isinstance(run["results"], dict) or not isinstance(run["settings"], dict):
        lacking = ", ".join(missing) or "results or settings as objects"
        raise RunError(f"{path} lacks {lacking}: expected the results.json train.py writes; rerun "
                       "the evaluation or leave the folder out")
    return run


def model_name(run):
    """The paper's name for the model a run trained or evaluated."""
    if run["mode"] == "prompt":
        return "bridge and prompt"
    if run["mode"] == "zeroshot":
        return "vanilla CLIP"
    by_towers = {"image": "CLIP image-FT", "text": "CLIP text-FT"}
    return by_towers.get(run["settings"].get("towers"), "ViFi-CLIP")


def run_metrics(run):
    """{(dataset, metric): top-1 or (mean, std)} that the paper's tables report for this run:
    few-shot the best evaluation (results.json's paper_reports), base-to-novel the base and novel
    halves (HM is taken after averaging seeds, as the paper does), zero-shot each dataset's mean ±
    std over folds, otherwise the test set's top-1/5."""
    results, dataset = run["results"], run["dataset"]
    if run["protocol"] == "few-shot":
        best = run.get("best") if run.get("paper_reports") == "best" else None
        top1 = best["top1"] if best else results["test"]["top1"]
        return {(dataset, f"K={run['settings'].get('shots')}"): top1}
    metrics = {}
    for name, result in results.items():
        if not isinstance(result, dict) or name.rsplit("-", 1)[-1].startswith(("fold", "subset")):
            # the harmonic mean (recomputed) and single folds (their mean and std are reported)
            continue
        if "mean_top1" in result:
            metrics[name, "top-1"] = (result["mean_top1"], result["std_top1"])
        elif name in ("base", "novel"):
            metrics[dataset, name] = result["top1"]
        else:
            metrics[dataset, "top-1"] = result["top1"]
            if run["protocol"] == "supervised":
                metrics[dataset, "top-5"] = result["top5"]
    return metrics


def run_differences(run):
    """What makes a run not the paper's: its splits, and each setting that is not what train.py
    picks for the protocol (found by asking train.py's flag parser for the protocol with nothing
    else given)."""
    settings = run["settings"]
    notes = [] if str(run["splits"]).startswith("official") else [f"splits {run['splits']}"]
    if run["protocol"] == "synthetic":
        return notes
    flags = ["--dataset", run["dataset"], "--protocol", run["protocol"], "--mode", run["mode"],
             "--towers", settings.get("towers", "both"), "--shots", str(settings.get("shots", 0)),
             "--seed", str(settings.get("seed", 1)),
             "--eval-datasets", ",".join(settings.get("eval_datasets") or []),
             *["--eval-only"] * bool(settings.get("eval_only"))]
    try:
        paper = vars(train.get_args(flags))
    except (SystemExit, vifi.ConfigError):
        return notes + ["settings not comparable with any of the paper's"]
    compared = COMPARED + ([] if settings.get("eval_only") else TRAINING)
    notes += [f"{k} {settings.get(k)} (paper {paper[k]})" for k in compared
              if settings.get(k) != paper[k]]
    if settings.get("input_size") not in (None, PAPER_INPUT_SIZE):
        notes.append(f"input_size {settings['input_size']} (paper {PAPER_INPUT_SIZE})")
    return notes


def _number(value):
    if value is None:
        return ""
    return f"{value[0]:.2f} ± {value[1]:.2f}" if isinstance(value, tuple) else f"{value:.2f}"


def paper_table(folders):
    """Rows (protocol, model, dataset, metric, ours, paper, difference, runs, notes) for the runs in
    `folders`: runs of one protocol, model, dataset and metric are averaged (base-to-novel: the
    seeds), ordered as protocols.PROTOCOLS; a number the paper does not report is None."""
    groups = {}
    for folder in folders:
        run = read_run(folder)
        notes = run_differences(run)
        for (dataset, metric), value in run_metrics(run).items():
            key = (run["protocol"], model_name(run), dataset, metric)
            group = groups.setdefault(key, ([], [], []))  # values, run names, notes
            name = os.path.basename(os.path.normpath(folder))
            if run["protocol"] == "base-novel":
                name += f" (seed {run['settings'].get('seed')})"
            group[0].append(value)
            group[1].append(name)
            group[2].extend(n for n in notes if n not in group[2])
    for (protocol, model, dataset, metric), (values, runs, notes) in list(groups.items()):
        # HM of the averages, as the paper
        if metric == "novel" and (protocol, model, dataset, "base") in groups:
            bases = groups[protocol, model, dataset, "base"][0]
            base, novel = (sum(v) / len(v) for v in (bases, values))
            hm = 2 * base * novel / (base + novel) if base + novel else 0.0
            groups[protocol, model, dataset, "HM"] = ([hm], runs, notes)
    order = {**{name: i for i, name in enumerate(protocols.PROTOCOLS)},
             "synthetic": len(protocols.PROTOCOLS)}
    metric_order = ["K=2", "K=4", "K=8", "K=16", "base", "novel", "HM", "top-1", "top-5"]

    def sort_key(item):
        protocol, model, dataset, metric = item[0]
        return (order.get(protocol, 99), model, dataset,
                metric_order.index(metric) if metric in metric_order else 99)

    rows = []
    for (protocol, model, dataset, metric), (values, runs, notes) in sorted(groups.items(),
                                                                           key=sort_key):
        # zero-shot mean ± std, averaged over runs item by item
        if isinstance(values[0], (list, tuple)):
            ours = tuple(sum(v[i] for v in values) / len(values) for i in (0, 1))
        else:
            ours = sum(values) / len(values)
        paper = PAPER.get((model, protocol, dataset), {}).get(metric)
        mean = lambda v: v[0] if isinstance(v, (list, tuple)) else v
        difference = None if paper is None else mean(ours) - mean(paper)
        if protocol == "base-novel" and len(runs) < 3:
            notes = [f"{len(runs)} of the paper's 3 seeds"] + notes
        rows.append((protocol, model, dataset, metric, ours, paper, difference, ", ".join(runs),
                     "; ".join(notes)))
    return rows


TABLE_HEADER = ["protocol", "model", "dataset", "metric", "ours", "paper", "ours - paper", "runs",
                "not the paper's"]


def table(args):
    """Print the paper's table for the runs given and write it as table.md and table.csv. Returns
    the exit code."""
    try:
        rows = paper_table(args.runs)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cells = [[protocol, model, dataset, metric, _number(ours), _number(paper) or "—",
              "—" if diff is None else f"{diff:+.2f}", runs, notes]
             for protocol, model, dataset, metric, ours, paper, diff, runs, notes in rows]
    markdown = "".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |\n" for line in
                       [TABLE_HEADER, ["---"] * len(TABLE_HEADER), *cells])
    print(markdown, end="")
    out = args.out or os.path.dirname(os.path.abspath(os.path.normpath(args.runs[0])))
    os.makedirs(out, exist_ok=True)
    # no planted link followed, no half-written table
    with archive.replacing(os.path.join(out, "table.md")) as f:
        f.write(markdown)
    with archive.replacing(os.path.join(out, "table.csv")) as f:
        csv.writer(f).writerows([TABLE_HEADER, *cells])
    print(f"written to {os.path.join(out, 'table.md')} and table.csv beside it")
    return 0


# --------------------------------------------------------------------------------------------------
# Videos written to files: the synthetic set, and generated videos for the tests and bench.py

def write_video(path, images, fps=25, codec="mpeg4", gop=250, bit_rate=600_000):
    """Encode uint8 frames (T, H, W, 3), an array or any iterable of (H, W, 3) arrays, to a file
    with PyAV."""
    images = iter(images)
    first = next(images)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        # FFmpeg's MJPEG encoder takes only the former
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.gop_size, stream.bit_rate = gop, bit_rate
        for image in itertools.chain([first], images):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_synthetic_ucf(root, frames=8, size=32, train_per_class=64, test_per_class=16, seed=0):
    """Write SyntheticVideos' clips as MPEG-4 AVI files in UCF101's layout (class folders,
    ucfTrainTestlist/ classInd.txt, trainlist01.txt, testlist01.txt), so build_dataset('ucf101',
    root) reads them back."""
    names = data.synthetic_classes()
    # UCF101's CamelCase
    folders = ["".join(word.capitalize() for word in name.split()) for name in names]
    os.makedirs(os.path.join(root, "ucfTrainTestlist"), exist_ok=True)
    with open(os.path.join(root, "ucfTrainTestlist", "classInd.txt"), "w") as f:
        f.write("".join(f"{i + 1} {folder}\n" for i, folder in enumerate(folders)))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        dataset = data.SyntheticVideos(split, frames, size, per_class, seed)
        lines = []
        for key, label in dataset.samples:
            name = f"{folders[label]}/v_{folders[label]}_{split}{key.split('/')[2]}.avi"
            os.makedirs(os.path.join(root, "UCF-101", folders[label]), exist_ok=True)
            # (T, 3, H, W) -> (T, H, W, 3)
            video = dataset.load(key)[0][0].permute(0, 2, 3, 1).numpy()
            # nearly lossless
            write_video(os.path.join(root, "UCF-101", name), video, bit_rate=2_000_000)
            lines.append(f"{name} {label + 1}\n" if split == "train" else f"{name}\n")
        with open(os.path.join(root, "ucfTrainTestlist", f"{split}list01.txt"), "w") as f:
            f.writelines(lines)


def make_test_video(path, num_frames=175, width=320, height=240, fps=25, codec="mpeg4", gop=250,
                    bit_rate=600_000, texture=0.0):
    """A video for tests and benchmarks: smooth moving colour patterns under a 16-row band that
    encodes the frame index i (left half grey level 16 * (i % 16) + 8, right half
    16 * (i // 16 % 16) + 8). The defaults are UCF101-like (320x240, 7 s, MPEG-4 in AVI);
    Kinetics-like is 340x256, 250 frames at 25 fps, libx264 in MP4. texture > 0 adds grey noise of
    that standard deviation, smooth over 2 to 16 pixels, panning 2 px right and 1 px down per frame
    under the pattern: detail that moves, as in camera footage, and costs bits."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rows, cols = height + num_frames, width + 2 * num_frames
    generator = torch.Generator().manual_seed(0)
    # (height + T, width + 2T): frame i sees a window at (i, 2i)
    field = np.zeros((rows, cols), np.float32)
    if texture:  # noise at 1/2 to 1/16 resolution, upsampled; coarser: stronger
        noise = sum(scale * F.interpolate(torch.randn(1, 1, rows // scale + 1, cols // scale + 1,
                                                      generator=generator),
                                          scale_factor=scale, mode="bicubic")[0, 0, :rows, :cols]
                    for scale in (2, 4, 8, 16))
        field = (texture / noise.std() * noise).numpy()

    def frame(i):
        image = np.stack([128 + 90 * np.sin(x / (17 + 5 * c) + y / (23 - 4 * c) + i / (6 + c))
                          for c in range(3)], -1)
        # fine texture for the codec
        image[16:] += 20 * (np.sin(x[16:] * 0.7 + i) * np.cos(y[16:] * 0.5))[..., None]
        image[16:] += field[i:i + height - 16, 2 * i:2 * i + width, None]
        image[:16, : width // 2] = 16 * (i % 16) + 8
        image[:16, width // 2:] = 16 * (i // 16 % 16) + 8
        return image.clip(0, 255).astype(np.uint8)

    write_video(path, (frame(i) for i in range(num_frames)), fps, codec, gop, bit_rate)


# --------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    chk = commands.add_parser(
        "check", conflict_handler="resolve",
        help="verify a copy of a dataset against the lists train.py reads: missing and unreadable "
        "videos per list",
        description=check.__doc__.split(". Returns")[0] + ". Takes train.py's data flags: without "
        "--shots, --base-novel, --protocol, --eval-datasets or --eval-only it reads every official "
        "list of the dataset. Exit 1 if anything is missing or unreadable, 2 for wrong flags, root "
        "or split files.")
    train.data_flags(chk)
    chk.add_argument("--dataset", required=True, choices=list(data.LAYOUTS),
                     help="the dataset to check")
    chk.add_argument("--eval-only", action="store_true",
                     help="the lists of train.py --eval-only (zero-shot: the three folds or "
                     "subsets)")
    chk.add_argument("--workers", type=int, default=os.cpu_count(),
                     help="processes that decode in parallel (default: one per core)")
    # what protocols.resolve reads of train.py's other flags
    chk.set_defaults(mode="finetune", towers="both", out=None)
    prep = commands.add_parser(
        "prepare", help="re-encode a dataset into a copy that decodes fast at any position",
        description=prepare.__doc__.split(". Returns")[0] + ". Resumable: finished files are "
        "skipped. Exit 1 if a source was unreadable (it is left out), 2 for wrong arguments.")
    prep.add_argument("--dataset", required=True, choices=list(data.LAYOUTS),
                      help="whose layout and lists to read")
    prep.add_argument("--root", required=True, help="the dataset as it is")
    prep.add_argument("--out", required=True, help="the prepared copy (then train with --root OUT)")
    prep.add_argument("--list-file", nargs="+", help="for --dataset list: one or more list files")
    prep.add_argument("--labels-file",
                      help="for --dataset list: the 'id,name' CSV of the class names")
    prep.add_argument("--keyint", type=int, default=8,
                      help="a keyframe every N frames (default 8; docs/speed.md: the trade-off)")
    prep.add_argument("--short-side", type=int, default=256,
                      help="scale videos whose short side is longer down to this (default 256; "
                      "0 keeps every size)")
    default_quality = " ".join(f"{k}={v}" for k, v in QUALITY.items())
    prep.add_argument("--quality", nargs="+", default=[], type=_quality, metavar="ENCODER=N",
                      help=f"lower is better and bigger; default {default_quality}")
    prep.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="processes that encode in parallel (default: one per core)")
    synth = commands.add_parser("synth-ucf",
                                help="write the synthetic dataset as UCF101-style AVI files")
    synth.add_argument("dir", help="the folder to write UCF-101/ and ucfTrainTestlist/ into")
    synth.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    synth.add_argument("--size", type=int, default=32,
                       help="width and height of a frame in pixels (default 32)")
    synth.add_argument("--train-per-class", type=int, default=64,
                       help="training videos per class (default 64)")
    synth.add_argument("--test-per-class", type=int, default=16,
                       help="test videos per class (default 16)")
    tab = commands.add_parser(
        "table", help="the paper's table for finished runs, with the paper's numbers beside",
        description="One row per protocol, model, dataset and metric the paper reports: ours (runs "
        "of the same averaged, as base-to-novel's seeds), the paper's, the difference, the runs, "
        "and what in them is not the paper's (splits, settings). Printed, and written as table.md "
        "and table.csv. Exit 2 for a folder without a readable results.json.")
    tab.add_argument("runs", nargs="+", metavar="RUN_DIR",
                     help="train.py --out folders (each holds results.json)")
    tab.add_argument("--out", help="where table.md and table.csv go (default: the folder holding "
                     "the first run)")
    args = parser.parse_args(argv)

    if args.command == "table":
        return table(args)
    if args.command == "synth-ucf":
        write_synthetic_ucf(args.dir, args.frames, args.size, args.train_per_class,
                            args.test_per_class)
        print(f"wrote {len(data.synthetic_classes())} classes to {args.dir}")
        return 0
    return prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
