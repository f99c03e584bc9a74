"""
Train and evaluate ViFi-CLIP on every protocol of the paper, from one command.

    python train.py --dataset synthetic                             # offline demo: a small CLIP on CPU
    python train.py --dataset ucf101 --root DIR --shots 8           # few-shot fine-tuning (Table 4)
    python train.py --dataset hmdb51 --root DIR --base-novel --seed 1 --mode prompt --checkpoint K400.pth
    torchrun --nproc_per_node 8 train.py --dataset k400 --root DIR  # fully supervised, 8 GPUs

The protocol follows from the flags, and protocols.py gives its settings, videos and test sets;
any flag given overrides its preset. `--batch-size` is the effective batch of one optimizer step
over all processes; `--micro-batch` is what one device holds at once, and gradients accumulate over
the difference, so the paper's batch holds on any number of GPUs. Writes `results.json`,
`log.jsonl`, `last.pt`, `best.pt`, `curves.svg` and the split lists to `--out`.
"""
import argparse
import contextlib
import dataclasses
import glob
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import archive
import clip_model
import data
import engine
import protocols
import report
import tokenizer
import vifi

DATASETS = ["synthetic", "ucf101", "hmdb51", "k400", "k600", "ssv2", "list"]
# The demo's CLIP (--model scratch): small enough to train from scratch on a CPU in minutes.
SCRATCH = clip_model.CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=2,
                                vision_width=128, patch_size=8, context_length=32,
                                vocab_size=tokenizer.Tokenizer(byte_level=True).vocab_size,
                                text_width=128, text_layers=2)


def data_flags(g):
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="default: synthetic, the offline demo (rendered clips, a small CLIP from "
                   "scratch, no download)")
    g.add_argument("--root", help="folder the dataset unpacks into (default: $VIFI_DATA/<dataset>, "
                   "VIFI_DATA defaulting to ./data; see docs/data.md for each layout)")
    g.add_argument("--protocol", choices=protocols.PROTOCOLS, help="the paper's protocol (default: "
                   "from --shots, --base-novel, --eval-datasets, --mode zeroshot; else supervised)")
    g.add_argument("--splits", help="'official' (the paper's list and label files, downloaded "
                   "once; the default for ucf101, hmdb51, k400, k600, ssv2), a folder holding a copy "
                   "of them (labels/, datasets_splits/), or 'native' (the dataset's own lists and a "
                   "seeded draw)")
    g.add_argument("--fold", type=int, default=1, help="--splits native: UCF101 / HMDB51 split 1-3")
    g.add_argument("--shots", type=int,
                   help="few-shot: videos per class (the paper's lists: 2, 4, 8, 16)")
    g.add_argument("--base-novel", action="store_true",
                   help="base-to-novel: train on base classes, test both halves")
    g.add_argument("--seed", type=int, default=1,
                   help="base-to-novel split 1-3, and the training seed")
    g.add_argument("--eval-datasets", help="zero-shot: comma list of datasets evaluated after "
                   "training (the paper: ucf101,hmdb51,k600; k400 and ssv2 also work)")
    g.add_argument("--eval-roots", default="", help="their roots: ucf101=DIR,hmdb51=DIR,k600=DIR "
                   "(default: $VIFI_DATA/<dataset>)")
    g.add_argument("--train-list",
                   help="--dataset list: 'path label' lines (e.g. the paper's split files)")
    g.add_argument("--test-list", help="--dataset list: the test list")
    g.add_argument("--labels", help="--dataset list: the 'id,name' labels CSV")
    g.add_argument("--clean-names", action="store_true", help="'ApplyEyeMakeup' -> 'apply eye "
                   "makeup' in the prompts (default: class names verbatim)")
    g.add_argument("--frames", type=int, help="frames per clip (T)")
    g.add_argument("--input-size", type=int, help="pixels (default: the model's own resolution)")
    g.add_argument("--views", help="test views as CLIPSxCROPS, e.g. 4x3")
    g.add_argument("--norm", choices=list(data.NORMS), help="pixel mean/std (default: a "
                   "checkpoint's own, else imagenet, as the official training and evaluation)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes per GPU")


def get_args(argv=None):
    description, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=description.strip(), epilog="examples:\n" + examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data_flags(p.add_argument_group("data"))
    g = p.add_argument_group("model")
    g.add_argument("--mode", default="finetune", choices=vifi.MODES, help="finetune: ViFi-CLIP; "
                   "prompt: bridge and prompt; zeroshot: vanilla CLIP, evaluation only")
    g.add_argument("--towers", default="both", choices=vifi.TOWERS,
                   help="finetune: which encoders train")
    g.add_argument("--model", help="CLIP name (ViT-B/16, ...), checkpoint path, or 'scratch'")
    g.add_argument("--checkpoint",
                   help="start from (or with --eval-only, evaluate) an own or official checkpoint")
    g.add_argument("--n-ctx", type=int, nargs="+",
                   help="prompt tokens: one value, or text and vision")
    g.add_argument("--depth", type=int, nargs="+",
                   help="prompt depth: one value, or text and vision")
    g.add_argument("--template", help='text prompt of a class name (default, as the official code: '
                   '"{}" for vanilla CLIP, else "a photo of a {}.")')
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int,
                   help="(default for every optimization flag: the protocol's preset)")
    g.add_argument("--lr", type=float, help="peak learning rate, for the effective batch")
    g.add_argument("--batch-size", type=int,
                   help="effective batch: clips per optimizer step over all processes")
    g.add_argument("--micro-batch", type=int, help="clips per forward on one device")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.001)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0 (5 epochs)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--mixup", type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--mix-switch", type=float,
                   help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--eval-every", type=int, help="evaluate after epochs 1, 1 + N, 1 + 2N, ... and "
                   "the last (0 = after the last only)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="cuda, cpu, ... (default: the best available)")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations: less memory")
    g.add_argument("--out", help="output folder (default: runs/<dataset>-<protocol>)")
    g.add_argument("--resume",
                   help="continue from DIR/last.pt, with its run's settings (docs/training.md)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out "
                   "(default: refuse an explicit --out that holds one)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (or the base "
                   "model) on the protocol's test sets, with its frames and views")
    args = p.parse_args(argv)
    # argparse fills in a default only where the namespace lacks the name: what stays unset
    unset = object()
    blank = argparse.Namespace(**{k: unset for k in vars(args)})
    given = {k for k, v in vars(p.parse_args(argv, blank)).items() if v is not unset}
    unsaid = not args.protocol and protocols.infer(args) == "supervised" and not args.resume
    if args.dataset == "list" and unsaid:
        raise vifi.ConfigError(f"--dataset list: say whose settings to use with --protocol "
                               f"({', '.join(protocols.PROTOCOLS)}); the lists are used as they "
                               "are")
    args = protocols.resolve(args)
    # the preset's micro-batch at most, cut to divide this process's share of the batch
    if "micro_batch" not in given:
        share = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
        if share >= 1:
            divisors = range(1, min(args.micro_batch, share) + 1)
            args.micro_batch = max(d for d in divisors if share % d == 0)
    # a --resume that names no file, or comes with --eval-only, is refused by check_args
    if args.resume and os.path.isfile(args.resume) and not args.eval_only:
        restore_settings(args, given)
    args._given = given
    return args


# Flags that may differ from the resumed run's: where and how it runs, not what it computes. The
# others are the run's settings, restored from last.pt; given again with another value, they are
# refused.
RESUME_MAY_CHANGE = ("workers", "device", "precision", "compile", "grad_checkpointing",
                     "micro_batch", "root", "eval_roots", "out", "overwrite")


def restore_settings(args, given):
    """--resume: the settings saved in last.pt, over the presets; a flag given again must agree with
    them, except those in RESUME_MAY_CHANGE. --out defaults to the folder of last.pt."""
    saved = read_last(args.resume)["args"]
    for key, value in saved.items():
        own = key in ("resume", "out", "device", "overwrite") or key.startswith("_")
        if own or not hasattr(args, key):
            continue  # this run's own, or a setting this version no longer has
        if key in given and getattr(args, key) != value and key not in RESUME_MAY_CHANGE:
            flag = "--" + key.replace("_", "-")
            raise vifi.ConfigError(f"{flag} {getattr(args, key)}: {args.resume} continues a run "
                                   f"with {flag} {value}; leave {flag} out to resume it, or start "
                                   f"a new run with --checkpoint {args.resume} to use its weights")
        if key not in given:
            setattr(args, key, value)
    if "out" not in given:
        args.out = os.path.dirname(args.resume) or "."


def check_args(args, world):
    """Flags that cannot work, refused before anything is loaded (vifi.ConfigError: one line,
    exit 2)."""
    problems = [
        (args.shots < 0, f"--shots {args.shots}: videos per class cannot be negative"),
        (args.frames < 1, f"--frames {args.frames}: a clip needs at least one frame"),
        (args.micro_batch < 1 or args.batch_size < 1,
         "--batch-size and --micro-batch must be at least 1"),
        (args.epochs < 1 and not args.eval_only,
         f"--epochs {args.epochs}: train at least one epoch, or --eval-only"),
        (not 0 <= args.label_smoothing < 1,
         f"--label-smoothing {args.label_smoothing}: expected 0 <= value < 1"),
        (not args.lr > 0 and not args.eval_only,
         f"--lr {args.lr:g}: expected a learning rate above 0"),
        (not args.weight_decay >= 0,
         f"--weight-decay {args.weight_decay:g}: expected 0 (off) or more"),
        (not args.warmup_epochs >= 0,
         f"--warmup-epochs {args.warmup_epochs:g}: expected 0 (no warm-up) or more"),
        (args.workers < 0,
         f"--workers {args.workers}: expected 0 (load in this process) or more worker processes"),
        (args.template is not None and args.template.count("{}") != 1,
         f"--template {args.template!r}: expected exactly one {{}} for the name"),
        (any(name not in protocols.EVAL_DATASETS for name in args.eval_datasets),
         f"--eval-datasets {','.join(args.eval_datasets)}: expected names among "
         f"{', '.join(protocols.EVAL_DATASETS)}"),
        (any("=" not in kv for kv in args.eval_roots.split(",") if kv),
         f"--eval-roots {args.eval_roots!r}: expected NAME=DIR pairs separated by commas"),
        (args.eval_only and bool(args.resume),
         f"--resume continues training, but this run only evaluates: to evaluate {args.resume}, "
         "pass it as --checkpoint"),
        (bool(args.resume) and not os.path.isfile(args.resume),
         f"--resume {args.resume}: "
         f"{'is a folder' if os.path.isdir(args.resume or '') else 'no such file'}; expected the "
         "last.pt of an earlier run (in its --out folder)"),
        (not args.eval_only and args.micro_batch > 0
         and args.batch_size % (args.micro_batch * world) != 0,
         f"--batch-size {args.batch_size} is not a whole number of micro-batches of "
         f"{args.micro_batch} on {world} process(es): choose --micro-batch so that micro-batch x "
         "processes divides the batch"),
        (os.path.exists(args.out) and not os.path.isdir(args.out),
         f"--out {args.out} is a file, not a folder"),
        (bool(args.root) and os.path.isfile(args.root),
         f"--root {args.root} is a file: it must name the folder that {args.dataset} unpacks into "
         "(see docs/data.md)"),
        (args.input_size is not None and args.input_size < 1,
         f"--input-size {args.input_size}: expected pixels > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise vifi.ConfigError(message)
    if args.device:
        vifi.check_device(args.device)
    try:
        data.parse_views(args.views)
    except data.DatasetError as e:  # said as the other flags' errors
        raise vifi.ConfigError(str(e)) from None
    # the default folder: a rerun takes the next free one
    if "out" not in args._given and not args.resume:
        base, n = args.out, 1
        while earlier_run(args):
            n += 1
            args.out = f"{base}-{n}"
        if n > 1:
            print(f"note: {base} holds an earlier run; this one writes to {args.out}", file=sys.stderr)
    check_out(args)


def warn_short_warm_up(args):
    """A run shorter than its warm-up never reaches --lr: said once the flags, data and model are
    accepted, just before training. (A warm-up as long as the run reaches --lr at its end: nothing
    to say.)"""
    if not args.eval_only and args.warmup_epochs > args.epochs:
        top = args.lr * args.epochs / args.warmup_epochs
        print(f"warning: --warmup-epochs {args.warmup_epochs:g} is longer than "
              f"the run ({args.epochs} epochs): the learning rate peaks at "
              f"{top:.3g}, below --lr {args.lr:g}; give --warmup-epochs "
              f"{args.epochs} or fewer to reach it", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Processes

def start(args, world):
    """The process group (under torchrun), this process's device, its autocast and its seeds."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
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
    return engine.Runtime(device, autocast, rank, world)


def pick_device(name, local_rank):
    """'cuda' means this process's GPU, with its index (torch.cuda.set_device refuses a bare
    'cuda')."""
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def rank0_first(fetch, runtime):
    """fetch() on rank 0, then on the others, which find its downloads in place: no two processes
    write one file."""
    result = fetch() if runtime.rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return fetch() if runtime.rank > 0 else result


# --------------------------------------------------------------------------------------------------
# The model

def load_clip(args):
    if args.model == "scratch":
        torch.manual_seed(args.seed)
        return clip_model.CLIP(SCRATCH)
    return clip_model.load(args.model)


def setup_model(args, train_set, tests, runtime):
    """The ViFiCLIP to train or evaluate, on runtime's device. The datasets get the input size it
    takes (they were built before the model was known, so that a wrong --root costs no download)."""
    # An own checkpoint holds its whole model; an official one needs the base CLIP (--model) it was
    # trained from.
    ck = vifi.read_checkpoint(args.checkpoint) if args.checkpoint else None
    own = vifi.load_checkpoint(args.checkpoint, ck=ck) if ck and "vifi" in ck else None
    need_vocab = args.model != "scratch"  # the scratch CLIP reads bytes
    # an own checkpoint holds its CLIP: no model to fetch
    rank0_first(lambda: vifi.fetch_model_files(None if own else args.model, need_vocab), runtime)
    clip = own.clip if own else load_clip(args)
    args.input_size = args.input_size or clip.config.image_resolution
    if args.input_size < clip.config.patch_size:
        raise vifi.ConfigError(f"--input-size {args.input_size} is smaller than one "
                               f"{clip.config.patch_size}-pixel patch of this model")
    for dataset in (train_set, *tests.values()):
        if dataset is not None:
            dataset.size = args.input_size
    classnames = (train_set or next(iter(tests.values()))).classnames
    return build_model(args, clip, classnames, own, ck).to(runtime.device)


def build_model(args, clip, classnames, own=None, ck=None):
    """The ViFiCLIP of the flags, with the name of the pixel mean/std it expects in .norm. own: the
    model of an own --checkpoint; ck: the contents of an official one (its weights go onto
    `clip`)."""
    cfg = vifi.ViFiConfig(mode=args.mode, towers=args.towers, template=args.template,
                          clean_names=args.clean_names, n_ctx_text=args.n_ctx[0],
                          n_ctx_vision=args.n_ctx[-1], depth_text=args.depth[0],
                          depth_vision=args.depth[-1])
    if not args.checkpoint:
        model = vifi.ViFiCLIP(clip, classnames, cfg=cfg)
    else:
        loaded = own or vifi.load_official_checkpoint(args.checkpoint, clip, classnames, ck=ck,
                                                        clean_names=args.clean_names)
        loaded.set_classnames(classnames)
        # Evaluate it as it is, continue its own mode, or build the asked-for mode on its
        # (video-fine-tuned) CLIP, as "bridge and prompt" starts prompting from a fine-tuned model.
        keep = args.eval_only or loaded.mode == args.mode
        model = loaded if keep else vifi.ViFiCLIP(loaded.clip, classnames, cfg=cfg, norm=loaded.norm)
    # ImageNet's mean/std, as the official training and evaluation use, unless --norm or a
    # checkpoint says otherwise
    model.norm = args.norm or (model.norm if args.checkpoint else "imagenet")
    if args.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    return model


# --------------------------------------------------------------------------------------------------
# Training: the epochs, last.pt and --resume (engine.py runs each epoch)

def checkpoint(state, args):
    """last.pt: the weights and what rebuilds their model, the optimizer and scaler, progress, rngs
    and flags."""
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    return {"model": state.model.state_dict(), "vifi": vifi.checkpoint_config(state.model),
            "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
            "epoch": state.epoch, "step": state.step, "best_top1": state.best_top1,
            "best_epoch": state.best_epoch, "log": state.log, "rng": rng,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}


def read_last(path):
    """A last.pt's contents, its entries checked to be what checkpoint() writes
    (archive.CheckpointError if not)."""
    ck = vifi.read_checkpoint(path)
    # best.pt and the official releases lack some of them
    if not {"optimizer", "vifi", "args"} <= ck.keys():
        raise archive.CheckpointError(f"--resume {path}: not a last.pt written by train.py (no "
                                      "optimizer state, model config or flags); to start from its "
                                      "weights, use --checkpoint")
    rng, log = ck.get("rng"), ck.get("log")
    python_rng = rng.get("python") if isinstance(rng, dict) else None
    malformed = [name for name, ok in (
        ("args", isinstance(ck["args"], dict)),
        ("epoch, step, best_epoch", all(type(ck.get(k)) is int for k in ("epoch", "step", "best_epoch"))),
        ("best_top1", isinstance(ck.get("best_top1"), (int, float))),
        ("rng", isinstance(python_rng, tuple) and len(python_rng) == 3 and isinstance(python_rng[1], tuple)
         and torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8),
        ("log", isinstance(log, list) and all(isinstance(r, dict) and type(r.get("epoch")) is int and all(
            isinstance(v, (int, float, str)) for v in r.values()) for r in log))) if not ok]
    if malformed:
        raise not_from_train(path, malformed[0], "the file was edited or written by other code")
    return ck


def not_from_train(path, entry, why):
    """The refusal of a last.pt whose `entry` is not what checkpoint() writes."""
    return archive.CheckpointError(f"--resume {path}: its {entry} entry is not what train.py "
                                   f"writes ({why}); resume from another last.pt, or start from its "
                                   "weights with --checkpoint")


def resume(state, path, args):
    """Continue state from a last.pt written by a run of the same settings: weights, optimizer,
    scaler, progress, rngs."""
    ck = read_last(path)
    saved = (ck["args"].get("dataset"), ck["args"].get("protocol"), ck["vifi"].get("classnames"))
    if saved != (args.dataset, args.protocol, state.model.classnames):
        raise archive.CheckpointError(
            f"--resume {path} continues a {saved[1]} run on {saved[0]} ({len(saved[2] or [])} "
            f"classes), not this {args.protocol} run on {args.dataset} "
            f"({len(state.model.classnames)} classes): resume with the flags of the run that wrote "
            "it, or start from its weights with --checkpoint")
    clip_model.check_state_dict(ck["model"], state.model.state_dict(), path,
                                "the model these flags build: resume with the flags of the run that wrote it")
    state.model.load_state_dict(ck["model"])
    try:
        state.optimizer.load_state_dict(ck["optimizer"])
    except ValueError as e:  # the same weights, but other ones train (--mode, --towers)
        raise archive.CheckpointError(f"--resume {path}: its optimizer state does not fit what these flags "
                                      f"train ({e}); resume with the run's flags") from None
    state.scaler.load_state_dict(ck["scaler"])
    state.epoch, state.step, state.best_top1, state.best_epoch, state.log = (
        ck["epoch"] + 1, ck["step"], ck["best_top1"], ck["best_epoch"], ck["log"])
    try:
        random.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
    except (TypeError, ValueError, RuntimeError) as e:  # the right types, the wrong contents
        raise not_from_train(path, "rng", e) from None
    return ck


def recipe_of(args):
    """The settings engine.py's recipe and loops read, taken once from the resolved flags."""
    names = [f.name for f in dataclasses.fields(engine.Recipe)]
    return engine.Recipe(**{name: getattr(args, name) for name in names})


def fit(model, train_set, tests, args, recipe, runtime):
    """Train from the first epoch (or --resume's) to the last; evaluate as the protocol says; save
    last.pt (and best.pt, log.jsonl, curves.svg) after each epoch. Returns the Training and the
    final evaluation."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                                  eps=1e-8, weight_decay=args.weight_decay,
                                  fused=runtime.device.type == "cuda")
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=args.precision == "fp16")
    state = engine.Training(model, optimizer, scaler)
    if args.resume:
        ck = resume(state, args.resume, args)
        if runtime.rank == 0:  # whatever a kill right after last.pt's rename left unwritten
            write_outputs(ck, args.out)
    wrapped_model = torch.compile(model) if args.compile else model
    if dist.is_initialized():
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped_model = torch.nn.parallel.DistributedDataParallel(wrapped_model,
                                                                  device_ids=device_ids)
    train_loader = engine.loader(train_set, recipe, runtime, train=True)
    tracked_set, results = main_set(tests), None
    engine.warn_short_epoch(train_loader, recipe, runtime)
    for epoch in tqdm(range(state.epoch, recipe.epochs), desc="epochs", initial=state.epoch,
                      total=recipe.epochs, disable=not engine.bars(runtime)):
        state.epoch = epoch
        row = engine.train_one_epoch(state, wrapped_model, train_loader, recipe, runtime)
        if epoch + 1 == recipe.epochs:  # the final evaluation: every test set, the protocol's views
            results = engine.evaluate_all(model, tests, recipe, runtime)
            row.update(top1=results[tracked_set]["top1"], top5=results[tracked_set]["top5"])
        elif args.eval_every and epoch % args.eval_every == 0:  # as the official code: one view
            one_view = {tracked_set: single_view(tests[tracked_set])}
            quick = engine.evaluate_all(model, one_view, recipe, runtime)
            row.update(top1=quick[tracked_set]["top1"], top5=quick[tracked_set]["top5"])
        state.log.append(row)
        if row.get("top1", -1) > state.best_top1:
            state.best_top1, state.best_epoch = row["top1"], epoch + 1
        if runtime.rank == 0:
            ck = checkpoint(state, args)
            save_atomic(ck, os.path.join(args.out, "last.pt"))
            write_outputs(ck, args.out)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
            sys.stdout.flush()  # a log file or a pipe gets each epoch's line when the epoch ends
    return state, results


def main_set(tests):
    """The test set that training reports and that `best` follows: the base classes, else the first
    set."""
    return "base" if "base" in tests else next(iter(tests))


def single_view(dataset):
    """The same test set with one clip and one crop per video: the official code's evaluations
    during training."""
    quick = dataset.subset(dataset.samples)
    quick.clips = quick.crops = 1
    return quick


# --------------------------------------------------------------------------------------------------
# Outputs

# What a run writes into --out (with {name}_list.txt and {name}_labels.csv per set): --overwrite
# removes them first.
OUTPUTS = ("results.json", "last.pt", "best.pt", "log.jsonl", "curves.svg")


def earlier_run(args):
    """The file of an earlier run in --out that this run would replace (results.json or last.pt),
    else None. The folder that holds --resume's last.pt is the run being continued, not an earlier
    one."""
    found = next((name for name in ("results.json", "last.pt")
                  if os.path.isfile(os.path.join(args.out, name))), None)
    if found and args.resume and os.path.samefile(os.path.dirname(args.resume) or ".", args.out):
        return None
    return found


def check_out(args):
    """Refuse to replace an earlier run in --out unless --overwrite says so: a finished result is
    never lost silently (checked with the flags, and again under the folder's lock)."""
    found = earlier_run(args)
    if found and not args.overwrite:
        resume = (f"continue it with --resume {os.path.join(args.out, 'last.pt')}, "
                  if found == "last.pt" else "")
        raise vifi.ConfigError(f"--out {args.out} already holds a run ({found}): {resume}replace it with "
                               "--overwrite, or choose another --out")


@contextlib.contextmanager
def own_out(args):
    """Rank 0 holds --out's lock for the whole run (archive.lock_folder), then checks again that it
    replaces no earlier run, removes the temp files of a killed one, and with --overwrite that run's
    files: none of them mixes into this run's."""
    try:
        with archive.lock_folder(args.out, "--out"):
            check_out(args)
            archive.remove_temps(args.out)
            if args.overwrite:
                for path in [*(os.path.join(args.out, n) for n in OUTPUTS),
                             *glob.glob(os.path.join(glob.escape(args.out), "*_list.txt")),
                             *glob.glob(os.path.join(glob.escape(args.out), "*_labels.csv"))]:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            yield
    except archive.FolderInUse as e:
        raise vifi.ConfigError(str(e)) from None


def write_outputs(ck, out):
    """best.pt (when the checkpoint's epoch is the best), log.jsonl and curves.svg, each rebuilt
    whole from a last.pt checkpoint `ck`, after it is saved: a run killed between two of these
    writes has them all back on --resume."""
    # what evaluation and fine-tuning need; resuming reads last.pt
    if ck["best_epoch"] == ck["epoch"] + 1:
        save_atomic({k: ck[k] for k in ("model", "vifi", "epoch", "best_top1", "best_epoch", "args")},
                    os.path.join(out, "best.pt"))
    with archive.replacing(os.path.join(out, "log.jsonl")) as f:
        f.writelines(json.dumps(row) + "\n" for row in ck["log"])
    try:
        report.write_curves(ck["log"], os.path.join(out, "curves.svg"))
    except OSError as e:  # a picture of log.jsonl: not worth stopping a run, its checkpoint is safe
        print(f"warning: could not write {os.path.join(out, 'curves.svg')} ({e.strerror or e}); "
              "training goes on, and log.jsonl holds the same numbers", file=sys.stderr)


@contextlib.contextmanager
def interrupt_after():
    """Hold a Ctrl-C until the block ends, then raise it: inside torch.save it would surface as a
    RuntimeError from torch's writer, indistinguishable from a failed write."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save_atomic(obj, path):
    """torch.save through archive.replacing: a crash mid-write never leaves a half checkpoint under
    the real name, a Ctrl-C waits for the file to be whole, and a failed write (a full disk, a
    quota) leaves no temp file and says what happened."""
    try:
        with interrupt_after(), archive.replacing(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("...")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short"
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise archive.CheckpointError(
            f"could not write {path} ({reason}; {free / 2**20:.1f} MiB free on its disk): "
            "free some space or choose another --out. Any earlier "
            f"{os.path.basename(path)} there is intact.") from None


def write_results(args, model, train_set, state, results, wall_time):
    """results.json and the table on stdout. state: the Training, None when the run only
    evaluated."""
    log = state.log if state else []
    best = None
    if state and state.best_epoch:
        best = dict(set=main_set(results), top1=state.best_top1, epoch=state.best_epoch)
    summary = dict(protocol=args.protocol, dataset=args.dataset, splits=protocols.splits_used(args),
                   model=args.model, mode=args.mode, checkpoint=args.checkpoint, norm=model.norm,
                   frames=args.frames, input_size=args.input_size, views=args.views,
                   test_clips=data.describe_test_clips(data.parse_views(args.views)[0]),
                   train_videos=len(train_set) if train_set is not None else 0, classes=len(model.classnames),
                   # unreadable videos replaced, all epochs
                   train_failures=sum(r.get("failures", 0) for r in log),
                   epochs=args.epochs, wall_time_s=wall_time, results=results, best=best,
                   paper_reports=protocols.REPORTED[args.protocol],
                   settings={k: v for k, v in vars(args).items() if not k.startswith("_")})
    with archive.replacing(os.path.join(args.out, "results.json")) as f:
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
            print(f"{name:<20}{'mean':>8}{'':>9}{r['mean_top1']:>9.2f}  ± {r['std_top1']:.2f} "
                  f"(over n - 1: {r['std_top1_sample']:.2f})")
    if best:
        paper = "" if args.protocol == "synthetic" else ("; the paper's tables report the "
                                                         f"{protocols.REPORTED[args.protocol]} "
                                                         f"one for {args.protocol}")
        print(f"best {best['set']} top-1 {best['top1']:.2f} after epoch {best['epoch']}{paper}")
    print(f"results in {args.out}/results.json")


# --------------------------------------------------------------------------------------------------

def main(args):
    t_start = time.time()
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world)
    runtime = start(args, world)
    # The data first (folders, split files, lists, a readable video), so that a wrong --root costs
    # no download.
    protocols.check_data(args)
    also = [f"{url} -> {path}" for url, path, _ in vifi.model_files(args.model, args.model != "scratch")
            if not os.path.isfile(path)]  # offline: named in the same message as the split files
    splits_dir = rank0_first(lambda: protocols.fetch_splits(args, also), runtime)
    train_set, tests = protocols.datasets(args, splits_dir)
    protocols.check_readable({"train": train_set, **tests})
    model = setup_model(args, train_set, tests, runtime)
    recipe = recipe_of(args)
    with own_out(args) if runtime.rank == 0 else contextlib.nullcontext():
        if runtime.rank == 0:
            for name, ds in {"train": train_set, **tests}.items():
                if ds is not None:
                    data.write_list(ds, os.path.join(args.out, f"{name}_list.txt"),
                                    os.path.join(args.out, f"{name}_labels.csv"))
            warn_short_warm_up(args)
        state, results = None, None
        if not args.eval_only:
            state, results = fit(model, train_set, tests, args, recipe, runtime)
        if results is None:  # evaluation only, or resumed after the last epoch
            results = engine.evaluate_all(model, tests, recipe, runtime)
        if runtime.rank == 0:
            write_results(args, model, train_set, state, results, time.time() - t_start)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


def interrupted(args):
    """The line Ctrl-C prints: where last.pt is and the command that continues from it."""
    last = os.path.join(args.out, "last.pt") if args else None
    if not last or not os.path.isfile(last):
        return "interrupted before the first epoch ended: nothing to resume; run the command again"
    command = ["python", "train.py", "--resume", last, *(["--device", args.device] if args.device else [])]
    return f"interrupted: {last} holds the last finished epoch; continue with: {shlex.join(command)}"


if __name__ == "__main__":
    args = None
    try:
        args = get_args()
        main(args)
    except KeyboardInterrupt:
        print(f"\n{interrupted(args)}", file=sys.stderr)
        sys.exit(130)
    except (data.DatasetError, archive.CheckpointError, clip_model.ModelError, tokenizer.VocabError,
            vifi.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
