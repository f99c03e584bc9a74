"""Video data for ViFi-CLIP: PyAV decoding, the official frame sampling, clip augmentation in torch,
the datasets of the paper (UCF101, HMDB51, Kinetics-400/600, Something-Something v2, the official
list files) and a synthetic one rendered in memory, few-shot / base-to-novel / zero-shot splits, and
bad-file handling.

A sample is a dict: "video" uint8, (T, 3, H, W) when training and (V, T, 3, H, W) when testing,
V = clips x crops views (V = 1 too); "colour" float32 (2, 3, 3), the clip's colour jitter (identity
when testing); "label" and "index" ints; "failed" str (below). Clips stay uint8 until they reach the
device (4x less to copy than float), where the consumer calls
`normalize(batch["video"], mean, std, colour=batch["colour"])`, which applies the colour jitter
(see colour_matrix) and the normalization there. Everything else (sampling, crop, resize, flip)
happens in the DataLoader workers. CLIP_MEAN/CLIP_STD and IMAGENET_MEAN/IMAGENET_STD are on the 0-1
scale, as published; `normalize` rescales. The official ViFi-CLIP checkpoints were trained with
ImageNet's constants, so evaluating them needs those.

Bad files. A video that cannot be read (missing, empty, truncated, not a video, undecodable) raises
VideoError. A training set then loads the next index instead, up to `max_retries` in a row; a test
set returns a black clip with label -1, which evaluation leaves out (a replacement would count its
neighbour twice). The sample carries "index" of the video actually loaded and "failed": one line
"path: reason" per unreadable video ("" when none). DataLoader workers are separate processes, so no
counter inside the dataset would reach the trainer: the failures travel in the batches, and the
consumer counts and reports them (engine.FailureLog).

Datasets are found by file name anywhere under --root (one os.walk per root, cached), so official
layouts and flattened copies both work; see LAYOUTS. Videos listed but absent (common in Kinetics)
are skipped at construction and counted in `dataset.missing`. The paper's protocols read the
official repository's list files with the list dataset (protocols.py); splits can also be drawn from
a dataset's own lists (few_shot, base_novel_classes + subset_classes, k600_novel_subset); write_list
saves any split in the official list format. Checking a copy of a dataset, preparing one for fast
decoding and writing the synthetic set as files is tools.py's command line.
"""

import bisect
import contextlib
import copy
import csv
import functools
import io
import itertools
import json
import math
import os
import random
import warnings
import zlib
from dataclasses import dataclass

import av
from av.video.reformatter import VideoReformatter
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# by name, as models record it
NORMS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv")


# Frame sizes a video may have: below 16 pixels a side there is no picture to crop (a 1x1 frame
# scaled up to the short side 256 is one colour); over 16384 (16K video is 15360 wide) or a long
# side over 8 times the short one, the decoder's own frames or the scaled ones would take gigabytes.
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 16, 16384, 8


class VideoError(Exception):
    """One video cannot be used (missing, empty, truncated, not a video, undecodable)."""


class DatasetError(Exception):
    """The dataset or its settings are wrong: a missing annotation file, no videos under --root, too
    many bad files, test views that are not CLIPSxCROPS."""

    def __init__(self, message=""):
        # Raised in a DataLoader worker process, it reaches the main process rebuilt by torch
        # (ExceptionWrapper) with the worker's whole traceback as its message; keep the original
        # message alone, the one line users read.
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


# --------------------------------------------------------------------------------------------------
# Sampling and decoding

def sample_indices(num_frames, num_segments, train, rng=random):
    """The official frame sampling: mmaction's SampleFrames with clip_len 1 and num_clips T, as the
    official datasets/pipeline.py runs it. train=True (_get_train_clips, used for training and for
    each clip of multi-clip testing): N // T frames per segment and one random frame of each, so the
    last N mod T frames are never used and T <= N < 2T gives exactly 0..T-1; a video shorter than T
    frames takes round(i * N / T) (half to even, as np.around), wrapped modulo N as its 'loop'
    option does. train=False (_get_test_clips): the frame int(i * N / T + N / T / 2) of each
    fractional segment. Python's `random` by default: DataLoader seeds it differently in every
    worker."""
    assert num_frames >= 1
    if not train:
        length = num_frames / num_segments
        return [int(i * length + length / 2) for i in range(num_segments)]
    interval = num_frames // num_segments
    if interval > 0:
        return [i * interval + rng.randrange(interval) for i in range(num_segments)]
    return [round(i * (num_frames / num_segments)) % num_frames for i in range(num_segments)]


def describe_test_clips(clips):
    """How the test clips were drawn, for results.json."""
    if clips == 1:
        return "1 clip: the centre frame of each of T equal segments (official _get_test_clips)"
    return (f"{clips} clips, each drawn as a training clip as the official multiview does, seeded "
            "by the video's index: the same clips in every evaluation (the official ones change "
            "from run to run)")


@contextlib.contextmanager
def _video_errors(path, what):
    """PyAV's and the OS's errors as VideoError naming the file."""
    try:
        yield
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoError(f"{path}: {what} ({error})") from None


class VideoReader:
    """An open video whose first video stream is demuxed into memory at once (compressed: a few MB
    for a dataset clip), then decoded only as far as `read` needs.

    Demuxing costs ~1% of decoding and gives what the headers may not: the exact frame count (WebM
    stores none), each frame's index as the rank of its timestamp (B-frames arrive out of order),
    and where the keyframes are, so `read` skips to the keyframe before a wanted frame when one lies
    ahead of the decoder. Threading: one decoder thread. Frame threading can hang when decoding
    stops before the end with torch loaded, and the DataLoader workers already use every core.
    """

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            problem = "is a folder, not a video file" if os.path.isdir(path) else "no such file"
            raise VideoError(f"{path}: {problem}")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{path}: empty file (0 bytes)")
        self.container = None
        try:
            with _video_errors(path, "not a readable video"):
                self.container = av.open(path, metadata_errors="ignore")
                self._index()
        except VideoError:
            self.close()
            raise

    def _index(self):
        if not self.container.streams.video:
            raise VideoError(f"{self.path}: no video stream")
        self.stream = self.container.streams.video[0]
        # never FRAME (see above); with one thread: none
        self.stream.codec_context.thread_type = "SLICE"
        self.stream.codec_context.thread_count = 1
        # one converter for all frames: frame.to_ndarray() builds one per frame
        self.to_rgb = VideoReformatter()
        # the last, empty one only flushes
        self.packets = [p for p in self.container.demux(self.stream) if p.size]
        if not self.packets:
            raise VideoError(f"{self.path}: no video frames")
        stamps = [p.pts for p in self.packets]
        timed = None not in stamps and len(set(stamps)) == len(stamps)
        self._check_complete(stamps if timed else None)
        if not timed:  # no usable timestamps: count frames from the start
            self.rank, self.keyframes = {}, [(0, 0)]
        else:
            self.rank = {pts: i for i, pts in enumerate(sorted(stamps))}
            self.keyframes = sorted([(0, 0)] + [(self.rank[packet.pts], pos)
                                                for pos, packet in enumerate(self.packets)
                                                if packet.is_keyframe and pos > 0])

    def _check_complete(self, stamps):
        """Refuse a file cut short (a broken download): its frames must span 90 % of the time the
        header declares (headers a little off are common; half a file is not). Time, not a frame
        count, since the headers are only hints: a variable-rate video's count from duration x
        average rate can be 100 times the frames it holds."""
        # without timestamps: counts
        declared, covered, unit = self.stream.frames, len(self.packets), "frames"
        duration = (self.stream.duration * self.stream.time_base if self.stream.duration else
                    self.container.duration / av.time_base if self.container.duration else None)
        # n frames span n intervals of their mean length
        if stamps and len(stamps) > 1 and duration:
            declared, unit = float(duration), "s"
            span = float((max(stamps) - min(stamps)) * self.stream.time_base)
            covered = span * len(stamps) / (len(stamps) - 1)
        if covered < 0.9 * declared:
            raise VideoError(f"{self.path}: truncated: the header declares {declared:.4g} {unit}, "
                             f"the frames in the file cover {covered:.4g} {unit}")

    def __len__(self):
        return len(self.packets)

    def _decode(self, keyframe, want=None):
        """Yield (frame index, frame) from a (frame index, packet position) keyframe on. With `want`
        (a set of indices), frames that no other frame refers to (MPEG-4's B-frames, some of
        H.264's) are dropped unread unless wanted."""
        codec = self.stream.codec_context
        codec.flush_buffers()  # forget the frames of an earlier position
        codec.skip_frame = "DEFAULT"
        index = keyframe[0] - 1
        # None drains the decoder
        for packet in itertools.chain(self.packets[keyframe[1]:], [None]):
            if want is not None and self.rank and packet is not None:
                codec.skip_frame = "DEFAULT" if self.rank[packet.pts] in want else "NONREF"
            for frame in codec.decode(packet):
                index = self.rank.get(frame.pts, index + 1)
                yield index, frame

    def read(self, indices, short_side=None):
        """Frames at `indices` (any order, repeats allowed) -> uint8 (len(indices), 3, H, W). With
        `short_side`, each frame is scaled while it is decoded so that its short side has that
        length, the official pipeline's first step (see _rgb); else it keeps its size. Only the
        wanted frames are converted to RGB; a wanted frame that never decodes (a dropped frame, a
        short tail) is replaced by the next one that does, or at the end by the last one."""
        want = set(indices)
        got = {}
        starts = [k[0] for k in self.keyframes]
        # the running decoder, the index of its last frame, the output size
        decoder, at, size = None, -1, None
        with _video_errors(self.path, "cannot decode"):
            for target in sorted(want):
                if target in got:
                    continue
                keyframe = self.keyframes[bisect.bisect_right(starts, target) - 1]
                if decoder is None or keyframe[0] > at + 1:
                    decoder = self._decode(keyframe, want)
                for at, frame in decoder:
                    # (frames before a keyframe may come out broken)
                    fresh = at in want and at not in got
                    if fresh or at >= target:
                        # every frame at the first one's size: a stream may change its size midway
                        size = size or self._output_size(frame, short_side)
                        image = self._rgb(frame, size)
                        if fresh:
                            got[at] = image
                        if at >= target:
                            got.setdefault(target, image)
                            break
        if not got:
            raise VideoError(f"{self.path}: no frame could be decoded")
        decoded = sorted(got)
        for i in want - set(got):
            got[i] = got[decoded[max(bisect.bisect_right(decoded, i) - 1, 0)]]
        video = torch.stack([got[i] for i in indices])
        # (T, H, W, 3) -> (T, 3, H, W), a view: memory stays channels-last
        return video.permute(0, 3, 1, 2)

    def _output_size(self, frame, short_side):
        """(height, width) of the frames read returns: the frame's own, or its short side scaled to
        `short_side` and the other rounded as mmaction's Resize(scale=(-1, S)) rounds it,
        int(side * S / short + 0.5)."""
        height, width = frame.height, frame.width
        if short_side is None:
            return height, width
        scale = short_side / min(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def _rgb(self, frame, size):
        """A decoded frame -> uint8 (height, width, 3) at `size`. The official pipeline scales with
        OpenCV's bilinear filter without antialiasing (cv2.INTER_LINEAR); torch's
        interpolate(antialias=False) computes the same, within one level. A frame over 4 times the
        output size is first reduced to 4 times it by FFmpeg's area filter, in the conversion to
        RGB: memory then follows the size asked for, not the source's (docs/protocols.md:
        deliberate differences)."""
        h, w = frame.height, frame.width
        short, long = min(h, w), max(h, w)
        if not (MIN_SIDE <= short and long <= MAX_SIDE and long <= MAX_ASPECT * short):
            raise VideoError(f"{self.path}: frames of {w}x{h} pixels; expected {MIN_SIDE} to "
                             f"{MAX_SIDE} pixels a side, the long side at most {MAX_ASPECT} times "
                             f"the short one: re-encode it to a usual size (e.g. its short side to "
                             f"256)")
        if short > 4 * min(size):
            height, width, how = 4 * size[0], 4 * size[1], "AREA"
        else:
            height, width, how = h, w, None
        rgb = self.to_rgb.reformat(frame, width, height, "rgb24", interpolation=how)
        image = torch.from_numpy(rgb.to_ndarray())
        if tuple(image.shape[:2]) != size:
            # (H, W, 3) -> (1, 3, H, W) and back
            image = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bilinear",
                                  antialias=False, align_corners=False)[0].permute(1, 2, 0)
        return image

    def close(self):
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_frames(path, indices, short_side=None):
    """Open, read the frames at `indices` -> uint8 (T, 3, H, W), close."""
    with VideoReader(path) as video:
        return video.read(indices, short_side)


# --------------------------------------------------------------------------------------------------
# Augmentation: every view is a box of the frames as read (short side already scaled, see
# VideoDataset.load), resized to (size, size), maybe flipped, and a colour matrix for the device,
# with the same parameters for every frame.

@dataclass
class View:
    box: tuple  # (top, left, height, width) in pixels of the frames as read
    flip: bool = False
    jitter: tuple = ()  # ((operation, factor), ...) in the order applied
    gray: bool = False


CROP_SCALES = (1, 0.875, 0.75, 0.66)


def train_view(height, width, rng=random):
    """The official training augmentation (mmaction's MultiScaleCrop, then the rest), on frames
    whose short side is already 256/224 of the input size (VideoDataset.load): a crop of the short
    side times two scales of CROP_SCALES at most one step apart (width and height), at a corner or
    the centre, placed in steps of a quarter of the room left, as the official code rounds them;
    resized later to the input size without keeping the aspect ratio; flip p=0.5; colour jitter
    p=0.8 with brightness .4, contrast .4, saturation .2, hue .1 in a random order; grayscale p=0.2.
    (The official code also rounds a crop within 3 pixels of the input size to it: never the case at
    224 or 336.)"""
    side = min(height, width)
    pairs = [(a, b) for i, a in enumerate(CROP_SCALES) for j, b in enumerate(CROP_SCALES)
             if abs(i - j) <= 1]
    scale_h, scale_w = rng.choice(pairs)
    crop_h, crop_w = int(side * scale_h), int(side * scale_w)
    top, left = rng.choice([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)])  # in quarters of the room left
    box = (top * ((height - crop_h) // 4), left * ((width - crop_w) // 4), crop_h, crop_w)
    jitter = ()
    if rng.random() < 0.8:
        jitter = [("brightness", rng.uniform(0.6, 1.4)), ("contrast", rng.uniform(0.6, 1.4)),
                  ("saturation", rng.uniform(0.8, 1.2)), ("hue", rng.uniform(-0.1, 0.1))]
        rng.shuffle(jitter)
    return View(box, flip=rng.random() < 0.5, jitter=tuple(jitter), gray=rng.random() < 0.2)


def parse_views(text):
    """'4x3' -> (4, 3): CLIPS clips in time x CROPS crops (1 or 3, what test_views makes) of each
    test video."""
    clips, _, crops = text.partition("x")
    if not (clips.isdigit() and int(clips) > 0 and crops in ("1", "3")):
        raise DatasetError(f"--views {text!r}: expected CLIPSxCROPS with CROPS 1 or 3, "
                           "e.g. 1x1 or 4x3")
    return int(clips), int(crops)


def test_views(height, width, size, crops=1):
    """The official test crops of `size` pixels, on frames as VideoDataset.load reads them: one
    centre crop of frames whose short side is 256/224 of `size`, or three square crops along the
    long side (start, centre, end) of frames whose short side is `size`. Offsets round down, as the
    official code's."""
    if crops == 1:
        return [View(((height - size) // 2, (width - size) // 2, size, size))]
    assert crops == 3, "crops must be 1 or 3"
    side = min(height, width)
    step_h, step_w = (height - side) // 2, (width - side) // 2
    return [View((k * step_h, k * step_w, side, side)) for k in (0, 1, 2)]


LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def colour_matrix(view):
    """The view's colour jitter and grayscale as one affine map of RGB pixels, x -> A x + B m, where
    m is the clip's mean colour; returned as float32 (2, 3, 3) [A, B], applied by normalize() on the
    device.

    Brightness, saturation, hue and grayscale are linear per pixel; contrast blends with the grey
    level of the mean of the image so far, which is linear in m. So the chain is one 3x3 matmul,
    done where it is cheap: on a CPU it would cost as much as decoding. Unlike torchvision, values
    are clamped once at the end, not after each step, and hue turns colours about the grey axis (a
    rotation of YIQ's chroma plane by hue x 360 degrees) instead of shifting HSV hue."""
    a, b = torch.eye(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    grey = torch.outer(torch.ones(3, dtype=torch.float64), LUMA)  # every channel <- luma
    for operation, factor in view.jitter:
        if operation == "brightness":
            m = factor * torch.eye(3, dtype=torch.float64)
        elif operation == "saturation":
            m = factor * torch.eye(3, dtype=torch.float64) + (1 - factor) * grey
        elif operation == "hue":
            c, s = math.cos(2 * math.pi * factor), math.sin(2 * math.pi * factor)
            turn = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
            m = YIQ_TO_RGB @ turn @ RGB_TO_YIQ
        else:
            # contrast: x -> f x + (1 - f) * grey level of the mean so far, LUMA . (A + B) m, in
            # every channel
            a, b = factor * a, factor * b + (1 - factor) * grey @ (a + b)
            continue
        a, b = m @ a, m @ b
    if view.gray:
        a, b = grey @ a, grey @ b
    return torch.stack([a, b]).float()


def render(video, view, size):
    """uint8 (T, 3, H, W) -> uint8 (T, 3, size, size): the view's box, resized, flipped. Memory
    stays channels-last (free here, and any layout is fine on the device)."""
    top, left, height, width = view.box
    # OpenCV's bilinear filter without antialiasing, as the official code's (VideoReader._rgb);
    # uint8 in and out: torch's fast path on CPU
    out = F.interpolate(video[:, :, top:top + height, left:left + width], size=(size, size),
                        mode="bilinear", antialias=False, align_corners=False)
    return out.flip(-1) if view.flip else out


def normalize(video, mean=CLIP_MEAN, std=CLIP_STD, colour=None):
    """uint8 (..., 3, H, W) -> float32 (..., 3, H, W), (x / 255 - mean) / std, on the device `video`
    is on. For training batches pass colour=batch["colour"] (B, 2, 3, 3) with video (B, T, 3, H, W):
    first each clip becomes clamp(A x + B m, 0, 255), m its mean colour (see colour_matrix)."""
    x = video.float()
    if colour is not None:
        colour = colour.to(x.device, torch.float32)
        m = x.mean(dim=(1, 3, 4))  # (B, T, 3, H, W) -> (B, 3)
        shift = torch.einsum("bij,bj->bi", colour[:, 1], m)
        x = torch.einsum("bij,btjhw->btihw", colour[:, 0], x) + shift[:, None, :, None, None]
        x = x.clamp_(0, 255)
    mean = torch.tensor(mean, device=x.device).view(3, 1, 1) * 255
    std = torch.tensor(std, device=x.device).view(3, 1, 1) * 255
    return (x - mean) / std


NO_COLOUR = torch.stack([torch.eye(3), torch.zeros(3, 3)])  # colour_matrix of a view without jitter


# --------------------------------------------------------------------------------------------------
# Datasets

class VideoDataset(Dataset):
    """Videos as a list of (path, label), with readable `classnames`. Training: one clip
    (sample_indices), augmented, (T, 3, H, W); testing: `clips` clips x `crops` crops, V views
    stacked as (V, T, 3, H, W), V = 1 included."""

    def __init__(self, samples, classnames, frames=8, size=224, train=False, clips=1, crops=1,
                 root=None, missing=(), max_retries=10):
        self.samples, self.classnames = list(samples), list(classnames)
        self.frames, self.size, self.train = frames, size, train
        self.clips, self.crops = clips, crops
        self.root, self.missing, self.max_retries = root, list(missing), max_retries

    def __len__(self):
        return len(self.samples)

    def load(self, path, rng=random):
        """One video -> (uint8 views (V, T, 3, size, size), colour (2, 3, 3) for normalize());
        random choices (training frames and view) from `rng`."""
        clips = 1 if self.train else self.clips
        # the official first step, mmaction's Resize(scale=(-1, S)): the short side to S = 256/224
        # of the input size (256 for 224), or to the input size itself for three test crops
        short_side = self.size if not self.train and self.crops == 3 else int(self.size * 256 / 224)
        with VideoReader(path) as reader:
            # several test clips: the official code draws each as a training clip (SampleFrames'
            # multiview)
            picks = [sample_indices(len(reader), self.frames, self.train or clips > 1, rng)
                     for _ in range(clips)]
            decoded = reader.read([i for pick in picks for i in pick], short_side)
        videos = decoded.unflatten(0, (clips, self.frames))  # (N*T, 3, H, W) -> (N, T, 3, H, W)
        height, width = videos.shape[-2:]
        if self.train:
            view = train_view(height, width, rng)
            return render(videos[0], view, self.size)[None], colour_matrix(view)
        views = test_views(height, width, self.size, self.crops)
        rendered = [render(video, view, self.size) for video in videos for view in views]
        return torch.stack(rendered), NO_COLOUR

    def __getitem__(self, key):
        """key: an index, or (index, draw): then the sample's random choices come from
        random.Random(draw) alone (testing: from the index, so multi-clip testing draws the same
        clips in every evaluation), the same in whichever worker process loads it
        (engine.EpochSampler passes 'seed/epoch/index', so a resumed run draws what the
        uninterrupted one drew). An unreadable video is replaced by the next one when training; when
        testing it comes back as a black clip with label -1, to be left out of the counts (module
        docstring)."""
        index, draw = key if isinstance(key, tuple) else (key, None)
        # the random clips of multi-clip testing: the same in every evaluation
        if draw is None and not self.train:
            draw = f"test/{index}"
        rng = random if draw is None else random.Random(draw)
        failed = []
        for _ in range(self.max_retries + 1):
            path, label = self.samples[index]
            try:
                video, colour = self.load(path, rng)
                break
            except VideoError as error:
                failed.append(str(error).replace("\n", " "))
                if not self.train:
                    views = self.clips * self.crops
                    video = torch.zeros(views, self.frames, 3, self.size, self.size,
                                        dtype=torch.uint8)
                    colour, label = NO_COLOUR, -1
                    break
                index = (index + 1) % len(self.samples)
        else:
            raise DatasetError(f"{len(failed)} videos in a row could not be read, for example "
                               f"{failed[0]}. Is --root {self.root} the dataset's folder?")
        # training: the one view, (1, T, 3, H, W) -> (T, 3, H, W)
        video = video[0] if self.train else video
        return {"video": video, "colour": colour, "label": label, "index": index,
                "failed": "\n".join(failed)}

    def subset(self, samples, classnames=None):
        """The same settings over other samples (and class names)."""
        new = copy.copy(self)
        new.samples, new.classnames = list(samples), list(classnames or self.classnames)
        return new


KINETICS_LAYOUT = ("ROOT/{train,val}/[<label>/]<youtube_id>_<start:06d>_<end:06d>.mp4 with "
                   "train.csv and val.csv (or validate.csv) in ROOT or ROOT/annotations")
LAYOUTS = {
    "ucf101": "ROOT/UCF-101/<Class>/v_*.avi beside "
              "ROOT/ucfTrainTestlist/{classInd,trainlist0F,testlist0F}.txt",
    "hmdb51": "ROOT/<class>/*.avi (or ROOT/hmdb51_org/<class>/*.avi) beside "
              "ROOT/testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt",
    "k400": KINETICS_LAYOUT,
    "k600": KINETICS_LAYOUT,
    "ssv2": "ROOT/20bn-something-something-v2/<id>.webm with labels.json, train.json and "
            "validation.json in ROOT or ROOT/labels",
    "list": "list_file of lines 'relative/path label', labels_file a CSV 'id,name', the videos "
            "under ROOT",
}


# Where each dataset is published, for the message a missing copy gets.
KINETICS_HOME = ("the Kinetics download tools, e.g. "
                 "https://github.com/cvdfoundation/kinetics-dataset")
HOMES = {"ucf101": "https://www.crcv.ucf.edu/data/UCF101.php",
         "hmdb51": "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/",
         "k400": KINETICS_HOME,
         "k600": KINETICS_HOME,
         "ssv2": "https://www.qualcomm.com/developer/software/something-something-v-2-dataset",
         "list": "your own videos"}


def check_root(name, root):
    """A dataset's folder exists and holds videos: checked first, so a missing copy costs no
    download. The error says where it looked, the layout expected, where the dataset is published
    and how to check a copy."""
    if root and os.path.isdir(root) and _video_files(root):
        return
    found = "holds no video files" if root and os.path.isdir(root) else "is not a folder"
    raise DatasetError(f"{name}: {root!r} {found}. Expected {LAYOUTS[name]}; the paper's protocols "
                       f"need only the videos under it, found by file name. {name} is published at "
                       f"{HOMES[name]}. Put it there (or pass --root DIR, or set VIFI_DATA to the "
                       f"folder holding <dataset>/), then verify it with "
                       f"`python tools.py check --dataset {name} --root {root}`")


def _annotation(root, candidates):
    for name in candidates:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DatasetError(f"{os.path.join(root, candidates[0])} not found (looked for "
                       f"{', '.join(candidates)} in {root})")


def _text(path):
    """A list, label or annotation file's text, which must be UTF-8 (a byte-order mark is
    skipped)."""
    if os.path.isdir(path):
        raise DatasetError(f"{path} is a folder; expected a text file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        byte = error.object[error.start]
        raise DatasetError(f"{path} line {line}: not UTF-8 (byte 0x{byte:02x}); expected UTF-8 "
                           f"text: convert it, e.g. `iconv -f <its encoding> -t utf-8`") from None


def _lines(path):
    return [line.strip() for line in _text(path).splitlines() if line.strip()]


def _number(text):
    """A non-negative integer in ASCII digits, else None: str.isdigit() also takes '²', which int()
    refuses, and int() takes '٣', ' 3' and '1_0', none of which a list file means as a label."""
    return int(text) if text.isascii() and text.isdigit() else None


@functools.lru_cache(maxsize=16)
def _video_files(root):
    """Every video under root by file name and by name without extension (one walk per root,
    cached)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.setdefault(name, os.path.join(folder, name))
                found.setdefault(os.path.splitext(name)[0], os.path.join(folder, name))
    return found


def _ucf101(root, train, fold):
    classind = _annotation(root, ["ucfTrainTestlist/classInd.txt", "classInd.txt"])
    folder = os.path.dirname(classind)
    classes = [line.split(maxsplit=1)[1] for line in _lines(classind)]
    label_of = {name.lower(): i for i, name in enumerate(classes)}
    listed = _annotation(folder, [f"{'trainlist' if train else 'testlist'}{fold:02d}.txt"])
    # testlist lines carry no label: the class folder gives it (matched without case:
    # HandstandPushups); file names may hold spaces, so only a trailing label is split off
    paths = [line.rsplit(maxsplit=1)[0] if train else line for line in _lines(listed)]
    entries = [(path, label_of[path.split("/")[0].lower()]) for path in paths]
    return entries, classes


def _hmdb51(root, train, fold):
    split_file = f"testTrainMulti_7030_splits/brush_hair_test_split{fold}.txt"
    folder = os.path.dirname(_annotation(root, [split_file]))
    suffix = f"_test_split{fold}.txt"
    classes = sorted(name[:-len(suffix)] for name in os.listdir(folder) if name.endswith(suffix))
    wanted = "1" if train else "2"  # 1 train, 2 test, 0 unused
    entries = [(path, label) for label, name in enumerate(classes)
               for path, use in (line.rsplit(maxsplit=1)
                                 for line in _lines(os.path.join(folder, name + suffix)))
               if use == wanted]  # 'file name with spaces.avi 1
    return entries, classes


def _kinetics(root, train, fold):
    def rows(names):
        places = [place for name in names for place in (name, "annotations/" + name)]
        path = _annotation(root, places)
        return list(csv.DictReader(io.StringIO(_text(path))))
    train_rows = rows(["train.csv"])
    # the official ids are the alphabetical order
    classes = sorted({row["label"] for row in train_rows})
    label_of = {name: i for i, name in enumerate(classes)}
    listed = train_rows if train else rows(["val.csv", "validate.csv"])
    entries = [(f"{row['youtube_id']}_{int(float(row['time_start'])):06d}"
                f"_{int(float(row['time_end'])):06d}", label_of[row["label"]]) for row in listed]
    return entries, classes


def _ssv2(root, train, fold):
    def load(name):
        return json.loads(_text(_annotation(root, [name, "labels/" + name])))
    label_of = {template: int(i) for template, i in load("labels.json").items()}
    classes = sorted(label_of, key=label_of.get)
    items = load("train.json" if train else "validation.json")
    entries = [(item["id"] + ".webm", label_of[item["template"].replace("[", "").replace("]", "")])
               for item in items]
    return entries, classes


def read_labels(path, plain=False):
    """An 'id,name' CSV (the official label files, or train.py's own) -> class names in id order,
    verbatim. With plain=True, a file that does not start with that header is one class name per
    line."""
    text = _text(path)
    reader = csv.reader(io.StringIO(text))
    # line_num: the row's last line (a quoted name may span two)
    rows = [(reader.line_num, row) for row in reader]
    header = bool(rows) and [cell.strip() for cell in rows[0][1]] == ["id", "name"]
    if plain and not header:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not header:
        first = rows[0][1] if rows else "nothing"
        raise DatasetError(f"{path}: expected a CSV whose first line is 'id,name', found {first}")
    named, lines = {}, {}
    for number, row in rows[1:]:
        if not row:
            continue
        key = _number(row[0].strip())
        if len(row) != 2 or key is None:
            raise DatasetError(f"{path} line {number}: expected 'id,name' with an integer id (a "
                               f"name holding a comma in double quotes), found {','.join(row)!r}")
        if key in named:
            raise DatasetError(f"{path} line {number}: id {key} again (line {lines[key]} gave it); "
                               "each id once")
        named[key], lines[key] = row[1], number
    if sorted(named) != list(range(len(named))):
        raise DatasetError(f"{path}: ids must run 0..{len(named) - 1} without gaps")
    return [named[i] for i in range(len(named))]


def _list(list_file, labels_file):
    for path in (list_file, labels_file):
        if not path or not os.path.isfile(path):
            found = ("none was given" if not path else
                     f"{path!r} is a folder" if os.path.isdir(path) else f"{path!r}: no such file")
            raise DatasetError(f"a list of videos needs a list file and an 'id,name' labels file "
                               f"(train.py and tools.py check: --train-list, --test-list, "
                               f"--labels; tools.py prepare: --list-file, --labels-file); {found}")
    classes = read_labels(labels_file)
    entries = []
    for number, line in enumerate(_lines(list_file), 1):
        # the label is the last field: paths may hold spaces
        path, label = (line.rsplit(maxsplit=1) + [""])[:2]
        if _number(label) is None or _number(label) >= len(classes):
            raise DatasetError(f"{list_file} line {number}: expected 'relative/path label' with a "
                               f"label in 0..{len(classes) - 1} of {labels_file}, found {line!r}")
        entries.append((path, _number(label)))
    return entries, classes


def build_dataset(name, root=None, split="train", fold=1, frames=8, size=224, train=None, clips=1,
                  crops=1, list_file=None, labels_file=None, seed=0):
    """A VideoDataset: name is one of LAYOUTS or 'synthetic' (no root; `seed` picks its clips);
    split 'train' or 'test' (the validation set of Kinetics and SSv2); fold 1-3 for UCF101 and
    HMDB51; train: sample randomly and augment (default: split == 'train'); clips x crops test
    views."""
    train = split == "train" if train is None else train
    if name == "synthetic":
        return SyntheticVideos(split, frames, size, seed=seed, clips=clips, crops=crops,
                               train=train)
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join([*LAYOUTS, 'synthetic'])}")
    parsers = {"ucf101": _ucf101, "hmdb51": _hmdb51, "k400": _kinetics, "k600": _kinetics,
               "ssv2": _ssv2, "list": lambda root, train, fold: _list(list_file, labels_file)}
    try:
        if not root or not os.path.isdir(root):
            raise DatasetError(f"--root {root!r} is not a folder")
        entries, classes = parsers[name](root, split == "train", fold)
        files = _video_files(root)
        samples, missing = [], []
        for entry, label in entries:
            base = os.path.basename(entry)
            path = files.get(base) or files.get(os.path.splitext(base)[0])
            (samples.append((path, label)) if path else missing.append(entry))
        if not samples:
            example = entries[0][0] if entries else "any"
            raise DatasetError(f"none of the {len(entries)} {split} videos listed were found under "
                               f"{root} (looked for {example})")
    except DatasetError as error:
        raise DatasetError(f"{name}: {error}. Expected layout: {LAYOUTS[name]}") from None
    if missing:
        warnings.warn(f"{name} {split}: {len(missing)} of {len(entries)} listed videos are missing "
                      f"under {root} and skipped (first: {missing[0]})")
    return VideoDataset(samples, classes, frames, size, train, clips, crops, root, missing)


# --------------------------------------------------------------------------------------------------
# Splits drawn from a dataset's own lists (--splits native): not the paper's, but seeded and written
# out

def few_shot(dataset, shots, seed):
    """`shots` videos per class (all of a class that has fewer), drawn with `seed`, in the list's
    order."""
    rng = random.Random(seed)
    by_class = {}
    for position, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(position)
    keep = sorted(position for positions in by_class.values()
                  for position in rng.sample(positions, min(shots, len(positions))))
    return dataset.subset([dataset.samples[position] for position in keep])


def base_novel_classes(train_dataset):
    """(base, novel) class ids: base is the half (rounded up) of the classes with the most training
    videos, ties broken by class id, as in the paper's base-to-novel protocol."""
    counts = [0] * len(train_dataset.classnames)
    for _, label in train_dataset.samples:
        counts[label] += 1
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    half = (len(counts) + 1) // 2
    return sorted(order[:half]), sorted(order[half:])


def subset_classes(dataset, class_ids):
    """Only the videos of `class_ids`, relabelled 0..len-1 in that order."""
    new_label = {c: i for i, c in enumerate(class_ids)}
    samples = [(path, new_label[label]) for path, label in dataset.samples if label in new_label]
    return dataset.subset(samples, [dataset.classnames[c] for c in class_ids])


def k600_novel_subset(k600_dataset, k400_classnames, seed, size=160):
    """Zero-shot on Kinetics-600: `size` classes drawn with `seed` (1, 2, 3 in the paper) among
    those whose name is not a Kinetics-400 class."""
    known = {name.lower() for name in k400_classnames}
    novel = [c for c, name in enumerate(k600_dataset.classnames) if name.lower() not in known]
    drawn = random.Random(seed).sample(novel, min(size, len(novel)))
    return subset_classes(k600_dataset, sorted(drawn))


def write_list(dataset, list_file, labels_file=None):
    """Write the samples in the official list format ('path label', relative to the root) so that a
    run's split can be reused with build_dataset('list', ...); with labels_file, also the 'id,name'
    CSV. Each is written whole through archive.replacing (imported here: the rest of data.py needs
    nothing of the project)."""
    import archive
    with archive.replacing(list_file) as f:
        for path, label in dataset.samples:
            f.write(f"{os.path.relpath(path, dataset.root) if dataset.root else path} {label}\n")
    # csv quotes a name with a comma, as the official files do (SSv2 has such names)
    if labels_file:
        with archive.replacing(labels_file) as f:
            rows = [("id", "name"), *enumerate(dataset.classnames)]
            csv.writer(f, lineterminator="\n").writerows(rows)


# --------------------------------------------------------------------------------------------------
# The synthetic dataset

SYNTH_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235)}
SYNTH_SHAPES = ("square", "circle", "triangle")
SYNTH_MOTIONS = ("moving up", "moving down")


def synthetic_classes():
    """Class names 'colour shape motion'. Base classes first (ids 0-8): each colour-shape pair with
    one motion; then novel ones (9-17): the same pairs with the other motion, so every word of a
    novel class was seen in training. Equal counts per class make base_novel_classes() pick exactly
    the base ids."""
    combos = [(c, s, m) for c in range(len(SYNTH_COLOURS)) for s in range(len(SYNTH_SHAPES))
              for m in range(len(SYNTH_MOTIONS))]
    combos.sort(key=lambda x: (x[2] != (x[0] + x[1]) % len(SYNTH_MOTIONS), x))
    return [f"{list(SYNTH_COLOURS)[c]} {SYNTH_SHAPES[s]} {SYNTH_MOTIONS[m]}" for c, s, m in combos]


def render_synthetic(classname, key, frames, size):
    """One clip of `classname`, uint8 (T, 3, size, size), fully determined by the string `key`. A
    shape of the class's colour moves up or down over a noisy grey background, with a thin fading
    tail behind it: ViFi-CLIP averages frame embeddings, which loses frame order, so the direction
    must show in every single frame, as motion blur does in real video."""
    colour_name, shape, motion = classname.split(" ", 2)
    seed = zlib.crc32(key.encode())  # not hash(): that changes between processes
    rng = random.Random(seed)
    radius = rng.uniform(0.2, 0.26) * size
    step = rng.uniform(0.03, 0.05) * size * 8 / frames * (-1 if motion == "moving up" else 1)
    travel = abs(step) * (frames - 1)
    x = rng.uniform(radius, size - radius)
    y = rng.uniform(radius, size - radius - travel) + (travel if step < 0 else 0)
    colour = torch.tensor(SYNTH_COLOURS[colour_name], dtype=torch.float32) + torch.tensor(
        [rng.uniform(-20, 20) for _ in range(3)])
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, size, 1) - (y + step * torch.arange(frames)).view(frames, 1, 1)  # (T, S, 1)
    dx = (grid - x).view(1, 1, size)  # (1, 1, S)
    if shape == "square":
        body = (dy.abs() <= 0.8 * radius) & (dx.abs() <= 0.8 * radius)
    elif shape == "circle":
        body = dy ** 2 + dx ** 2 <= radius ** 2
    else:  # triangle, apex up
        body = (dy <= radius) & (dx.abs() <= (dy + radius) / 2)
    behind = -dy * math.copysign(1, step)  # distance behind the centre along the motion
    tail = (((behind > 0) & (dx.abs() <= 0.4 * radius))
            * (0.8 - 0.8 * behind / (2.5 * radius)).clamp(min=0))
    noise = torch.Generator().manual_seed(seed)
    video = rng.uniform(20, 80) + 30 * torch.rand(frames, 3, size, size, generator=noise)
    for alpha in (tail, body.float()):  # a thin fading tail, under the shape
        alpha = alpha.unsqueeze(1)  # (T, S, S) -> (T, 1, S, S)
        video = video * (1 - alpha) + colour.view(1, 3, 1, 1) * alpha
    return (video + 0.5).clamp_(0, 255).to(torch.uint8)  # +0.5 and truncation: rounding


class SyntheticVideos(VideoDataset):
    """Rendered on the fly, no files: `per_class` clips of each of synthetic_classes() per split.
    Samples are (key, label) with key 'split/class id/number', so few_shot() and subset_classes()
    apply as to real data. Clips are returned as rendered (no augmentation: a flip would not change
    the class, but colour jitter would); test views repeat the clip."""

    def __init__(self, split="train", frames=8, size=32, per_class=None, seed=0, clips=1, crops=1,
                 train=None):
        per_class = per_class or (64 if split == "train" else 16)
        names = synthetic_classes()
        samples = [(f"{split}/{c:02d}/{i:03d}", c) for c in range(len(names))
                   for i in range(per_class)]
        train = split == "train" if train is None else train
        super().__init__(samples, names, frames, size, train, clips, crops)
        self.seed, self.names = seed, names  # names by original id: subset_classes() relabels

    def load(self, key, rng=None):
        classname = self.names[int(key.split("/")[1])]
        video = render_synthetic(classname, f"{self.seed}/{key}", self.frames, self.size)
        views = 1 if self.train else self.clips * self.crops
        return video[None].expand(views, *video.shape), NO_COLOUR


# a library: the dataset commands (check, prepare, synth-ucf) are tools.py's
if __name__ == "__main__":
    import shlex
    import sys
    print(f"error: data.py has no commands; check, prepare and synth-ucf are in tools.py: "
          f"python tools.py {shlex.join(sys.argv[1:]) or '{check,prepare,synth-ucf} ...'}",
          file=sys.stderr)
    sys.exit(2)
