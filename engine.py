"""
The training recipe and the loops under train.py: mixing, the learning rate and the soft-target
cross-entropy of the official code; one epoch of training, and the evaluation of test sets, on one
process or many.

Recipe holds the settings these read, built once by train.py from its flags; Runtime says where this
process runs; Training holds what training changes (the model, its optimizer and gradient scaler,
and the progress that last.pt saves). Batches come from a DataLoader whose EpochSampler gives each
process its share of the videos. Unreadable videos arrive in the batches' "failed" field (data.py),
and a FailureLog counts them over all processes.
"""
import contextlib
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data


@dataclass(frozen=True)
class Recipe:
    """What the recipe and the loops read, fixed for the whole run (train.recipe_of builds it)."""
    lr: float  # the peak learning rate, for the whole batch
    epochs: int
    warmup_epochs: float  # a linear warm-up from 0 over this many epochs
    label_smoothing: float
    mixup: float  # Mixup's Beta(alpha, alpha); 0: off
    cutmix: float  # CutMix's Beta(alpha, alpha); 0: off
    mix_switch: float  # the probability of CutMix when both are on
    batch_size: int  # clips per optimizer step, over all processes
    micro_batch: int  # clips per forward on one device
    seed: int  # the order of the videos and the keys of their augmentation
    workers: int  # DataLoader worker processes
    views: str  # the test views, CLIPSxCROPS, reported with each evaluation
    out: str  # the run's folder, named when the loss stops being finite


@dataclass
class Runtime:
    """Where this process runs and its share of the work: fixed once the run has started."""
    device: torch.device
    autocast: contextlib.AbstractContextManager  # torch.autocast(--precision), or a null context
    rank: int = 0  # this process's number (torchrun sets RANK)
    world: int = 1  # how many processes share the run (WORLD_SIZE); DDP when more than one


@dataclass
class Training:
    """What training changes, and what last.pt saves to resume it (train.py's checkpoint)."""
    model: torch.nn.Module  # a vifi.ViFiCLIP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps so far
    epoch: int = 0  # the epoch in training (0-based); after a resume, the next one
    best_top1: float = -1.0
    best_epoch: int = 0  # 1-based; 0: no evaluation yet
    log: list = field(default_factory=list)  # one row per epoch


# --------------------------------------------------------------------------------------------------
# The training recipe of the official code: its mixup / cutmix with label smoothing, timm's cosine
# schedule, and the cross-entropy against the mixed targets

MIX_GROUP = 4  # clips per GPU in the official runs: each GPU mixes its own batch of 4


def mix(video, labels, num_classes, recipe):
    """Mixup / CutMix with label smoothing as the official datasets/blending.py
    (CutmixMixupBlending, called from main.py; not timm's): the clips are mixed within groups of
    MIX_GROUP, the official per-GPU batch, whatever --micro-batch is, each group with its own draws
    (mix_group). The same box for every frame. video: (B, T, 3, H, W) float, labels: (B,) -> mixed
    video, soft targets (B, C)."""
    off = recipe.label_smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=video.device)
    target.scatter_(1, labels[:, None], 1 - recipe.label_smoothing + off)
    pairs = zip(video.split(MIX_GROUP), target.split(MIX_GROUP))
    groups = [mix_group(v, t, recipe) for v, t in pairs]
    return torch.cat([v for v, _ in groups]), torch.cat([t for _, t in groups])


def mix_group(video, target, recipe):
    """One group: CutMix with probability mix_switch, else Mixup; lambda ~ Beta(alpha, alpha); each
    clip's partner from a random permutation of the group (a clip may meet itself, as with the
    official torch.randperm). CutMix: a box of sides sqrt(1 - lambda) of the frame's, centred on a
    uniform pixel and cut at the borders (so on average 0.32 of the frame is pasted, not 0.5), and
    lambda recomputed from the box that was pasted."""
    use_cutmix = recipe.cutmix > 0 and (recipe.mixup <= 0 or random.random() < recipe.mix_switch)
    alpha = recipe.cutmix if use_cutmix else recipe.mixup
    if alpha <= 0:
        return video, target
    lam = random.betavariate(alpha, alpha)
    partner = torch.tensor(random.sample(range(len(video)), len(video)), device=video.device)
    if use_cutmix:
        H, W = video.shape[-2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cx, cy = random.randrange(W), random.randrange(H)
        x0, x1 = max(cx - w // 2, 0), min(cx + w // 2, W)
        y0, y1 = max(cy - h // 2, 0), min(cy + h // 2, H)
        video = video.clone()
        video[..., y0:y1, x0:x1] = video[partner][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the share of the pixels kept
    else:
        video = lam * video + (1 - lam) * video[partner]
    return video, lam * target + (1 - lam) * target[partner]


def learning_rate(progress, recipe):
    """The official schedule (timm's CosineLRScheduler as the official code sets it up) after
    `progress` epochs of training: a linear warm-up from 0 over warmup_epochs, and a cosine from
    --lr down to --lr / 100 over the whole run. The cosine is measured from the run's start, not
    from the warm-up's end (timm's warmup_prefix is off), so right after the warm-up the rate is
    already below the peak. A function of progress alone: the same curve on any number of GPUs and
    any micro-batch."""
    if progress < recipe.warmup_epochs:
        return recipe.lr * progress / recipe.warmup_epochs
    floor = recipe.lr / 100
    cosine = math.cos(math.pi * min(progress / recipe.epochs, 1.0))
    return floor + 0.5 * (recipe.lr - floor) * (1 + cosine)


def soft_target_cross_entropy(logits, target):
    """The loss against mixed, smoothed targets: logits, target (B, C) -> the batch's mean."""
    return torch.sum(-target * logits.float().log_softmax(-1), dim=-1).mean()


# --------------------------------------------------------------------------------------------------
# Batches

class EpochSampler(torch.utils.data.Sampler):
    """This process's share of the indices: shuffled by (seed, epoch) for training, so a resumed run
    sees the same order; in order and never padded for evaluation, so every video counts exactly
    once on any number of GPUs."""

    def __init__(self, n, rank, world, shuffle, seed=0):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.epoch = 0

    def indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world))
        seed = self.seed * 1000 + self.epoch
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        # equal shares: every process makes the same steps
        keep = max(self.n // self.world, 1) * self.world
        return order.repeat(math.ceil(keep / self.n))[:keep][self.rank::self.world].tolist()

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices())
        # Each training sample draws its augmentation from its own key (data.VideoDataset's
        # __getitem__): the same in any worker process and with any number of workers, so a resumed
        # run is exact.
        return iter((i, f"{self.seed}/{self.epoch}/{i}") for i in self.indices())

    def __len__(self):
        return len(self.indices())


def bars(runtime):
    """Progress bars only for someone watching a terminal, on rank 0. Piped or redirected output
    gets plain lines instead (one per epoch, train.py's, and one per evaluation), not the carriage
    returns and escape codes that redraw a bar."""
    return runtime.rank == 0 and sys.stderr.isatty()


def loader(dataset, recipe, runtime, train):
    sampler = EpochSampler(len(dataset), runtime.rank, runtime.world, train, recipe.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=recipe.micro_batch, sampler=sampler, num_workers=recipe.workers,
        pin_memory=runtime.device.type == "cuda", persistent_workers=recipe.workers > 0,
        prefetch_factor=4 if recipe.workers > 0 else None)


class FailureLog:
    """The unreadable videos that the batches report (their "failed" field, see data.py), counted
    over all processes. The run stops once more than 5 % of the videos, and at least 10, have
    failed: a few bad files in a small few-shot set cost nothing, a wrong --root stops at once
    (data.py raises after max_retries + 1 = 11 unreadable videos in a row)."""

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
            raise data.DatasetError(f"{len(self.failures)} of {self.num_videos} videos could not "
                                    f"be read (more than 5 % and at least 10); is --root right? "
                                    f"{self.report()}")

    def report(self, first=5):
        lines = list(self.failures)[:first]
        return f"{len(self.failures)} unreadable, first: " + "; ".join(lines) if lines else ""


# --------------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(state, wrapped_model, loader, recipe, runtime):
    """One pass over `loader`, an optimizer step every batch_size clips (over all processes), the
    learning rate set after each step. The micro-batches after the last whole accumulation group are
    not run: the official code computes them and zeroes their gradients at the next epoch's start,
    so an epoch takes floor(micro-batches / accumulation) steps (steps_per_epoch). wrapped_model:
    the model as it runs (compiled, wrapped in DDP, or state.model itself). Returns the log row."""
    state.model.train()
    loader.sampler.epoch, batches = state.epoch, len(loader)  # micro-batches per epoch
    accum = accumulation(recipe, runtime)  # micro-batches per optimizer step
    used = min(steps_per_epoch(batches, accum) * accum, batches)  # micro-batches run
    group = min(accum, used)  # micro-batches per step: fewer only in an epoch shorter than a batch
    mean, std = data.NORMS[state.model.norm]
    failures, seen, t0, losses = FailureLog(len(loader.dataset)), 0, time.time(), []
    # The rate in force: the one set after the last optimizer step (0 before the first, as timm's).
    for g in state.optimizer.param_groups:
        g["lr"] = learning_rate(max(state.epoch - 1 / batches, 0.0), recipe)
    ddp = isinstance(wrapped_model, torch.nn.parallel.DistributedDataParallel)
    bar = tqdm(itertools.islice(loader, used), total=used, desc=f"epoch {state.epoch + 1}",
               leave=False, disable=not bars(runtime))
    for i, batch in enumerate(bar):
        failures.update(batch["failed"])
        # colour jitter and grayscale happen here, on the device, with each clip's own matrix
        video = data.normalize(batch["video"].to(runtime.device, non_blocking=True), mean, std,
                               colour=batch["colour"].to(runtime.device, non_blocking=True))
        labels = batch["label"].to(runtime.device)
        video, target = mix(video, labels, len(state.model.classnames), recipe)
        last = (i + 1) % group == 0
        # DDP: one all-reduce per optimizer step
        with wrapped_model.no_sync() if ddp and not last else contextlib.nullcontext():
            with runtime.autocast:
                logits = wrapped_model(video)
            loss = soft_target_cross_entropy(logits, target)
            state.scaler.scale(loss / group).backward()
        losses.append(loss.detach())
        seen += len(video) * runtime.world
        if last:
            step_loss = torch.stack(losses[-group:]).mean().item()  # one sync per optimizer step
            if not math.isfinite(step_loss):
                stop_non_finite(step_loss, state, recipe)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            # timm's step_update(epoch * n + i): the progress at micro-batch i
            for g in state.optimizer.param_groups:
                g["lr"] = learning_rate(state.epoch + i / batches, recipe)
            rate = state.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{rate:.2e}",
                            clips_per_s=f"{seen / (time.time() - t0):.1f}")
    if failures.gather(runtime.world).failures and runtime.rank == 0:
        tqdm.write(f"epoch {state.epoch + 1}: unreadable videos were replaced by others: "
                   f"{failures.report()}")
    return dict(epoch=state.epoch + 1, step=state.step, loss=torch.stack(losses).mean().item(),
                lr=state.optimizer.param_groups[0]["lr"], clips_per_s=seen / (time.time() - t0),
                failures=len(failures.failures))


def stop_non_finite(step_loss, state, recipe):
    """A loss that is nan or inf ends the run, saying where its last good weights are."""
    kept = (f"the last good checkpoint is {recipe.out}/last.pt" if state.log else
            "no checkpoint was written yet (none is, before the first epoch ends)")
    raise FloatingPointError(f"loss is {step_loss} at optimizer step {state.step + 1} (epoch "
                             f"{state.epoch + 1}); stopped; {kept}. Try a lower --lr or "
                             "--precision fp32")


def accumulation(recipe, runtime):
    """Micro-batches per optimizer step: batch_size clips over all processes."""
    return recipe.batch_size // (recipe.micro_batch * runtime.world)


def steps_per_epoch(batches, accum):
    """Optimizer steps of an epoch of `batches` micro-batches, `accum` to a step: the whole groups
    only, as the official code (8 GPUs x 4 clips with drop_last and accumulation; docs/protocols.md
    has the table for each protocol). An epoch shorter than one batch takes one step of all of it,
    where the official code would train nothing."""
    return max(batches // accum, 1)


def warn_short_epoch(loader, recipe, runtime):
    """Says, on rank 0, when an epoch is shorter than one batch (steps_per_epoch's one step)."""
    if len(loader) < accumulation(recipe, runtime) and runtime.rank == 0:  # micro-batches
        print(f"warning: {len(loader.dataset)} training videos are less than one batch of "
              f"{recipe.batch_size}: each epoch takes one optimizer step of all of them (the "
              "official code would take none)", file=sys.stderr)


@torch.no_grad()
def evaluate(model, dataset, recipe, runtime, desc="eval"):
    """Softmax per view, averaged over views; top-1 / top-5 over every video exactly once, summed
    over processes."""
    model.eval()
    failures = FailureLog(len(dataset))
    mean, std = data.NORMS[model.norm]
    # top-1 hits, top-5 hits, readable videos
    counts, t0 = torch.zeros(3, device=runtime.device), time.time()
    for batch in tqdm(loader(dataset, recipe, runtime, train=False), desc=desc, leave=False,
                      disable=not bars(runtime)):
        failures.update(batch["failed"])
        video = data.normalize(batch["video"].to(runtime.device, non_blocking=True), mean, std)
        with runtime.autocast:
            probs = model.predict(video)  # (B, V, T, 3, H, W) -> (B, C)
        top5 = probs.topk(min(5, probs.shape[1]), dim=-1).indices.cpu()
        # -1 for an unreadable video: it matches no class and is not counted
        labels = batch["label"][:, None]
        hits = [(top5[:, :1] == labels).sum(), (top5 == labels).sum(), (labels >= 0).sum()]
        counts += torch.tensor(hits, device=runtime.device)
    if runtime.world > 1:
        dist.all_reduce(counts)
    failures.gather(runtime.world)
    hits1, hits5, n = counts.tolist()
    if runtime.rank == 0 and not bars(runtime):
        print(f"{desc}: top-1 {100 * hits1 / max(n, 1):.2f} top-5 {100 * hits5 / max(n, 1):.2f} "
              f"over {int(n)} videos ({time.time() - t0:.1f} s)", flush=True)
    return dict(top1=100 * hits1 / max(n, 1), top5=100 * hits5 / max(n, 1), videos=int(n),
                classes=len(dataset.classnames), views=recipe.views,
                failures=len(failures.failures), failed_first=list(failures.failures)[:5])


def evaluate_all(model, tests, recipe, runtime):
    """{name: evaluate(...)} of each test set with its own class list (base / novel / other
    datasets), the model's own list restored afterwards; and the harmonic mean of base and novel,
    the mean and std of folds."""
    results, own = {}, model.classnames
    for name, dataset in tests.items():
        model.set_classnames(dataset.classnames)  # the text cache follows
        results[name] = evaluate(model, dataset, recipe, runtime, f"eval {name}")
    model.set_classnames(own)
    if {"base", "novel"} <= results.keys():  # base-to-novel: the harmonic mean of the two halves
        b, n = results["base"]["top1"], results["novel"]["top1"]
        results["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    folded = [k for k in results if k.rsplit("-", 1)[-1].startswith(("fold", "subset"))]
    for group in {k.rsplit("-", 1)[0] for k in folded}:
        accs = torch.tensor([v["top1"] for k, v in results.items() if k.startswith(group + "-")])
        # The official code computes no std (each fold is its own run) and the paper does not say
        # which one its "mean ± std" is: std_top1 divides by n (numpy's np.std), std_top1_sample by
        # n - 1.
        results[group] = dict(mean_top1=accs.mean().item(),
                              std_top1=accs.std(unbiased=False).item(),
                              std_top1_sample=accs.std(unbiased=True).item())
    return results
