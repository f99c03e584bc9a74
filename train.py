"""
Train and evaluate ViFi-CLIP on every protocol of the paper, from one command.

    python train.py --dataset synthetic                             # offline demo: a small CLIP from scratch, CPU
    python train.py --dataset ucf101 --root DIR --shots 8           # few-shot fine-tuning (Table 4)
    python train.py --dataset hmdb51 --root DIR --base-novel --seed 1 --mode prompt --checkpoint K400.pth
    torchrun --nproc_per_node 8 train.py --dataset k400 --root DIR  # fully supervised, 8 GPUs

The protocol follows from the flags (see `protocol()`); its settings come from PRESETS and any flag overrides
them. `--batch-size` is the effective batch of one optimizer step over all processes; `--micro-batch` is what one
device holds at once, and gradients accumulate over the difference, so the paper's batch holds on any number of
GPUs. Writes `results.json`, `log.jsonl`, `last.pt`, `best.pt`, `curves.svg` and the split lists to `--out`.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import clip_model
import data
import report
import tokenizer
import vifi

DATASETS = ["synthetic", "ucf101", "hmdb51", "k400", "k600", "ssv2", "list"]
EVAL_DATASETS = ["ucf101", "hmdb51", "k600", "k400", "ssv2"]  # what --eval-datasets may name
PROTOCOLS = ["few-shot", "base-novel", "zero-shot", "supervised", "vanilla-zero-shot"]

# Paper settings per protocol (Sec. 4 and the official configs). Any flag given on the command line wins.
# eval_every: the official code evaluates after epoch e (0-based) when e % SAVE_FREQ == 0 and after the last one:
# epochs 1, 11, 21, 31, 41, 50 of a few-shot run, every epoch of a supervised one.
PRESETS = {
    "few-shot":          dict(frames=32, batch_size=64, lr=2e-6, epochs=50, eval_every=10),
    "few-shot-prompt":   dict(frames=32, batch_size=64, lr=8e-3, epochs=50, eval_every=10, n_ctx=[10], depth=[12]),
    "base-novel":        dict(frames=32, batch_size=64, lr=2e-6, epochs=11, eval_every=10, shots=16),
    "base-novel-prompt": dict(frames=32, batch_size=64, lr=4e-2, epochs=11, eval_every=10, shots=16, n_ctx=[16],
                              depth=[9]),
    "zero-shot":         dict(frames=32, batch_size=256, lr=8e-6, epochs=10, eval_every=1),
    "supervised":        dict(frames=16, batch_size=512, lr=2.2e-5, epochs=30, eval_every=1, views="4x3"),
    "vanilla-zero-shot": dict(frames=32, epochs=0),
    # The offline demo: a small CLIP from scratch with the byte-level tokenizer on rendered clips; its base
    # classes train, its novel classes (unseen combinations of seen words) are only evaluated.
    "synthetic":         dict(model="scratch", template="{}", frames=8, batch_size=32, micro_batch=32, lr=7e-4,
                              epochs=40, eval_every=5, warmup_epochs=1, label_smoothing=0.0, mixup=0.0, cutmix=0.0,
                              workers=0),
}
DEFAULTS = dict(model="ViT-B/16", frames=32, batch_size=64, micro_batch=8, lr=2e-6,
                epochs=10, eval_every=0, warmup_epochs=5, weight_decay=0.001, label_smoothing=0.1, mixup=0.8,
                cutmix=1.0, mix_switch=0.5, views="1x1", shots=0, n_ctx=[10], depth=[12],
                workers=min(8, os.cpu_count() or 1))
# Which evaluation the paper's tables report: few-shot logs the best of its evaluations ("Max accuracy"); the
# other protocols take the final model (base-to-novel evaluates novel classes with the last epoch's weights).
REPORTED = {"few-shot": "best", "base-novel": "final", "zero-shot": "final", "supervised": "final",
            "vanilla-zero-shot": "final", "synthetic": "final"}
SCRATCH = clip_model.CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, patch_size=8,
                                context_length=32, vocab_size=tokenizer.Tokenizer(byte_level=True).vocab_size,
                                text_width=128, text_layers=2)


def infer_protocol(args):
    """The protocol the flags describe, when --protocol is not given."""
    if args.dataset == "synthetic":
        return "synthetic"
    if args.mode == "zeroshot":
        return "vanilla-zero-shot"
    if args.base_novel:
        return "base-novel"
    if args.shots:
        return "few-shot"
    if args.eval_datasets or (args.eval_only and args.dataset in ("ucf101", "hmdb51", "k600")):
        return "zero-shot"
    if args.dataset == "list":
        raise vifi.ConfigError("--dataset list: say whose settings to use with --protocol "
                               f"({', '.join(PROTOCOLS)}); the lists are used as they are")
    return "supervised"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS)
    g.add_argument("--root", help="folder the dataset unpacks into (default: $VIFI_DATA/<dataset>, VIFI_DATA "
                                  "defaulting to ./data; see README for each layout)")
    g.add_argument("--protocol", choices=PROTOCOLS, help="the paper's protocol (default: from --shots, --base-novel, "
                                                         "--eval-datasets, --mode zeroshot; else supervised)")
    g.add_argument("--splits", help="'official' (the paper's list and label files, downloaded once; the default for "
                                    "ucf101, hmdb51, k400, k600, ssv2), a folder holding a copy of them (labels/, "
                                    "datasets_splits/), or 'native' (the dataset's own lists and a seeded draw)")
    g.add_argument("--fold", type=int, default=1, help="--splits native: UCF101 / HMDB51 split 1-3")
    g.add_argument("--shots", type=int, help="few-shot: videos per class (the paper's lists: 2, 4, 8, 16)")
    g.add_argument("--base-novel", action="store_true", help="base-to-novel: train on base classes, test both halves")
    g.add_argument("--seed", type=int, default=1, help="base-to-novel split 1-3, and the training seed")
    g.add_argument("--eval-datasets", help="zero-shot: comma list of ucf101,hmdb51,k600 evaluated after training")
    g.add_argument("--eval-roots", default="", help="their roots: ucf101=DIR,hmdb51=DIR,k600=DIR (default: "
                                                    "$VIFI_DATA/<dataset>)")
    g.add_argument("--train-list", help="--dataset list: 'path label' lines (e.g. the paper's split files)")
    g.add_argument("--test-list", help="--dataset list: the test list")
    g.add_argument("--labels", help="--dataset list: the 'id,name' labels CSV")
    g.add_argument("--clean-names", action="store_true", help="'ApplyEyeMakeup' -> 'apply eye makeup' in the "
                                                              "prompts (default: class names verbatim)")
    g.add_argument("--frames", type=int, help="frames per clip (T)")
    g.add_argument("--input-size", type=int, help="pixels (default: the model's own resolution)")
    g.add_argument("--views", help="test views as CLIPSxCROPS, e.g. 4x3")
    g.add_argument("--norm", choices=list(data.NORMS), help="pixel mean/std (default: a checkpoint's own, else "
                                                              "imagenet, as the official training and evaluation)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per GPU")
    g = p.add_argument_group("model")
    g.add_argument("--mode", default="finetune", choices=vifi.MODES, help="finetune: ViFi-CLIP; prompt: bridge and "
                                                                          "prompt; zeroshot: vanilla CLIP, evaluation only")
    g.add_argument("--towers", default="both", choices=vifi.TOWERS, help="finetune: which encoders train")
    g.add_argument("--model", help="CLIP name (ViT-B/16, ...), checkpoint path, or 'scratch'")
    g.add_argument("--checkpoint", help="start from (or with --eval-only, evaluate) an own or official checkpoint")
    g.add_argument("--n-ctx", type=int, nargs="+", help="prompt tokens: one value, or text and vision")
    g.add_argument("--depth", type=int, nargs="+", help="prompt depth: one value, or text and vision")
    g.add_argument("--template", help='text prompt of a class name (default, as the official code: "{}" for '
                                      'vanilla CLIP, else "a photo of a {}.")')
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="(default for every optimization flag: the protocol's preset)")
    g.add_argument("--lr", type=float, help="peak learning rate, for the effective batch")
    g.add_argument("--batch-size", type=int, help="effective batch: clips per optimizer step over all processes")
    g.add_argument("--micro-batch", type=int, help="clips per forward on one device")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.001)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0 (5 epochs)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--mix-switch", type=float, help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--eval-every", type=int, help="evaluate after epochs 1, 1 + N, 1 + 2N, ... and the last "
                                                  "(0 = after the last only)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="cuda, cpu, ... (default: the best available)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype (default: bf16 on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<protocol>)")
    g.add_argument("--resume", help="continue from DIR/last.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (or the base model) on the "
                                                            "protocol's test sets, with its frames and views")
    args = p.parse_args(argv)
    args.eval_datasets = [name for name in (args.eval_datasets or "").split(",") if name]
    args.protocol = args.protocol or infer_protocol(args)
    args.base_novel = args.protocol == "base-novel"
    preset = args.protocol + ("-prompt" if args.mode == "prompt" and args.protocol + "-prompt" in PRESETS else "")
    given = {k: v for k, v in vars(args).items() if v is not None}
    for k, v in {**DEFAULTS, **PRESETS[preset], **given}.items():
        setattr(args, k, v)
    if args.protocol == "vanilla-zero-shot" or args.mode == "zeroshot":  # vanilla CLIP: nothing trains
        args.eval_only = True
    if args.splits is None:
        args.splits = "official" if args.dataset in data.OFFICIAL_DATASETS else "native"
    if args.dataset != "synthetic":
        args.root = args.root or default_root(args.dataset)
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.protocol}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data

def official_files(args):
    """{set name: (dataset, list file, labels file)} of the official repository for this run; 'train' maps to
    None where the paper trains on a whole training set (the dataset's own list, read with the official names)."""
    p, own = args.protocol, {}
    if p in ("few-shot", "base-novel", "supervised"):
        sets = data.official_sets(args.dataset, p, args.shots, args.seed)
    elif args.eval_only:  # zero-shot evaluation (also of vanilla CLIP): the dataset's zero-shot sets
        sets = data.official_sets(args.dataset, "zero-shot")
    else:  # zero-shot training: the whole training set, evaluated on its test list
        sets = data.official_sets(args.dataset, "supervised")
    if p in ("supervised", "zero-shot") and not args.eval_only:
        own = {"train": None}
    if args.eval_only:
        sets.pop("train", None)
    files = {**own, **{name: (args.dataset, *f) for name, f in sets.items()}}
    for name in args.eval_datasets:
        files.update({k: (name, *f) for k, f in data.official_sets(name, "zero-shot").items()})
    return files


def default_root(name):
    """Where a dataset is looked for without --root / --eval-roots: $VIFI_DATA/<name>, VIFI_DATA defaulting to ./data."""
    return os.path.join(os.environ.get("VIFI_DATA", "data"), name)


def data_roots(args):
    """{dataset: folder} of the training and evaluation sets: --root, --eval-roots, else default_root."""
    given = dict(kv.split("=", 1) for kv in args.eval_roots.split(",") if kv)
    return {args.dataset: args.root, **{name: given.get(name) or default_root(name) for name in args.eval_datasets}}


def check_data(args):
    """Before any download: every dataset folder exists and holds videos."""
    if args.dataset != "synthetic":
        for name, root in data_roots(args).items():
            data.check_root(name, root)


def check_readable(sets):
    """After the lists are read: a video of each set decodes (a copy of the wrong or of empty files stops here)."""
    for name, dataset in sets.items():
        if dataset is None or isinstance(dataset, data.SyntheticVideos):
            continue
        reasons = []
        for path, _ in dataset.samples[:5]:
            try:
                data.read_frames(path, [0])
                break
            except data.VideoError as e:
                reasons.append(str(e))
        else:
            raise data.DatasetError(f"none of the first {len(reasons)} videos of the {name} set could be read, e.g. "
                                    f"{reasons[0]}; check the copy with `python data.py check`")


def datasets(args, splits_dir=None):
    """(train set or None, {name: test set}) of the protocol: the official lists (copies in `splits_dir`) read
    under each dataset's root, or the dataset's own lists (--splits native, the synthetic set, list files)."""
    views = [int(v) for v in args.views.split("x")]
    common = dict(frames=args.frames, size=args.input_size, clips=views[0], crops=views[1], seed=args.seed)
    roots = data_roots(args)
    if args.splits == "native" or args.dataset in ("synthetic", "list"):
        return native_datasets(args, roots, common)
    files = official_files(args)
    sets = {name: official_list(roots[f[0]], f, splits_dir, "train" if name == "train" else "test", common)
            for name, f in files.items() if f}
    train = sets.pop("train", None)
    if "train" in files and train is None:  # the whole training set: the dataset's own list, the official names
        train = data.relabel(data.build_dataset(args.dataset, args.root, "train", **common), sets["test"].classnames)
    return train, sets


def official_list(root, files, splits_dir, split, common):
    """One official list (and its labels) read under a dataset's root."""
    dataset, list_file, labels_file = files
    try:
        return data.build_dataset("list", root, split, list_file=os.path.join(splits_dir, list_file),
                                  labels_file=os.path.join(splits_dir, labels_file), **common)
    except data.DatasetError as e:
        raise data.DatasetError(f"{dataset}: the paper's {list_file} does not match the videos under {root}: {e}. "
                                f"The official lists name {dataset}'s own files; for other videos (such as data.py "
                                "synth-ucf output) use --splits native") from None


def native_datasets(args, roots, common):
    """The dataset's own train and test lists; base / novel halves and few-shot subsets drawn with the seed
    (not the paper's); list files as they are."""
    def build(name, split, fold=args.fold):
        lists = {"train": args.train_list, "test": args.test_list}  # only --dataset list reads these
        return data.build_dataset(name, roots.get(name), split, fold=fold, list_file=lists[split],
                                  labels_file=args.labels, **common)

    test = build(args.dataset, "test")
    train = None if args.eval_only else build(args.dataset, "train")
    tests = {"test": test}
    drawn = args.dataset != "list"
    if drawn and args.protocol in ("base-novel", "synthetic"):
        base, novel = data.base_novel_classes(train or build(args.dataset, "train"))
        train = train and data.subset_classes(train, base)
        tests = {"base": data.subset_classes(test, base), "novel": data.subset_classes(test, novel)}
    if drawn and train is not None and args.shots and args.protocol in ("few-shot", "base-novel", "synthetic"):
        train = data.few_shot(train, args.shots, args.seed)
    if drawn and args.protocol in ("few-shot", "base-novel"):
        print(f"note: --splits native: {args.protocol} videos and classes drawn with seed {args.seed}, not the "
              "paper's lists; its numbers are not comparable with the paper's", file=sys.stderr)
    for name in args.eval_datasets:
        if name == "k600":  # Kinetics-600 classes absent from Kinetics-400, three seeded subsets of 160
            k600 = build("k600", "test")
            for s in (1, 2, 3):
                tests[f"k600-subset{s}"] = data.k600_novel_subset(k600, (train or test).classnames, seed=s)
        else:
            for fold in (1, 2, 3):
                tests[f"{name}-fold{fold}"] = build(name, "test", fold=fold)
    return train, tests


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of the indices: shuffled by (seed, epoch) for training, so a resumed run sees the same
    order; in order and never padded for evaluation, so every video counts exactly once on any number of GPUs."""

    def __init__(self, n, rank, world, shuffle, seed=0):
        self.n, self.rank, self.world, self.shuffle, self.seed, self.epoch = n, rank, world, shuffle, seed, 0

    def indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        keep = max(self.n // self.world, 1) * self.world  # equal shares: every process makes the same steps
        return order.repeat(math.ceil(keep / self.n))[:keep][self.rank::self.world].tolist()

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices())
        # Each training sample draws its augmentation from its own key (data.VideoDataset.__getitem__): the same in
        # any worker process and with any number of workers, so a resumed run is exact.
        return iter((i, f"{self.seed}/{self.epoch}/{i}") for i in self.indices())

    def __len__(self):
        return len(self.indices())


class FailureLog:
    """The unreadable videos that the batches report (their "failed" field, see data.py), counted over all processes.
    The run stops once more than 5 % of the videos, and at least 10, have failed: a few bad files in a small few-shot
    set cost nothing, a wrong --root stops at once (data.py raises after 10 unreadable videos in a row)."""

    def __init__(self, num_videos, max_fraction=0.05, at_least=10):
        self.limit = max(max_fraction * num_videos, at_least - 1)
        self.num_videos, self.failures = num_videos, {}

    def update(self, failed):
        """`failed`: a batch's list of strings, or one sample's string."""
        for entry in [failed] if isinstance(failed, str) else failed:
            for line in filter(None, entry.split("\n")):
                self.failures[line] = None  # a dict keeps the first-seen order
        self.check()

    def gather(self, world):
        """Every process's failures in each process (call it on all of them at once)."""
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, list(self.failures))
            self.failures = dict.fromkeys(line for share in shares for line in share)
        self.check()
        return self

    def check(self):
        if len(self.failures) > self.limit:
            raise data.DatasetError(f"{len(self.failures)} of {self.num_videos} videos could not be read (more than "
                                    f"5 % and at least 10); is --root right? {self.report()}")

    def report(self, first=5):
        lines = list(self.failures)[:first]
        return f"{len(self.failures)} unreadable, first: " + "; ".join(lines) if lines else ""


def loader(dataset, args, rank, world, train):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.micro_batch, sampler=EpochSampler(len(dataset), rank, world, train, args.seed),
        num_workers=args.workers, pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)


# ----------------------------------------------------------------------------------------------------------------
# Model, loss, schedule

def load_clip(args):
    if args.model == "scratch":
        torch.manual_seed(args.seed)
        return clip_model.CLIP(SCRATCH)
    return clip_model.load(args.model)


def build_model(args, clip, classnames, own=None, ck=None):
    """The ViFiCLIP to train or evaluate, and the pixel mean/std it expects. own: the model of an own --checkpoint;
    ck: the contents of an official one (its weights go onto `clip`)."""
    kw = dict(mode=args.mode, towers=args.towers, template=args.template, clean_names=args.clean_names, n_ctx_text=args.n_ctx[0],
              n_ctx_vision=args.n_ctx[-1], depth_text=args.depth[0], depth_vision=args.depth[-1])
    if not args.checkpoint:
        model = vifi.ViFiCLIP(clip, classnames, **kw)
    else:
        loaded = own or vifi.load_official_checkpoint(args.checkpoint, clip, classnames, ck=ck,
                                                        clean_names=args.clean_names)
        loaded.set_classnames(classnames)
        # Evaluate it as it is, continue its own mode, or build the asked-for mode on its (video-fine-tuned) CLIP,
        # as "bridge and prompt" starts prompting from a fine-tuned model.
        keep = args.eval_only or loaded.mode == args.mode
        model = loaded if keep else vifi.ViFiCLIP(loaded.clip, classnames, norm=loaded.norm, **kw)
    # ImageNet's mean/std, as the official training and evaluation use, unless --norm or a checkpoint says otherwise
    model.norm = args.norm or (model.norm if args.checkpoint else "imagenet")
    mean, std = data.NORMS[model.norm]
    if args.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    return model, (mean, std)


def mix(video, labels, num_classes, args):
    """Mixup / CutMix with label smoothing (as timm's, which the official code uses); the same box for every frame.
    video: (B, T, 3, H, W) float, labels: (B,) -> mixed video, soft targets (B, C)."""
    off = args.label_smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=video.device)
    target.scatter_(1, labels[:, None], 1 - args.label_smoothing + off)
    use_cutmix = args.cutmix > 0 and (args.mixup <= 0 or random.random() < args.mix_switch)
    alpha = args.cutmix if use_cutmix else args.mixup
    if alpha <= 0:
        return video, target
    lam = random.betavariate(alpha, alpha)
    if use_cutmix:
        H, W = video.shape[-2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        y, x = random.randint(0, H - h), random.randint(0, W - w)
        video = video.clone()
        video[..., y:y + h, x:x + w] = video.flip(0)[..., y:y + h, x:x + w]
        lam = 1 - h * w / (H * W)  # the exact share of the pixels kept
    else:
        video = lam * video + (1 - lam) * video.flip(0)
    return video, lam * target + (1 - lam) * target.flip(0)


def learning_rate(progress, args):
    """The official schedule (timm's CosineLRScheduler as the official code sets it up) after `progress` epochs of
    training: a linear warm-up from 0 over warmup_epochs, and a cosine from --lr down to --lr / 100 over the whole
    run. The cosine is measured from the run's start, not from the warm-up's end (timm's warmup_prefix is off), so
    right after the warm-up the rate is already below the peak. A function of progress alone: the same curve on any
    number of GPUs and any micro-batch."""
    if progress < args.warmup_epochs:
        return args.lr * progress / args.warmup_epochs
    floor = args.lr / 100
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress / args.epochs, 1.0)))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, dataset, args, norm, device, autocast, rank, world, desc):
    """Softmax per view, averaged over views; top-1 / top-5 over every video exactly once, summed over processes."""
    model.eval()
    failures = FailureLog(len(dataset))
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, readable videos
    for batch in tqdm(loader(dataset, args, rank, world, train=False), desc=desc, leave=False, disable=rank > 0):
        failures.update(batch["failed"])
        video = data.normalize(batch["video"].to(device, non_blocking=True), *norm)
        if video.dim() == 5:
            video = video[:, None]  # one view: (B, T, 3, H, W) -> (B, 1, T, 3, H, W)
        B, V = video.shape[:2]
        with autocast:
            logits = model(video.flatten(0, 1))  # (B, V, T, 3, H, W) -> (B*V, T, 3, H, W) -> (B*V, C)
        probs = logits.float().softmax(-1).view(B, V, -1).mean(1)  # (B*V, C) -> (B, C)
        top5 = probs.topk(min(5, probs.shape[1]), dim=-1).indices.cpu()
        labels = batch["label"][:, None]  # -1 for an unreadable video: it matches no class and is not counted
        counts += torch.tensor([(top5[:, :1] == labels).sum(), (top5 == labels).sum(), (labels >= 0).sum()],
                               device=device)
    if world > 1:
        dist.all_reduce(counts)
    failures.gather(world)
    hits1, hits5, n = counts.tolist()
    return dict(top1=100 * hits1 / max(n, 1), top5=100 * hits5 / max(n, 1), videos=int(n),
                classes=len(dataset.classnames), views=args.views, failures=len(failures.failures),
                failed_first=list(failures.failures)[:5])


def evaluate_all(model, tests, args, norm, device, autocast, rank, world):
    results = {}
    for name, dataset in tests.items():
        model.set_classnames(dataset.classnames)  # base / novel / other datasets: the text cache follows
        results[name] = evaluate(model, dataset, args, norm, device, autocast, rank, world, f"eval {name}")
    if "base" in results:  # base-to-novel: the harmonic mean of the two halves
        b, n = results["base"]["top1"], results["novel"]["top1"]
        results["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    for group in {k.rsplit("-", 1)[0] for k in results if k.rsplit("-", 1)[-1].startswith(("fold", "subset"))}:
        accs = torch.tensor([v["top1"] for k, v in results.items() if k.startswith(group + "-")])
        results[group] = dict(mean_top1=accs.mean().item(), std_top1=accs.std(unbiased=False).item())
    return results


# ----------------------------------------------------------------------------------------------------------------
# Outputs

def write_outputs(ck, out):
    """best.pt (when the checkpoint's epoch is the best), log.jsonl and curves.svg, each rebuilt whole from a
    last.pt checkpoint `ck`, after it is saved: a run killed between two of these writes has them all back on
    --resume."""
    if ck["best_epoch"] == ck["epoch"] + 1:  # what evaluation and fine-tuning need; resuming reads last.pt
        save_atomic({k: ck[k] for k in ("model", "vifi", "epoch", "best_top1", "best_epoch", "args")},
                    os.path.join(out, "best.pt"))
    with open(os.path.join(out, "log.jsonl.tmp"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in ck["log"])
    os.replace(os.path.join(out, "log.jsonl.tmp"), os.path.join(out, "log.jsonl"))
    report.write_curves(ck["log"], os.path.join(out, "curves.svg"))


def save_atomic(obj, path):
    """torch.save through a temp file renamed into place: a crash mid-write never leaves a half checkpoint under the
    real name, and a failed write (a full disk, a quota) removes the temp file and says what happened."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short"
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise clip_model.CheckpointError(
            f"could not write {path} ({reason}; {free / 2**20:.1f} MiB free on its disk): free some space or choose "
            f"another --out. Any earlier {os.path.basename(path)} there is intact.") from None


# ----------------------------------------------------------------------------------------------------------------

def pick_device(name, local_rank):
    """'cuda' means this process's GPU, with its index (torch.cuda.set_device refuses a bare 'cuda')."""
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def check_args(args, world):
    """Flags that cannot work, refused before anything is loaded (vifi.ConfigError: one line, exit 2)."""
    problems = [
        (args.shots < 0, f"--shots {args.shots}: videos per class cannot be negative"),
        (args.frames < 1, f"--frames {args.frames}: a clip needs at least one frame"),
        (args.micro_batch < 1 or args.batch_size < 1, "--batch-size and --micro-batch must be at least 1"),
        (args.epochs < 1 and not args.eval_only, f"--epochs {args.epochs}: train at least one epoch, or --eval-only"),
        (not re.fullmatch(r"[1-9]\d*x[13]", args.views), f"--views {args.views!r}: expected CLIPSxCROPS with "
                                                          "CROPS 1 or 3, e.g. 1x1 or 4x3"),
        (not 0 <= args.label_smoothing < 1, f"--label-smoothing {args.label_smoothing}: expected 0 <= value < 1"),
        (args.template is not None and args.template.count("{}") != 1,
         f"--template {args.template!r}: expected exactly one {{}} for the name"),
        (any(name not in EVAL_DATASETS for name in args.eval_datasets),
         f"--eval-datasets {','.join(args.eval_datasets)}: expected names among {', '.join(EVAL_DATASETS)}"),
        (any("=" not in kv for kv in args.eval_roots.split(",") if kv),
         f"--eval-roots {args.eval_roots!r}: expected NAME=DIR pairs separated by commas"),
        (args.eval_only and bool(args.resume), f"--resume continues training, but this run only evaluates: to "
                                               f"evaluate {args.resume}, pass it as --checkpoint"),
        (not args.eval_only and args.micro_batch > 0 and args.batch_size % (args.micro_batch * world) != 0,
         f"--batch-size {args.batch_size} is not a whole number of micro-batches of {args.micro_batch} on {world} "
         f"process(es): choose --micro-batch so that micro-batch x processes divides the batch"),
        (args.device and args.device.startswith("cuda") and not torch.cuda.is_available(),
         f"--device {args.device}: this machine has no CUDA GPU that torch can use; leave --device out for the CPU"),
        (os.path.exists(args.out) and not os.path.isdir(args.out), f"--out {args.out} is a file, not a folder"),
        (args.input_size is not None and args.input_size < 1, f"--input-size {args.input_size}: expected pixels > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise vifi.ConfigError(message)
    if not args.eval_only and args.warmup_epochs >= args.epochs:
        top = args.lr * args.epochs / args.warmup_epochs
        print(f"warning: the run ({args.epochs} epochs) ends inside the warm-up ({args.warmup_epochs:g} epochs): the "
              f"rate rises only to {top:.3g}, not to --lr {args.lr:g}; lower --warmup-epochs", file=sys.stderr)


def fetch_splits(args):
    """The folder holding the official files this run reads (None for --splits native): a copy given with --splits
    DIR, or the cache, where missing files are downloaded once and checked against their pinned sha256."""
    if args.splits == "native" or args.dataset in ("synthetic", "list"):
        return None
    local = args.splits != "official"
    if local and not os.path.isdir(args.splits):
        raise data.DatasetError(f"--splits {args.splits!r}: expected 'official', 'native' or a folder holding the "
                                "official repository's labels/ and datasets_splits/")
    folder = args.splits if local else os.path.join(clip_model.cache_dir(), f"splits-{data.OFFICIAL_COMMIT[:7]}")
    hashes, failed = data.official_hashes(), []
    wanted = sorted({path for f in official_files(args).values() if f for path in f[1:]})
    for path in wanted:
        if data.check_official_file(folder, path, hashes[path]) is not None:
            continue
        if local:
            failed.append(f"{os.path.join(folder, path)} (missing)")
            continue
        try:
            clip_model.download(data.OFFICIAL_URL + path, os.path.join(folder, path), hashes[path])
        except clip_model.CheckpointError as e:
            why = "sha256 mismatch, nothing written" if "corrupt" in str(e) else "no network?"
            failed.append(f"{data.OFFICIAL_URL + path} -> {os.path.join(folder, path)} ({why})")
    if failed:  # offline: the model files that are not there yet belong in the same message
        also = [f"{url} -> {path}" for url, path, _ in vifi.model_files(args.model, need_vocab=args.model != "scratch")
                if not os.path.isfile(path)]
        raise data.DatasetError(f"{len(failed)} of the paper's split files that this run reads could not be found or "
                                "fetched:\n  " + "\n  ".join(failed) + "\nPlace them there, or clone "
                                "github.com/muzairkhattak/ViFi-CLIP elsewhere and pass --splits CLONE" +
                                "".join(f"\nThe model needs too: {line}" for line in also))
    return folder


def rank0_first(fetch, rank, distributed):
    """fetch() on rank 0, then on the others, which find its downloads in place: no two processes write one file."""
    result = fetch() if rank == 0 else None
    if distributed:
        dist.barrier()
    return fetch() if rank > 0 else result


def single_view(dataset):
    """The same test set with one clip and one crop per video: the official code's evaluations during training."""
    quick = dataset.subset(dataset.samples)
    quick.clips = quick.crops = 1
    return quick


def main(args):
    t_start = time.time()
    distributed = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world)
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank = dist.get_rank() if distributed else 0
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # The data first (folders, split files, lists, a readable video), so that a wrong --root costs no download.
    check_data(args)
    splits_dir = rank0_first(lambda: fetch_splits(args), rank, distributed)
    train_set, tests = datasets(args, splits_dir)
    check_readable({"train": train_set, **tests})

    # An own checkpoint holds its whole model; an official one needs the base CLIP (--model) it was trained from.
    ck = vifi.read_checkpoint(args.checkpoint) if args.checkpoint else None
    own = vifi.load_checkpoint(args.checkpoint, ck=ck) if ck and "vifi" in ck else None
    weights = None if own else args.model  # an own checkpoint holds its CLIP
    rank0_first(lambda: vifi.fetch_model_files(weights, need_vocab=args.model != "scratch"), rank, distributed)
    clip = own.clip if own else load_clip(args)
    args.input_size = args.input_size or clip.config.image_resolution  # the model's own resolution by default
    if args.input_size < clip.config.patch_size:
        raise vifi.ConfigError(f"--input-size {args.input_size} is smaller than one {clip.config.patch_size}-pixel "
                               "patch of this model")
    for dataset in (train_set, *tests.values()):
        if dataset is not None:
            dataset.size = args.input_size  # the sets were built before the model was known
    classnames = (train_set or next(iter(tests.values()))).classnames
    model, norm = build_model(args, clip, classnames, own, ck)
    del ck  # an own checkpoint's optimizer state is not needed any more
    model.to(device)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        for name, ds in {"train": train_set, **tests}.items():
            if ds is not None:
                data.write_list(ds, os.path.join(args.out, f"{name}_list.txt"), os.path.join(args.out, f"{name}_labels.csv"))

    log, best, best_epoch, epoch0, step, results = [], -1.0, 0, 0, 0, None
    if not args.eval_only:
        accum = args.batch_size // (args.micro_batch * world)
        train_loader = loader(train_set, args, rank, world, train=True)
        batches = len(train_loader)  # micro-batches per epoch (each len() reshuffles the sampler: ask once)
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.weight_decay,
                                      fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        if args.resume:
            ck = vifi.read_checkpoint(args.resume)
            if "optimizer" not in ck:
                raise clip_model.CheckpointError(f"--resume {args.resume}: not a last.pt written by train.py (no "
                                                 "optimizer state); to start from weights, use --checkpoint")
            saved = (ck["args"].get("dataset"), ck["args"].get("protocol"), ck["vifi"].get("classnames"))
            if saved != (args.dataset, args.protocol, list(classnames)):
                raise clip_model.CheckpointError(
                    f"--resume {args.resume} continues a {saved[1]} run on {saved[0]} ({len(saved[2] or [])} classes), "
                    f"not this {args.protocol} run on {args.dataset} ({len(classnames)} classes): resume with the flags "
                    "of the run that wrote it, or start from its weights with --checkpoint")
            clip_model.check_state_dict(ck["model"], model.state_dict(), args.resume,
                                        "the model these flags build: resume with the flags of the run that wrote it")
            model.load_state_dict(ck["model"])
            try:
                optimizer.load_state_dict(ck["optimizer"])
            except ValueError as e:  # the same weights, but other ones train (--mode, --towers)
                raise clip_model.CheckpointError(f"--resume {args.resume}: its optimizer state does not fit what "
                                                 f"these flags train ({e}); resume with the run's flags") from None
            scaler.load_state_dict(ck["scaler"])
            epoch0, step, best, best_epoch, log = ck["epoch"] + 1, ck["step"], ck["best_top1"], ck["best_epoch"], ck["log"]
            random.setstate(ck["rng"]["python"])
            torch.set_rng_state(ck["rng"]["torch"])
            if rank == 0:  # whatever a kill right after last.pt's rename left unwritten
                write_outputs(ck, args.out)
        train_model = torch.compile(model) if args.compile else model
        if distributed:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(epoch):
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        return {"model": model.state_dict(), "vifi": vifi.checkpoint_config(model), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_top1": best,
                "best_epoch": best_epoch, "log": log, "rng": rng, "args": {k: v for k, v in vars(args).items()}}

    epochs = [] if args.eval_only else range(epoch0, args.epochs)
    main_test = "base" if "base" in tests else next(iter(tests))
    for epoch in tqdm(epochs, desc="epochs", disable=rank > 0, initial=epoch0, total=args.epochs):
        model.train()
        train_loader.sampler.epoch = epoch
        failures = FailureLog(len(train_set))
        seen, t0, losses = 0, time.time(), []
        # The rate in force: the one set after the last optimizer step so far (0 before the first, as timm's).
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(max(epoch - 1 / batches, 0.0), args)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False, disable=rank > 0)
        for i, batch in enumerate(bar):
            failures.update(batch["failed"])
            # colour jitter and grayscale happen here, on the device, with each clip's own matrix (data.normalize)
            video = data.normalize(batch["video"].to(device, non_blocking=True), *norm,
                                   colour=batch["colour"].to(device, non_blocking=True))
            video, target = mix(video, batch["label"].to(device), len(classnames), args)
            group = min(accum, batches - i // accum * accum)  # micro-batches in this optimizer step
            last = (i + 1) % accum == 0 or i + 1 == batches
            sync = contextlib.nullcontext() if last or not distributed else train_model.no_sync()
            with sync:
                with autocast:
                    logits = train_model(video)
                loss = torch.sum(-target * logits.float().log_softmax(-1), dim=-1).mean()
                scaler.scale(loss / group).backward()
            losses.append(loss.detach())
            seen += len(video) * world
            if last:
                step_loss = torch.stack(losses[-group:]).mean().item()  # one sync per optimizer step
                if not math.isfinite(step_loss):
                    kept = (f"the last good checkpoint is {args.out}/last.pt" if epoch > epoch0 or args.resume else
                            "no checkpoint was written yet (none is, before the first epoch ends)")
                    raise FloatingPointError(f"loss is {step_loss} at optimizer step {step + 1} (epoch {epoch + 1}); "
                                             f"stopped; {kept}. Try a lower --lr or --precision fp32")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                for g in optimizer.param_groups:  # timm's step_update(epoch * n + i): progress at micro-batch i
                    g["lr"] = learning_rate(epoch + i / batches, args)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                clips_per_s=f"{seen / (time.time() - t0):.1f}")
        if failures.gather(world).failures and rank == 0:
            tqdm.write(f"epoch {epoch + 1}: unreadable videos were replaced by others: {failures.report()}")
        row = dict(epoch=epoch + 1, step=step, loss=torch.stack(losses).mean().item(),
                   lr=optimizer.param_groups[0]["lr"], clips_per_s=seen / (time.time() - t0),
                   failures=len(failures.failures))
        if epoch + 1 == args.epochs:  # the final evaluation: every test set, with the protocol's views
            results = evaluate_all(model, tests, args, norm, device, autocast, rank, world)
            row.update(top1=results[main_test]["top1"], top5=results[main_test]["top5"])
        elif args.eval_every and epoch % args.eval_every == 0:  # as the official code: one view, the main set
            model.set_classnames(tests[main_test].classnames)
            row.update({k: v for k, v in evaluate(model, single_view(tests[main_test]), args, norm, device, autocast,
                                                  rank, world, f"eval {main_test}").items() if k in ("top1", "top5")})
        if "top1" in row:  # evaluation switched the class list: back to the training classes (also what is saved)
            model.set_classnames(classnames)
        log.append(row)
        if row.get("top1", -1) > best:
            best, best_epoch = row["top1"], epoch + 1
        if rank == 0:
            ck = checkpoint(epoch)
            save_atomic(ck, os.path.join(args.out, "last.pt"))
            write_outputs(ck, args.out)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    if results is None:  # evaluation only, or resumed after the last epoch
        results = evaluate_all(model, tests, args, norm, device, autocast, rank, world)
    if rank == 0:
        write_results(args, model, train_set, classnames, log, results,
                      dict(set=main_test, top1=best, epoch=best_epoch) if best_epoch else None, time.time() - t_start)
    if distributed:
        dist.destroy_process_group()
    return results


def splits_used(args):
    """Where the run's videos and classes came from, for results.json."""
    if args.dataset in ("synthetic", "list"):
        return "the synthetic set" if args.dataset == "synthetic" else "the given list files, as they are"
    if args.splits == "native":
        return (f"native: {args.dataset}'s own lists" + (f", seeded draw (seed {args.seed}), NOT the paper's split"
                                                         if args.protocol in ("few-shot", "base-novel") else ""))
    return f"official: github.com/muzairkhattak/ViFi-CLIP at {data.OFFICIAL_COMMIT[:7]} ({args.splits})"


def write_results(args, model, train_set, classnames, log, results, best, wall_time):
    """results.json and the table on stdout."""
    summary = dict(protocol=args.protocol, dataset=args.dataset, splits=splits_used(args), model=args.model,
                   mode=args.mode, checkpoint=args.checkpoint, norm=model.norm, frames=args.frames,
                   input_size=args.input_size, views=args.views,
                   train_videos=len(train_set) if train_set is not None else 0, classes=len(classnames),
                   train_failures=sum(r.get("failures", 0) for r in log),  # unreadable videos replaced, all epochs
                   epochs=args.epochs, wall_time_s=wall_time, results=results, best=best,
                   paper_reports=REPORTED[args.protocol],
                   settings={k: v for k, v in vars(args).items() if not k.startswith("_")})
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{'set':<20}{'videos':>8}{'classes':>9}{'top-1':>9}{'top-5':>9}")
    for name, r in results.items():
        if not isinstance(r, dict):
            print(f"{name:<20}{'':>17}{r:>9.2f}")
        elif "top1" in r:
            print(f"{name:<20}{r['videos']:>8}{r['classes']:>9}{r['top1']:>9.2f}{r['top5']:>9.2f}")
            if r["failures"]:
                print(f"{'':<20}{r['failures']} unreadable videos left out: {'; '.join(r['failed_first'])}")
        else:
            print(f"{name:<20}{'mean':>8}{'':>9}{r['mean_top1']:>9.2f}  ± {r['std_top1']:.2f}")
    if best:
        paper = "" if args.protocol == "synthetic" else (f"; the paper's tables report the {REPORTED[args.protocol]} "
                                                         f"one for {args.protocol}")
        print(f"best {best['set']} top-1 {best['top1']:.2f} after epoch {best['epoch']}{paper}")
    print(f"results in {args.out}/results.json")


if __name__ == "__main__":
    try:
        main(get_args())
    except (data.DatasetError, clip_model.CheckpointError, tokenizer.VocabError, vifi.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
