"""
The loops under train.py: one epoch of training, and the evaluation of test sets, on one process or many.

Runtime says where this process runs; Training holds what training changes (the model, its optimizer and gradient
scaler, and the progress that last.pt saves). Batches come from a DataLoader whose EpochSampler gives each process
its share of the videos. Unreadable videos arrive in the batches' "failed" field (data.py), and a FailureLog counts
them over all processes. Mixup and the learning rate follow the protocol (protocols.py).
"""
import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import protocols


@dataclass
class Runtime:
    """Where this process runs and its share of the work: fixed once the run has started."""
    device: torch.device
    autocast: contextlib.AbstractContextManager  # torch.autocast with the --precision dtype, or a null context
    rank: int = 0  # this process's number (torchrun sets RANK)
    world: int = 1  # how many processes share the run (WORLD_SIZE); DDP when more than one


@dataclass
class Training:
    """What training changes, and what last.pt saves to resume it (train.py's checkpoint and resume)."""
    model: torch.nn.Module  # a vifi.ViFiCLIP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer steps so far
    epoch: int = 0  # the epoch in training (0-based); after a resume, the next one
    best_top1: float = -1.0
    best_epoch: int = 0  # 1-based; 0: no evaluation yet
    log: list = field(default_factory=list)  # one row per epoch


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


def bars(rt):
    """Progress bars only for someone watching a terminal, on rank 0. Piped or redirected output gets plain lines
    instead (one per epoch, train.py's, and one per evaluation), not the carriage returns and escape codes that
    redraw a bar."""
    return rt.rank == 0 and sys.stderr.isatty()


def loader(dataset, args, rt, train):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.micro_batch, sampler=EpochSampler(len(dataset), rt.rank, rt.world, train, args.seed),
        num_workers=args.workers, pin_memory=rt.device.type == "cuda", persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)


class FailureLog:
    """The unreadable videos that the batches report (their "failed" field, see data.py), counted over all processes.
    The run stops once more than 5 % of the videos, and at least 10, have failed: a few bad files in a small few-shot
    set cost nothing, a wrong --root stops at once (data.py raises after max_retries + 1 = 11 unreadable videos in a row)."""

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


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(t, forward, loader, args, rt):
    """One pass over `loader`, an optimizer step every batch_size clips (over all processes), the learning rate set
    after each step. The micro-batches after the last whole accumulation group are not run: the official code
    computes them and zeroes their gradients at the next epoch's start, so an epoch takes floor(micro-batches /
    accumulation) steps (steps_per_epoch). forward: the model as it runs (compiled, wrapped in DDP, or t.model).
    Returns the log row."""
    t.model.train()
    loader.sampler.epoch, batches = t.epoch, len(loader)  # micro-batches per epoch
    accum = args.batch_size // (args.micro_batch * rt.world)  # micro-batches per optimizer step
    used = min(steps_per_epoch(batches, accum) * accum, batches)  # micro-batches run
    group = min(accum, used)  # micro-batches per step: fewer only in an epoch shorter than one batch
    mean, std = data.NORMS[t.model.norm]
    failures, seen, t0, losses = FailureLog(len(loader.dataset)), 0, time.time(), []
    # The rate in force: the one set after the last optimizer step so far (0 before the first, as timm's).
    for g in t.optimizer.param_groups:
        g["lr"] = protocols.learning_rate(max(t.epoch - 1 / batches, 0.0), args)
    ddp = isinstance(forward, torch.nn.parallel.DistributedDataParallel)
    bar = tqdm(itertools.islice(loader, used), total=used, desc=f"epoch {t.epoch + 1}", leave=False,
               disable=not bars(rt))
    for i, batch in enumerate(bar):
        failures.update(batch["failed"])
        # colour jitter and grayscale happen here, on the device, with each clip's own matrix (data.normalize)
        video = data.normalize(batch["video"].to(rt.device, non_blocking=True), mean, std,
                               colour=batch["colour"].to(rt.device, non_blocking=True))
        video, target = protocols.mix(video, batch["label"].to(rt.device), len(t.model.classnames), args)
        last = (i + 1) % group == 0
        with forward.no_sync() if ddp and not last else contextlib.nullcontext():  # DDP: one all-reduce per step
            with rt.autocast:
                logits = forward(video)
            loss = torch.sum(-target * logits.float().log_softmax(-1), dim=-1).mean()  # soft-target cross-entropy
            t.scaler.scale(loss / group).backward()
        losses.append(loss.detach())
        seen += len(video) * rt.world
        if last:
            step_loss = torch.stack(losses[-group:]).mean().item()  # one sync per optimizer step
            if not math.isfinite(step_loss):
                kept = (f"the last good checkpoint is {args.out}/last.pt" if t.log else
                        "no checkpoint was written yet (none is, before the first epoch ends)")
                raise FloatingPointError(f"loss is {step_loss} at optimizer step {t.step + 1} (epoch {t.epoch + 1}); "
                                         f"stopped; {kept}. Try a lower --lr or --precision fp32")
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            t.step += 1
            for g in t.optimizer.param_groups:  # timm's step_update(epoch * n + i): progress at micro-batch i
                g["lr"] = protocols.learning_rate(t.epoch + i / batches, args)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{t.optimizer.param_groups[0]['lr']:.2e}",
                            clips_per_s=f"{seen / (time.time() - t0):.1f}")
    if failures.gather(rt.world).failures and rt.rank == 0:
        tqdm.write(f"epoch {t.epoch + 1}: unreadable videos were replaced by others: {failures.report()}")
    return dict(epoch=t.epoch + 1, step=t.step, loss=torch.stack(losses).mean().item(),
                lr=t.optimizer.param_groups[0]["lr"], clips_per_s=seen / (time.time() - t0),
                failures=len(failures.failures))


def steps_per_epoch(batches, accum):
    """Optimizer steps of an epoch of `batches` micro-batches, `accum` to a step: the whole groups only, as the
    official code (8 GPUs x 4 clips with drop_last and accumulation; see README's table for each protocol). An
    epoch shorter than one batch takes one step of all of it, where the official code would train nothing."""
    return max(batches // accum, 1)


@torch.no_grad()
def evaluate(model, dataset, args, rt, desc="eval"):
    """Softmax per view, averaged over views; top-1 / top-5 over every video exactly once, summed over processes."""
    model.eval()
    failures = FailureLog(len(dataset))
    mean, std = data.NORMS[model.norm]
    counts, t0 = torch.zeros(3, device=rt.device), time.time()  # top-1 hits, top-5 hits, readable videos
    for batch in tqdm(loader(dataset, args, rt, train=False), desc=desc, leave=False, disable=not bars(rt)):
        failures.update(batch["failed"])
        video = data.normalize(batch["video"].to(rt.device, non_blocking=True), mean, std)
        with rt.autocast:
            probs = model.predict(video)  # (B, V, T, 3, H, W) -> (B, C)
        top5 = probs.topk(min(5, probs.shape[1]), dim=-1).indices.cpu()
        labels = batch["label"][:, None]  # -1 for an unreadable video: it matches no class and is not counted
        counts += torch.tensor([(top5[:, :1] == labels).sum(), (top5 == labels).sum(), (labels >= 0).sum()],
                               device=rt.device)
    if rt.world > 1:
        dist.all_reduce(counts)
    failures.gather(rt.world)
    hits1, hits5, n = counts.tolist()
    if rt.rank == 0 and not bars(rt):
        print(f"{desc}: top-1 {100 * hits1 / max(n, 1):.2f} top-5 {100 * hits5 / max(n, 1):.2f} over {int(n)} videos "
              f"({time.time() - t0:.1f} s)", flush=True)
    return dict(top1=100 * hits1 / max(n, 1), top5=100 * hits5 / max(n, 1), videos=int(n),
                classes=len(dataset.classnames), views=args.views, failures=len(failures.failures),
                failed_first=list(failures.failures)[:5])


def evaluate_all(model, tests, args, rt):
    """{name: evaluate(...)} of each test set with its own class list (base / novel / other datasets), the
    model's own list restored afterwards; and the harmonic mean of base and novel, the mean and std of folds."""
    results, own = {}, model.classnames
    for name, dataset in tests.items():
        model.set_classnames(dataset.classnames)  # the text cache follows
        results[name] = evaluate(model, dataset, args, rt, f"eval {name}")
    model.set_classnames(own)
    if {"base", "novel"} <= results.keys():  # base-to-novel: the harmonic mean of the two halves
        b, n = results["base"]["top1"], results["novel"]["top1"]
        results["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    for group in {k.rsplit("-", 1)[0] for k in results if k.rsplit("-", 1)[-1].startswith(("fold", "subset"))}:
        accs = torch.tensor([v["top1"] for k, v in results.items() if k.startswith(group + "-")])
        # The official code computes no std (each fold is its own run) and the paper does not say which one its
        # "mean ± std" is: std_top1 divides by n (numpy's np.std), std_top1_sample by n - 1.
        results[group] = dict(mean_top1=accs.mean().item(), std_top1=accs.std(unbiased=False).item(),
                              std_top1_sample=accs.std(unbiased=True).item())
    return results
