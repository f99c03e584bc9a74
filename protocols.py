"""
The paper's protocols, as the official code (github.com/muzairkhattak/ViFi-CLIP at commit e2d1948)
runs them: which videos, classes and settings each of the paper's tables uses.

A protocol is three things:
- its settings (PRESETS): frames, batch, learning rate, epochs, test views, how often it evaluates,
  and which evaluation the paper's tables report (REPORTED); engine.py's recipe runs them;
- its videos and class names: the official repository's list and label files (official_sets),
  pinned by sha256 in official_splits.sha256 beside this file, fetched once (fetch_splits) and read
  under the user's --root, where videos are found by file name; or, with --splits native, a
  dataset's own lists and a seeded draw (not the paper's split, and results.json says so);
- its test sets: one, base and novel halves, or three folds / subsets reported as mean and std.

`resolve(args)` turns the command line into a protocol and its settings; `datasets(args, folder)`
builds the training set and the test sets. train.py runs them; nothing here knows about models.
"""
import hashlib
import os
import sys

import archive
import data

PROTOCOLS = ["few-shot", "base-novel", "zero-shot", "supervised", "vanilla-zero-shot"]
EVAL_DATASETS = ["ucf101", "hmdb51", "k600", "k400", "ssv2"]  # what --eval-datasets may name

# Settings per protocol (Sec. 4 and the official configs); a flag given on the command line wins.
# eval_every: the official code evaluates after epoch e (0-based) when e % SAVE_FREQ == 0 and after
# the last one, so a few-shot run evaluates after epochs 1, 11, 21, 31, 41 and 50, a supervised run
# after every epoch.
PRESETS = {
    "few-shot":          dict(frames=32, batch_size=64, lr=2e-6, epochs=50, eval_every=10),
    "few-shot-prompt":   dict(frames=32, batch_size=64, lr=8e-3, epochs=50, eval_every=10, n_ctx=[10],
                              depth=[12]),
    "base-novel":        dict(frames=32, batch_size=64, lr=2e-6, epochs=11, eval_every=10, shots=16),
    "base-novel-prompt": dict(frames=32, batch_size=64, lr=4e-2, epochs=11, eval_every=10, shots=16,
                              n_ctx=[16], depth=[9]),
    "zero-shot":         dict(frames=32, batch_size=256, lr=8e-6, epochs=10, eval_every=1),
    "supervised":        dict(frames=16, batch_size=512, lr=2.2e-5, epochs=30, eval_every=1, views="4x3"),
    "vanilla-zero-shot": dict(frames=32, epochs=0),
    # The offline demo: a small CLIP from scratch with the byte-level tokenizer on rendered clips;
    # its base classes train, its novel classes (unseen combinations of seen words) are only
    # evaluated.
    "synthetic":         dict(model="scratch", template="{}", frames=8, batch_size=32, micro_batch=32,
                              lr=7e-4, epochs=40, eval_every=5, warmup_epochs=1,
                              label_smoothing=0.0, mixup=0.0, cutmix=0.0, workers=0),
}
# Fine-tuning one encoder only (--towers image / text), supervised: the official
# configs/fully_supervised/k400/16_16_{image,text}_tuned_clip.yaml (4 clips x 8 accumulation x 8
# GPUs). Their zero-shot training configs use the zero-shot preset's batch and rate for every
# --towers.
ONE_TOWER = {"supervised": dict(batch_size=256, lr=8e-6)}
DEFAULTS = dict(model="ViT-B/16", frames=32, batch_size=64, micro_batch=8, lr=2e-6, epochs=10,
                eval_every=0, warmup_epochs=5, weight_decay=0.001, label_smoothing=0.1, mixup=0.8,
                cutmix=1.0, mix_switch=0.5, views="1x1", shots=0, n_ctx=[10], depth=[12],
                workers=min(8, os.cpu_count() or 1))
# Which evaluation the paper's tables report: few-shot logs the best of its evaluations ("Max
# accuracy"); the other protocols take the final model (base-to-novel evaluates novel classes with
# the last epoch's weights).
REPORTED = {"few-shot": "best", "base-novel": "final", "zero-shot": "final", "supervised": "final",
            "vanilla-zero-shot": "final", "synthetic": "final"}


def infer(args):
    """The protocol the flags describe, when --protocol is not given (--dataset list must give
    it)."""
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
    return "supervised"


def resolve(args):
    """Fill in the protocol and every setting left out on the command line (its preset, then
    DEFAULTS)."""
    args.eval_datasets = [name for name in (args.eval_datasets or "").split(",") if name]
    args.protocol = args.protocol or infer(args)
    args.base_novel = args.protocol == "base-novel"
    preset = args.protocol
    # bridge and prompt: its own rates and sizes
    if args.mode == "prompt" and preset + "-prompt" in PRESETS:
        preset += "-prompt"
    given = {k: v for k, v in vars(args).items() if v is not None}
    towers = ONE_TOWER.get(preset, {}) if args.mode == "finetune" and args.towers != "both" else {}
    for k, v in {**DEFAULTS, **PRESETS[preset], **towers, **given}.items():
        setattr(args, k, v)
    # vanilla CLIP: nothing trains
    if args.protocol == "vanilla-zero-shot" or args.mode == "zeroshot":
        args.eval_only = True
    if args.splits is None:
        args.splits = "official" if args.dataset in OFFICIAL_DATASETS else "native"
    if args.dataset != "synthetic":
        args.root = args.root or default_root(args.dataset)
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{args.protocol}")
    return args


# --------------------------------------------------------------------------------------------------
# The official list and label files. Every protocol is a set of them (official_sets), read by the
# list dataset under each dataset's root. fetch_splits puts them in a folder laid out as the
# repository (labels/, datasets_splits/), each checked against official_splits.sha256 (`sha256sum`
# format).

OFFICIAL_COMMIT = "e2d1948307f582052078eb8a4afbeb50247166f1"
OFFICIAL_URL = f"https://raw.githubusercontent.com/muzairkhattak/ViFi-CLIP/{OFFICIAL_COMMIT}/"
OFFICIAL_SHA256 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_splits.sha256")
# {dataset: (labels prefix, splits folder)}
OFFICIAL_DATASETS = {"ucf101": ("ucf_101", "ucf"), "hmdb51": ("hmdb_51", "hmdb"),
                     "ssv2": ("ssv2", "ssv2"), "k400": ("kinetics_400", "k400"),
                     "k600": (None, "k600")}
OFFICIAL_SHOTS = (2, 4, 8, 16)


def official_hashes():
    """{path inside the official repository: sha256}."""
    with open(OFFICIAL_SHA256) as f:
        return {path: digest for digest, path in (line.split() for line in f if line.strip())}


def official_sets(dataset, protocol, shots=0, seed=1):
    """{set name: (list file, labels file)}, paths inside the official repository, for one protocol:
    - few-shot: 'train' (the K-shot list of split 1) and 'test' (split 1's test list, SSv2's
      validation list);
    - base-novel: 'train' (16 shots per base class, seeds 1-3), 'base' and 'novel' with their own
      label files;
    - supervised: 'test' only (the paper trains on the whole training set, the dataset's own list);
    - zero-shot: the evaluation sets: the three test folds of UCF101 / HMDB51, the three 160-class
      Kinetics-600 subsets, or the test list (Kinetics-400, SSv2)."""
    if dataset not in OFFICIAL_DATASETS:
        raise data.DatasetError(f"the official repository has no splits for {dataset!r}; use "
                                "--splits native")
    labels, folder = OFFICIAL_DATASETS[dataset]
    lists = f"datasets_splits/{folder}_splits/"
    full = f"labels/{labels}_labels.csv"
    tests = {"ucf101": "val1.txt", "hmdb51": "val1.txt", "ssv2": "validation.txt", "k400": "val.txt"}
    test = tests.get(dataset)
    if protocol == "few-shot" and dataset in ("ucf101", "hmdb51", "ssv2") and shots in OFFICIAL_SHOTS:
        return {"train": (lists + f"train1_few_shot_{shots}.txt", full),
                "test": (lists + test, full)}
    if protocol == "base-novel" and dataset != "k600" and seed in (1, 2, 3):
        b2n = f"datasets_splits/base2novel_splits/{folder}_splits/"
        half = labels.replace("ssv2", "ssv2_174")
        return {"train": (b2n + f"fs_base_s{seed}_train.txt", f"labels/{half}_base_labels.csv"),
                "base": (b2n + "base_val.txt", f"labels/{half}_base_labels.csv"),
                "novel": (b2n + "novel_val.txt", f"labels/{half}_novel_labels.csv")}
    if protocol == "supervised" and dataset == "k400":
        return {"test": (lists + test, full)}
    if protocol == "zero-shot":
        if dataset in ("ucf101", "hmdb51"):
            return {f"{dataset}-fold{k}": (lists + f"val{k}.txt", full) for k in (1, 2, 3)}
        if dataset == "k600":
            return {f"k600-subset{k}": (lists + f"ZS_split{k}_K600_eval.txt",
                                        f"labels/ZS_split{k}_K600.csv") for k in (1, 2, 3)}
        return {"test": (lists + test, full)}
    given = {"few-shot": f" with --shots {shots}", "base-novel": f" with --seed {seed}"}
    given = given.get(protocol, "")
    raise data.DatasetError(f"the paper has no {protocol} split of {dataset}{given} (few-shot: "
                            f"ucf101, hmdb51, ssv2 with --shots {'/'.join(map(str, OFFICIAL_SHOTS))}; "
                            "base-novel: ucf101, hmdb51, ssv2, k400 with --seed 1-3; supervised: "
                            "k400); --splits native draws one from the dataset's own lists")


def official_files(args):
    """{set name: (dataset, list file, labels file)} of the official repository for this run;
    'train' maps to None where the paper trains on a whole training set (the dataset's own list,
    read with the official names)."""
    if args.protocol in ("few-shot", "base-novel", "supervised"):
        sets = official_sets(args.dataset, args.protocol, args.shots, args.seed)
    elif args.eval_only:  # zero-shot evaluation (also of vanilla CLIP): its zero-shot sets
        sets = official_sets(args.dataset, "zero-shot")
    else:  # zero-shot training: the whole training set, evaluated on its test list
        sets = official_sets(args.dataset, "supervised")
    whole = args.protocol in ("supervised", "zero-shot") and not args.eval_only
    files = {"train": None} if whole else {}
    files.update((name, (args.dataset, *f)) for name, f in sets.items()
                 if not (args.eval_only and name == "train"))
    for name in args.eval_datasets:
        files.update((k, (name, *f)) for k, f in official_sets(name, "zero-shot").items())
    return files


def check_official_file(folder, path, sha256):
    """The local copy of an official file, if it is there and intact; None if absent; DatasetError
    if altered."""
    local = os.path.join(folder, path)
    if not os.path.isfile(local):
        return None
    with open(local, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise data.DatasetError(f"{local} is not the official file (sha256 {digest}, expected {sha256} "
                                f"for {path} at commit {OFFICIAL_COMMIT[:7]}); restore it, or delete "
                                "it to fetch it again")
    return local


def fetch_splits(args, also=()):
    """The folder holding the official files this run reads (None for --splits native): a copy given
    with --splits DIR, or the cache, where missing files are downloaded once and checked against
    their pinned sha256. `also`: other missing downloads ('url -> path' lines), named in the same
    message when offline."""
    if args.splits == "native" or args.dataset in ("synthetic", "list"):
        return None
    local = args.splits != "official"
    if local and not os.path.isdir(args.splits):
        raise data.DatasetError(f"--splits {args.splits!r}: expected 'official', 'native' "
                                "or a folder holding the official repository's labels/ "
                                "and datasets_splits/")
    folder = (args.splits if local else
              os.path.join(archive.cache_dir(), f"splits-{OFFICIAL_COMMIT[:7]}"))
    hashes, failed = official_hashes(), []
    for path in sorted({path for f in official_files(args).values() if f for path in f[1:]}):
        if check_official_file(folder, path, hashes[path]) is not None:
            continue
        if local:
            failed.append(f"{os.path.join(folder, path)} (missing)")
            continue
        try:
            archive.download(OFFICIAL_URL + path, os.path.join(folder, path), hashes[path])
        except archive.CheckpointError as e:
            why = "sha256 mismatch, nothing written" if "corrupt" in str(e) else "no network?"
            failed.append(f"{OFFICIAL_URL + path} -> {os.path.join(folder, path)} ({why})")
    if failed:
        raise data.DatasetError(f"{len(failed)} of the paper's split files that this run reads "
                                "could not be found or fetched:\n  " + "\n  ".join(failed) +
                                "\nPlace them there, or clone "
                                "github.com/muzairkhattak/ViFi-CLIP elsewhere and pass --splits CLONE" +
                                "".join(f"\nThe model needs too: {line}" for line in also))
    return folder


def splits_used(args):
    """Where the run's videos and classes came from, for results.json."""
    if args.dataset in ("synthetic", "list"):
        synthetic = args.dataset == "synthetic"
        return "the synthetic set" if synthetic else "the given list files, as they are"
    if args.splits == "native":
        drawn = args.protocol in ("few-shot", "base-novel")
        return (f"native: {args.dataset}'s own lists" +
                (f", seeded draw (seed {args.seed}), NOT the paper's split" if drawn else ""))
    return f"official: github.com/muzairkhattak/ViFi-CLIP at {OFFICIAL_COMMIT[:7]} ({args.splits})"


# --------------------------------------------------------------------------------------------------
# The datasets of a run

def default_root(name):
    """Where a dataset is looked for without --root / --eval-roots: $VIFI_DATA/<name>, VIFI_DATA
    defaulting to ./data."""
    return os.path.join(os.environ.get("VIFI_DATA", "data"), name)


def data_roots(args):
    """{dataset: folder} of the training and evaluation sets: --root, --eval-roots, else
    default_root."""
    given = dict(kv.split("=", 1) for kv in args.eval_roots.split(",") if kv)
    evaluated = {name: given.get(name) or default_root(name) for name in args.eval_datasets}
    return {args.dataset: args.root, **evaluated}


def check_data(args):
    """Before any download: every dataset folder exists and holds videos."""
    if args.dataset != "synthetic":
        for name, root in data_roots(args).items():
            data.check_root(name, root)


def check_readable(sets):
    """After the lists are read: a video of each set decodes (a copy of the wrong or of empty files
    stops here)."""
    for name, dataset in sets.items():
        if dataset is None or isinstance(dataset, data.SyntheticVideos):
            continue
        reasons = []
        for path, _ in dataset.samples[:5]:
            try:
                # scaled as training reads it: memory stays small
                data.read_frames(path, [0], short_side=256)
                break
            except data.VideoError as e:
                reasons.append(str(e))
        else:
            raise data.DatasetError(f"none of the first {len(reasons)} videos of the {name} set "
                                    f"could be read, e.g. {reasons[0]}; check the copy under "
                                    f"{dataset.root} with `python tools.py check --dataset NAME "
                                    f"--root {dataset.root}`")


def datasets(args, splits_dir=None):
    """(train set or None, {name: test set}) of the protocol: the official lists (copies in
    `splits_dir`) read under each dataset's root, or the dataset's own lists (--splits native, the
    synthetic set, list files)."""
    clips, crops = data.parse_views(args.views)
    common = dict(frames=args.frames, size=args.input_size, clips=clips, crops=crops,
                  seed=args.seed)
    roots = data_roots(args)
    if args.splits == "native" or args.dataset in ("synthetic", "list"):
        return native_datasets(args, roots, common)
    files = official_files(args)
    sets = {name: official_list(roots[f[0]], f, splits_dir, "train" if name == "train" else "test",
                                common) for name, f in files.items() if f}
    train = sets.pop("train", None)
    # the whole training set: the dataset's own list, the official names
    if "train" in files and train is None:
        own = data.build_dataset(args.dataset, args.root, "train", **common)
        train = relabel(own, sets["test"].classnames)
    return train, sets


def official_list(root, files, splits_dir, split, common):
    """One official list (and its labels) read under a dataset's root."""
    dataset, list_file, labels_file = files
    try:
        return data.build_dataset("list", root, split, list_file=os.path.join(splits_dir, list_file),
                                  labels_file=os.path.join(splits_dir, labels_file), **common)
    except data.DatasetError as e:
        raise data.DatasetError(f"{dataset}: the paper's {list_file} does not match the "
                                f"videos under {root}: {e}. The official lists name "
                                f"{dataset}'s own files; for other videos (such as tools.py "
                                "synth-ucf output) use --splits native") from None


def relabel(dataset, classnames):
    """The same videos with labels given by name in `classnames` (a dataset's own list read with the
    official class list); every class of the dataset must be there, by its exact name."""
    new_label = {name: i for i, name in enumerate(classnames)}
    unknown = [name for name in dataset.classnames if name not in new_label]
    if unknown:
        raise data.DatasetError(f"{len(unknown)} classes of {dataset.root} are not in "
                                f"the official class list, e.g. {unknown[:3]}; rename "
                                "them or use --splits native")
    samples = [(path, new_label[dataset.classnames[label]]) for path, label in dataset.samples]
    return dataset.subset(samples, classnames)


def native_datasets(args, roots, common):
    """The dataset's own train and test lists; base / novel halves and few-shot subsets drawn with
    the seed (not the paper's); list files as they are."""
    def build(name, split, fold=args.fold):
        # only --dataset list reads these
        lists = {"train": args.train_list, "test": args.test_list}
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
    few_shot = args.protocol in ("few-shot", "base-novel", "synthetic")
    if drawn and train is not None and args.shots and few_shot:
        train = data.few_shot(train, args.shots, args.seed)
    if drawn and args.protocol in ("few-shot", "base-novel"):
        print(f"note: --splits native: {args.protocol} videos and classes drawn with "
              f"seed {args.seed}, not the paper's lists; its numbers are not "
              "comparable with the paper's", file=sys.stderr)
    for name in args.eval_datasets:
        # Kinetics-600 classes absent from Kinetics-400, three seeded subsets of 160
        if name == "k600":
            k600 = build("k600", "test")
            for s in (1, 2, 3):
                known = (train or test).classnames
                tests[f"k600-subset{s}"] = data.k600_novel_subset(k600, known, seed=s)
        else:
            for fold in (1, 2, 3):
                tests[f"{name}-fold{fold}"] = build(name, "test", fold=fold)
    return train, tests
