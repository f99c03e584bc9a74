"""The dataset command line: check a copy of a dataset, re-encode one so that it decodes fast, and write the
synthetic set as video files. None of this is on a clip's way from its file to the logits (that is data.py); it
works on the files themselves.

    python tools.py check --dataset ucf101 --root DIR [--fold 1]   # counts per split, every unreadable file;
                                                                   # exit 1 if any, 2 for a wrong root
    python tools.py prepare --dataset k400 --root DIR --out FAST   # a copy with a keyframe every 8 frames,
                                                                   # then train with --root FAST
    python tools.py synth-ucf DIR [--frames 8 --size 32]           # the synthetic set as UCF101-style AVI files

check     builds the train and test sets of one fold (for --dataset list, the one list) with build_dataset, as
          training does, decodes the first and the last frame of every video found, in parallel, and prints per
          set the numbers of videos, classes, videos listed but missing and unreadable files, then one line per
          unreadable file.
prepare   re-encodes every video the dataset lists (all splits and folds) into --out under the same relative
          path: a short keyframe interval, so a clip's segments decode from a near keyframe instead of from the
          start of a long group of pictures, and x264's fastdecode tuning (README: the trade-off, measured). Other
          files under --root (annotations) are copied, so `--root FAST` works with every command. Resumable.
synth-ucf writes data.SyntheticVideos' clips as MPEG-4 AVI files with UCF101's folders and list files, so the
          file path (decoding, parsing UCF101's lists) can be tried end to end without a download.

Also here for the tests and bench.py: make_test_video, a generated video whose frames show their own index.
"""

import argparse
import itertools
import os
import shutil
import sys
import time
from fractions import Fraction
from multiprocessing import Pool

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import archive
import data

# ----------------------------------------------------------------------------------------------------------------
# check

def _probe(path):
    """'' if the first and last frames of `path` decode, else the reason (a frame size training cannot use too)."""
    try:
        with data.VideoReader(path) as video:
            video.read([0, len(video) - 1], short_side=256)  # scaled as training reads them: memory stays small
        return ""
    except data.VideoError as error:
        return str(error)


def check(args):
    """Counts per split and every unreadable file. Returns the exit code: 1 if a file is unreadable, 2 if the
    dataset's lists cannot be read."""
    unreadable = 0
    for split in ["train"] if args.dataset == "list" else ["train", "test"]:
        try:
            dataset = data.build_dataset(args.dataset, args.root, split, args.fold, list_file=args.list_file,
                                         labels_file=args.labels_file)
        except data.DatasetError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        # one torch thread per process, as in DataLoader workers: a forked child entering OpenMP after the parent
        # used it can hang (the probe scales frames with torch)
        with Pool(max(1, args.workers), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            probes = pool.imap(_probe, [path for path, _ in dataset.samples], chunksize=8)
            errors = [e for e in tqdm(probes, total=len(dataset), desc=f"checking {split}", leave=False) if e]
        print(f"{split}: {len(dataset)} videos in {len(dataset.classnames)} classes, {len(dataset.missing)} listed "
              f"but missing, {len(errors)} unreadable")
        for error in errors:
            print(f"  unreadable: {error}")
        unreadable += len(errors)
    return 1 if unreadable else 0


# ----------------------------------------------------------------------------------------------------------------
# prepare: a copy that decodes fast at any position

# Per file extension (kept, so names stay): the container and the encoder PyAV ships for it. Quality: lower is better
# and bigger; CRF for x264 (0-51) and VP9 (0-63), a fixed quantizer for MPEG-4 (1-31). The defaults here and of
# prepare_video are chosen from the measurements in README (bench.py --e2e).
ENCODERS = {".mp4": ("mp4", "libx264"), ".m4v": ("mp4", "libx264"), ".mov": ("mov", "libx264"),
            ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".avi": ("avi", "mpeg4")}
QUALITY = {"libx264": 20, "libvpx-vp9": 32, "mpeg4": 3}


def prepare_video(src, dst, keyint=8, quality=None, short_side=256, fast_decode=True):
    """Re-encode `src` into `dst` (container and encoder from dst's extension) with a keyframe every `keyint`
    frames, scaled down to `short_side` if its short side is longer. Every frame is kept, at the source's average
    rate; audio is dropped. Written through archive.replacing: dst exists only complete."""
    if os.path.splitext(dst)[1].lower() not in ENCODERS:
        raise data.VideoError(f"{src}: cannot write {os.path.splitext(dst)[1]!r} here, only {', '.join(ENCODERS)}")
    fmt, codec = ENCODERS[os.path.splitext(dst)[1].lower()]
    q = {**QUALITY, **(quality or {})}[codec]
    with data.VideoReader(src) as video, data._video_errors(src, "cannot decode"), \
            archive.replacing(dst, "wb") as f, av.open(f, "w", fmt) as out:
        h, w = video.stream.height, video.stream.width
        scale = min(1.0, short_side / min(h, w)) if short_side else 1.0
        height, width = 2 * round(h * scale / 2), 2 * round(w * scale / 2)  # 4:2:0 chroma needs even sides
        rate = Fraction(video.stream.average_rate or 25)
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.codec_context.gop_size = keyint
        stream.codec_context.thread_count = 1  # one process per core
        if codec == "mpeg4":
            stream.codec_context.qmin = stream.codec_context.qmax = q  # a fixed quantizer: constant quality
        elif codec == "libx264":  # fastdecode: no CABAC, deblocking or weighted B-frames (README: the trade-off)
            stream.options = {"crf": str(q), "preset": "fast", **({"tune": "fastdecode"} if fast_decode else {})}
        else:  # VP9's constant-quality mode needs bit rate 0; cpu-used 5 encodes far faster than the default
            stream.bit_rate, stream.options = 0, {"crf": str(q), "cpu-used": "5", "row-mt": "0"}
        for i, (_, frame) in enumerate(video._decode(video.keyframes[0])):
            frame = frame.reformat(width, height, "yuv420p", interpolation="AREA")
            frame.pts, frame.time_base = i, 1 / rate  # frame i at i / rate: no gaps
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _prepare_one(task):
    """Pool worker: (src, dst, settings) -> (bytes of src, bytes of dst, error or ''). A dst that exists was
    finished by an earlier run (see prepare_video)."""
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
        raise argparse.ArgumentTypeError(f"expected ENCODER=NUMBER, ENCODER one of {', '.join(QUALITY)}; got {text}")
    return encoder, int(value)


def prepare(args):
    """Every video the dataset lists (all splits and folds) re-encoded into --out under the same relative path, and
    every other file under --root of at most 256 MB (annotations) copied; links that lead out of --root, loop or
    dangle are skipped, each named. One prepare per --out at a time (a lock). Returns the exit code."""
    root, out = os.path.realpath(args.root), os.path.realpath(args.out)  # real paths: a link cannot hide --out in --root
    if out == root or out.startswith(root + os.sep):
        print(f"error: --out {args.out} must lie outside --root {args.root}", file=sys.stderr)
        return 2
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {args.out} is a file; expected a folder for the prepared copy (new or from an earlier "
              "prepare)", file=sys.stderr)
        return 2
    try:
        with archive.lock_folder(out, "--out"):
            archive.remove_temps(out)  # a killed prepare's half-written files
            return prepare_locked(args, root, out)
    except archive.FolderInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def outside(path, root):
    """Why `path` under `root` is skipped ('' if it is not): a link whose target is missing, loops, or lies outside
    `root` (its contents would be copied out of a folder the user did not name)."""
    real = os.path.realpath(path)
    if not os.path.exists(path):
        return f"skipped {path}: a link that loops or whose target is missing"
    if real != root and not real.startswith(root + os.sep):
        return f"skipped {path}: a link to {real}, outside --root"
    return ""


def prepare_locked(args, root, out):
    lists = [("train", 1, f) for f in args.list_file or [None]] if args.dataset == "list" else [
        (split, fold, None) for split in ("train", "test") for fold in  # a fold's unused videos are another's
        ((1, 2, 3) if args.dataset in ("ucf101", "hmdb51") else (1,))]
    paths = set()
    for split, fold, list_file in lists:
        try:
            paths |= {path for path, _ in data.build_dataset(args.dataset, root, split, fold, list_file=list_file,
                                                            labels_file=args.labels_file).samples}
        except data.DatasetError as error:
            if fold == 1:  # folds 2 and 3 may be absent from a copy: the same videos, split otherwise
                print(f"error: {error}", file=sys.stderr)
                return 2
    skipped = {p: why for p in paths if (why := outside(p, root))}
    settings = dict(keyint=args.keyint, quality=dict(args.quality), short_side=args.short_side)
    tasks = [(p, os.path.join(out, os.path.relpath(p, root)), settings) for p in sorted(paths - skipped.keys())]
    start, sizes, errors = time.time(), [], []
    with Pool(max(1, args.workers)) as pool:
        for before, after, error in tqdm(pool.imap_unordered(_prepare_one, tasks), total=len(tasks),
                                         desc="preparing", unit="video", smoothing=0.05):
            (errors.append(error) if error else sizes.append((before, after)))
    before, after = (sum(s) for s in zip(*sizes)) if sizes else (0, 0)
    others = []  # os.walk follows no link to a folder; a link to a file is checked as the videos are
    for src in (os.path.join(d, n) for d, _, names in os.walk(root) for n in names):
        if src.lower().endswith(data.VIDEO_EXTENSIONS) or src in skipped:
            continue
        if why := outside(src, root):
            skipped[src] = why
        elif os.path.getsize(src) <= 2 ** 28:
            others.append(src)
    for src in others:
        dst = os.path.join(out, os.path.relpath(src, root))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src, "rb") as f, archive.replacing(dst, "wb") as g:
            shutil.copyfileobj(f, g)
    print(f"{len(sizes)} of {len(tasks)} videos in {out}, {len(errors)} unreadable and left out: {before / 1e9:.3g} "
          f"GB -> {after / 1e9:.3g} GB ({after / max(before, 1):.2f}x); {len(others)} other files copied; "
          f"{time.time() - start:.0f} s")
    for error in errors:
        print(f"  unreadable: {error}")
    for why in skipped.values():
        print(f"  {why}")
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------------------------
# Videos written to files: the synthetic set, and generated videos for the tests and bench.py

def write_video(path, images, fps=25, codec="mpeg4", gop=250, bit_rate=600_000):
    """Encode uint8 frames (T, H, W, 3), an array or any iterable of (H, W, 3) arrays, to a file with PyAV."""
    images = iter(images)
    first = next(images)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"  # FFmpeg's MJPEG encoder takes only the former
        stream.codec_context.gop_size, stream.bit_rate = gop, bit_rate
        for image in itertools.chain([first], images):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())


def write_synthetic_ucf(root, frames=8, size=32, train_per_class=64, test_per_class=16, seed=0):
    """Write SyntheticVideos' clips as MPEG-4 AVI files in UCF101's layout (class folders, ucfTrainTestlist/
    classInd.txt, trainlist01.txt, testlist01.txt), so build_dataset('ucf101', root) reads them back."""
    names = data.synthetic_classes()
    folders = ["".join(word.capitalize() for word in name.split()) for name in names]  # UCF101's CamelCase
    os.makedirs(os.path.join(root, "ucfTrainTestlist"), exist_ok=True)
    with open(os.path.join(root, "ucfTrainTestlist", "classInd.txt"), "w") as f:
        f.write("".join(f"{i + 1} {folder}\n" for i, folder in enumerate(folders)))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        dataset = data.SyntheticVideos(split, frames, size, per_class, seed)
        lines = []
        for key, label in dataset.samples:
            name = f"{folders[label]}/v_{folders[label]}_{split}{key.split('/')[2]}.avi"
            os.makedirs(os.path.join(root, "UCF-101", folders[label]), exist_ok=True)
            video = dataset.load(key)[0][0].permute(0, 2, 3, 1).numpy()  # (T, 3, H, W) -> (T, H, W, 3)
            write_video(os.path.join(root, "UCF-101", name), video, bit_rate=2_000_000)  # nearly lossless
            lines.append(f"{name} {label + 1}\n" if split == "train" else f"{name}\n")
        with open(os.path.join(root, "ucfTrainTestlist", f"{split}list01.txt"), "w") as f:
            f.writelines(lines)


def make_test_video(path, num_frames=175, width=320, height=240, fps=25, codec="mpeg4", gop=250, bit_rate=600_000,
                    texture=0.0):
    """A video for tests and benchmarks: smooth moving colour patterns under a 16-row band that encodes the frame
    index i (left half grey level 16 * (i % 16) + 8, right half 16 * (i // 16 % 16) + 8). The defaults are
    UCF101-like (320x240, 7 s, MPEG-4 in AVI); Kinetics-like is 340x256, 250 frames at 25 fps, libx264 in MP4.
    texture > 0 adds grey noise of that standard deviation, smooth over 2 to 16 pixels, panning 2 px right and
    1 px down per frame under the pattern: detail that moves, as in camera footage, and costs bits."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rows, cols, g = height + num_frames, width + 2 * num_frames, torch.Generator().manual_seed(0)
    field = np.zeros((rows, cols), np.float32)  # (height + T, width + 2T): frame i sees a window at (i, 2i)
    if texture:  # noise at 1/2 to 1/16 resolution, upsampled; coarser: stronger
        noise = sum(s * F.interpolate(torch.randn(1, 1, rows // s + 1, cols // s + 1, generator=g), scale_factor=s,
                                      mode="bicubic")[0, 0, :rows, :cols] for s in (2, 4, 8, 16))
        field = (texture / noise.std() * noise).numpy()

    def frame(i):
        image = np.stack([128 + 90 * np.sin(x / (17 + 5 * c) + y / (23 - 4 * c) + i / (6 + c)) for c in range(3)], -1)
        image[16:] += 20 * (np.sin(x[16:] * 0.7 + i) * np.cos(y[16:] * 0.5))[..., None]  # fine texture for the codec
        image[16:] += field[i:i + height - 16, 2 * i:2 * i + width, None]
        image[:16, : width // 2] = 16 * (i % 16) + 8
        image[:16, width // 2:] = 16 * (i // 16 % 16) + 8
        return image.clip(0, 255).astype(np.uint8)

    write_video(path, (frame(i) for i in range(num_frames)), fps, codec, gop, bit_rate)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    chk = commands.add_parser("check", help="scan a dataset: counts per split and every unreadable file")
    chk.add_argument("--dataset", required=True, choices=list(data.LAYOUTS), help="whose layout and lists to read")
    chk.add_argument("--root", required=True, help="the folder the dataset unpacks into (README: Data)")
    chk.add_argument("--fold", type=int, default=1, help="UCF101's or HMDB51's train/test split, 1-3 (default 1)")
    chk.add_argument("--list-file", help="for --dataset list: a file of 'relative/path label' lines")
    chk.add_argument("--labels-file", help="for --dataset list: the 'id,name' CSV of the class names")
    chk.add_argument("--workers", type=int, default=os.cpu_count(),
                     help="processes that decode in parallel (default: one per core)")
    prep = commands.add_parser("prepare", help="re-encode a dataset into a copy that decodes fast at any position",
                               description=prepare.__doc__.split(". Returns")[0] + ". Resumable: finished files are "
                               "skipped. Exit 1 if a source was unreadable (it is left out), 2 for wrong arguments.")
    prep.add_argument("--dataset", required=True, choices=list(data.LAYOUTS), help="whose layout and lists to read")
    prep.add_argument("--root", required=True, help="the dataset as it is")
    prep.add_argument("--out", required=True, help="the prepared copy (then train with --root OUT)")
    prep.add_argument("--list-file", nargs="+", help="for --dataset list: one or more list files")
    prep.add_argument("--labels-file", help="for --dataset list: the 'id,name' CSV of the class names")
    prep.add_argument("--keyint", type=int, default=8, help="a keyframe every N frames (default 8; README: the trade-off)")
    prep.add_argument("--short-side", type=int, default=256,
                      help="scale videos whose short side is longer down to this (default 256; 0 keeps every size)")
    prep.add_argument("--quality", nargs="+", default=[], type=_quality, metavar="ENCODER=N",
                      help=f"lower is better and bigger; default {' '.join(f'{k}={v}' for k, v in QUALITY.items())}")
    prep.add_argument("--workers", type=int, default=os.cpu_count(),
                      help="processes that encode in parallel (default: one per core)")
    synth = commands.add_parser("synth-ucf", help="write the synthetic dataset as UCF101-style AVI files")
    synth.add_argument("dir", help="the folder to write UCF-101/ and ucfTrainTestlist/ into")
    synth.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
    synth.add_argument("--size", type=int, default=32, help="width and height of a frame in pixels (default 32)")
    synth.add_argument("--train-per-class", type=int, default=64, help="training videos per class (default 64)")
    synth.add_argument("--test-per-class", type=int, default=16, help="test videos per class (default 16)")
    args = parser.parse_args(argv)

    if args.command == "synth-ucf":
        write_synthetic_ucf(args.dir, args.frames, args.size, args.train_per_class, args.test_per_class)
        print(f"wrote {len(data.synthetic_classes())} classes to {args.dir}")
        return 0
    return prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
