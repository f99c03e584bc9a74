"""
How fast ViFi-CLIP trains and evaluates, how much memory a step takes, and whether the data pipeline
keeps up. Random weights with the real sizes (no download) and synthetic inputs, on cuda if present,
else the CPU.

    python bench.py                   # ViT-B/16 at 224 (hours on a CPU: use --small there)
    python bench.py --compile         # the torch.compile variants too
    python bench.py --small           # a small CLIP, tiny videos: seconds on a CPU (tests run it)
    python bench.py --json out.json   # every number, with the device, torch version and date
    python bench.py --e2e             # the data path end to end (below); --small: a tiny version

What is timed (median of timed repeats after warm-up, the device synchronized around each repeat):
  vision train / infer  CLIP's image tower on 256 frames (32 clips x 8) at 224: forward, backward,
                        AdamW (fused on CUDA); and a no-grad forward
  vifi train C=101/400  the whole ViFi-CLIP step on 32 clips x 8 frames: all C class prompts through
                        the text tower (it trains, so they are encoded every step), cross-entropy
                        over the (B, C) logits, AdamW
  vifi train, official  the baseline: the same weights and step run as the official code runs them
                        (OpenAI's model.py layout, nn.MultiheadAttention math, all 77 tokens of
                        every prompt, every step)
  vifi eval             the same forward in eval mode: text features come from the cache
  memory                a training step at 32 frames per clip with and without activation
                        checkpointing. CUDA: torch.cuda.max_memory_allocated; CPU (Linux): the peak
                        resident memory (VmHWM, reset through /proc/self/clear_refs), approximate
                        since malloc may keep freed pages. Both count from before the model is
                        built: weights, grads, AdamW state, activations
  data                  clips/s of one worker (one thread, as in a DataLoader worker) on generated
                        UCF101-like (320x240, 7 s, MPEG-4 AVI) and Kinetics-like (340x256, 10 s,
                        H.264 MP4) videos: decoding the sampled frames alone vs the training
                        pipeline (decode + TSN sample + augment, uint8 out)
  e2e                   tools.py prepare's trade-off on Kinetics-like videos, smooth and textured:
                        keyframe interval x x264 CRF -> one worker's clips/s at T = 16 against the
                        original's (the files take turns, medians), bytes, PSNR of the frames
                        against the original's; DataLoader worker scaling, 1 to all cores, original
                        and prepared; train.py's own loop (2 epochs of >= 50 steps, the second
                        timed) over each, against the same loop on clips held in memory. The model:
                        ViT-B/16 with random weights at micro-batch 32 on a GPU; train.py's small
                        scratch CLIP on a CPU
FLOPs are those the code runs, counted from the shapes (image_flops, text_flops); a training step is
3x the forward (the recompute of checkpointing is not counted, as usual for MFU). MFU divides by the
peak of a large matmul measured in this run: bf16 on CUDA (what autocast runs the model in), fp32 on
CPU (the model runs in fp32 there).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import clip_model
import data
import tokenizer
import tools
import train
import vifi

# Sizes of a full run and of --small. Frames = clips x T; mem_* is the memory test at 32 frames per
# clip. --small has fewer classes: 400 prompts through its text tower would outweigh a step's 8 tiny
# frames many times over.
FULL = dict(small=False, res=224, clips=32, T=8, classes=(101, 400), mem_clips=8, mem_T=32,
            data_T=(8, 32), data_size=224, matmul=8192, warmup=3, repeats=10)
PEAK_REPEATS = 10  # matmuls timed for the peak (at least; --repeats more)
SMALL = dict(small=True, res=32, clips=2, T=4, classes=(10, 40), mem_clips=2, mem_T=8,
             data_T=(8, 32), data_size=32, matmul=512, warmup=1, repeats=3)
# --e2e: the trade-off grid of tools.py prepare, (keyframe interval, x264 CRF, fastdecode) on
# Kinetics-like videos; reads per file and round x rounds; the textured video's noise (grey levels,
# standard deviation); train.py's loop per device: micro-batch, worker processes, optimizer steps
# per epoch, input size; clips per worker when scaling.
PREPARE_GRID = [(k, q, True) for k in (1, 4, 8, 16) for q in (17, 20, 23)] + [(8, 20, False)]
TEXTURE = 30
E2E_GPU = dict(micro_batch=32, workers=os.cpu_count(), steps=50, size=224, clips_per_worker=48)
E2E_CPU = dict(micro_batch=2, workers=os.cpu_count(), steps=50, size=32, clips_per_worker=24)
FULL.update(prepare_grid=PREPARE_GRID, prepare_reads=(8, 3))
SMALL.update(prepare_grid=[(4, 20, True), (8, 20, False)], prepare_reads=(2, 1),
             e2e=dict(micro_batch=2, workers=2, steps=3, clips_per_worker=4))
# --small's model: train.py's scratch CLIP with CLIP's vocabulary and 77-token context, so that
# class prompts tokenize and pad as they do for the real models.
SMALL_CLIP = dataclasses.replace(train.SCRATCH, vocab_size=clip_model.CLIPConfig().vocab_size,
                                 context_length=77)


# --------------------------------------------------------------------------------------------------
# FLOPs from shapes (2 per multiply-add). Layer norms, softmax, GELU and residual adds are left out:
# a few %.

def block_flops(width, tokens, queries):
    """Forward FLOPs of one block over a sequence of `tokens` tokens of `width` channels whose first
    `queries` outputs are computed (all of them but in the image tower's last block, which computes
    the class token alone)."""
    return (2 * tokens * width * 3 * width          # q, k, v of every token: one packed projection
            + 2 * 2 * queries * tokens * width      # q @ k^T and attention @ v, all heads together
            + 2 * queries * width * width           # output projection
            + 2 * 2 * queries * width * 4 * width)  # MLP: width -> 4 width -> width


def transformer_flops(width, layers, tokens):
    """Forward FLOPs of `layers` full blocks over one sequence of `tokens` tokens."""
    return layers * block_flops(width, tokens, tokens)


def image_flops(cfg, res):
    """Forward FLOPs the image tower runs for one frame: patch embedding, the ViT whose last block
    computes only the class token, the class token's projection. Published counts run every token
    through every block: ~6% more."""
    patches, width = (res // cfg.patch_size) ** 2, cfg.vision_width
    embed = 2 * patches * 3 * cfg.patch_size ** 2 * width  # the stride-p convolution is a matmul
    head = 2 * width * cfg.embed_dim
    blocks = (transformer_flops(width, cfg.vision_layers - 1, patches + 1)
              + block_flops(width, patches + 1, 1))
    return embed + blocks + head


def text_flops(cfg, tokens):
    """Forward FLOPs of the text tower for one prompt cut after EOT. Causal attention is counted in
    full; at ~10 tokens the attention matmuls are under 1% of the projections."""
    projection = 2 * cfg.text_width * cfg.embed_dim
    return transformer_flops(cfg.text_width, cfg.text_layers, tokens) + projection


# --------------------------------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if device.type == "cuda":
        # kernels run asynchronously: without this we would time the launches
        torch.cuda.synchronize(device)


def timings(fn, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed ones."""
    # the first calls pay for allocation, cuDNN autotuning and torch.compile
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn, device, warmup, repeats):
    # the median ignores the odd hiccup (GC, another process) that a mean keeps
    return statistics.median(timings(fn, device, warmup, repeats))


def memory(device, peak=False):
    """Bytes in use now (or at the peak since reset_peak): CUDA's allocator, or on Linux the
    resident memory."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    with contextlib.suppress(OSError, TypeError), open("/proc/self/status") as f:
        return int(re.search(rf"{'VmHWM' if peak else 'VmRSS'}:\s+(\d+) kB", f.read())[1]) * 1024
    return None


def reset_peak(device):
    """True if the peak can be measured from here on."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        # Linux >= 4.0: the peak resident memory (VmHWM) starts again from the current one
        f.write("5")
        return True
    return False


def free(device):
    gc.collect()  # the previous section's model and optimizer, before the next is built or measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        # hand freed heap pages back (glibc), so that the resident memory counts live memory and a
        # later peak shows
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class Bench:
    """The device, precision and sizes of this run, and the rows measured so far."""

    def __init__(self, device, cfg):
        self.device, self.cfg, self.rows = device, cfg, {}
        # bf16 autocast over fp32 weights on GPU, as training does; plain fp32 on CPU
        cuda = device.type == "cuda"
        self.amp = torch.autocast("cuda", torch.bfloat16) if cuda else contextlib.nullcontext()
        dtype = torch.bfloat16 if cuda else torch.float32
        n = cfg["matmul"]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        # The peak is the fastest of several matmuls, not their median: other work on the machine
        # only ever slows one down, and a peak measured too low would make every MFU too high.
        repeats = max(PEAK_REPEATS, cfg["repeats"])
        fastest = min(timings(lambda: a @ b, device, cfg["warmup"], repeats))
        self.peak, self.peak_dtype = 2 * n ** 3 / fastest, str(dtype).removeprefix("torch.")
        self.peak_unreliable = False  # set once a row would exceed the peak

    def seconds(self, fn, warmup=None):
        warmup = self.cfg["warmup"] if warmup is None else warmup
        return median_seconds(fn, self.device, warmup, self.cfg["repeats"])

    def add(self, key, label, seconds, frames, flops, peak_bytes=None, **extra):
        mfu = flops / seconds / self.peak
        # Above 1, the model ran faster than the "peak": that matmul was timed while the machine was
        # busy. The row gets no MFU, and the summary says that the other rows' are overestimates.
        self.peak_unreliable |= mfu > 1
        row = dict(label=label, ms=1e3 * seconds, frames_per_s=frames / seconds,
                   tflops=flops / seconds / 1e12, mfu=mfu if mfu <= 1 else None, **extra)
        if peak_bytes is not None:
            row["peak_mb"] = peak_bytes / 2 ** 20
        self.rows[key] = row
        mfu_text = fmt(row["mfu"]) if row["mfu"] is not None else "n/a*"
        peak_text = fmt(row["peak_mb"]) if "peak_mb" in row else ""
        print(f"{row['label']:50s} {fmt(row['ms']):>9s} {fmt(row['frames_per_s']):>9s} "
              f"{fmt(row['tflops']):>8s} {mfu_text:>6s} {peak_text:>8s}", flush=True)  # as measured

    def adamw(self, params):
        # fused: one kernel for the whole update instead of several per parameter tensor
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.001,
                                 fused=self.device.type == "cuda")

    def new_clip(self):
        free(self.device)
        torch.manual_seed(0)
        config = SMALL_CLIP if self.cfg["small"] else clip_model.CLIPConfig()
        return clip_model.CLIP(config).to(self.device)


# --------------------------------------------------------------------------------------------------
# Text: class names and their tokenizer

def class_names(n):
    """n distinct action-like names ('riding horse'). Common English words are one BPE token each,
    as in real label sets, so the prompts are as long as UCF101's and Kinetics' (~8-10 tokens with
    the template)."""
    verbs = ("playing riding throwing jumping cutting washing walking climbing swimming dancing "
             "eating brushing juggling kicking lifting making pushing pulling carrying "
             "catching").split()
    nouns = ("guitar horse ball rope hair dog bike cake tree water drum piano car snow wall boat "
             "fish paper box shoes ladder violin bread tire flag").split()
    names = [f"{verb} {noun}" for verb in verbs for noun in nouns]
    random.Random(0).shuffle(names)
    assert n <= len(names), f"at most {len(names)} generated class names"
    return names[:n]


class RandomTokens:
    """Stands in for CLIP's BPE when its vocabulary file is not on this machine (the bench never
    downloads): one random id per word or punctuation mark, about what BPE gives for common English,
    so the text tower sees prompts of realistic length. Which ids they are changes nothing in the
    timing; only the lengths matter."""

    def __init__(self, vocab_size):
        self.sot, self.eot, self.rng = vocab_size - 2, vocab_size - 1, random.Random(0)

    def encode(self, text):
        return [self.rng.randrange(self.sot) for _ in re.findall(r"\w+|[^\w\s]", text)]


def text_tokenizer(vocab_size):
    path = os.environ.get("VIFI_BPE") or os.path.join(tokenizer.cache_dir(), tokenizer.BPE_FILE)
    if os.path.isfile(path):
        return tokenizer.Tokenizer(path), "CLIP BPE"
    return RandomTokens(vocab_size), "random ids of realistic lengths (no BPE vocab: set VIFI_BPE)"


# --------------------------------------------------------------------------------------------------
# The benchmarks

def bench_vision(bench, clip, compiled):
    frames, res = bench.cfg["clips"] * bench.cfg["T"], bench.cfg["res"]
    x = torch.randn(frames, 3, res, res, device=bench.device)  # (N, 3, H, W) normalized pixels
    visual, opt = clip.visual, bench.adamw(clip.visual.parameters())
    run = compile_fresh(visual) if compiled else visual
    flops = frames * image_flops(clip.config, res)
    tag, key = " [compiled]" * compiled, "_compiled" * compiled

    def train():
        with bench.amp:
            # any scalar: the cost is the tower's forward and backward
            loss = run(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), bench.amp:
            run(x)

    bench.add(f"vision_train{key}", f"vision train, {frames} frames{tag}", bench.seconds(train),
              frames, 3 * flops)
    bench.add(f"vision_infer{key}", f"vision infer, {frames} frames{tag}", bench.seconds(infer),
              frames, flops)


def compile_fresh(module):
    # Forget earlier graphs: after a model of other shapes, dynamo would recompile this one with
    # dynamic shapes.
    torch.compiler.reset()
    return torch.compile(module)


def vifi_step(run, opt, video, labels, amp):
    with amp:
        loss = F.cross_entropy(run(video).float(), labels)  # (B, C) logits vs class ids
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class OfficialStyle(torch.nn.Module):
    """The same weights run the way the official code runs them (OpenAI's model.py): sequence-first
    tensors, nn.MultiheadAttention's math with a float causal mask, and every class prompt
    re-encoded at all 77 tokens on every step. The baseline of the speed targets; tests check it
    gives this project's logits."""

    def __init__(self, model):
        super().__init__()
        self.model, length = model, model.clip.config.context_length
        self.ids = tokenizer.tokenize(model.prompts_for(model.classnames), length,
                                      tokenizer=model.tokenizer)
        causal = torch.full((length, length), float("-inf")).triu(1)
        self.register_buffer("mask", causal, persistent=False)

    @staticmethod
    def blocks(transformer, x, mask=None):
        for block in transformer.resblocks:  # x: (L, N, W), as nn.MultiheadAttention wants it
            attn, mlp = block.attn, block.mlp
            h = block.ln_1(x)
            x = x + F.multi_head_attention_forward(
                h, h, h, h.shape[-1], attn.heads, attn.in_proj_weight, attn.in_proj_bias, None,
                None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, need_weights=False,
                attn_mask=None if mask is None else mask.to(h.dtype))[0]
            h = F.linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias)
            h = h * torch.sigmoid(1.702 * h)  # QuickGELU
            x = x + F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        return x

    def forward(self, video):
        clip, visual = self.model.clip, self.model.clip.visual
        B, T = video.shape[:2]
        # (B*T, 3, H, W) -> (B*T, P, W)
        x = visual.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([class_token, x], 1) + visual.positional_embedding.to(x.dtype)
        # NLD -> LND -> NLD
        x = self.blocks(visual.transformer, visual.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        image = (visual.ln_post(x[:, 0]) @ visual.proj).view(B, T, -1).mean(1)  # (B*T, D) -> (B, D)
        ids = self.ids.to(video.device)
        # (C, 77, W) -> (77, C, W)
        tokens = (clip.token_embedding(ids) + clip.positional_embedding).transpose(0, 1)
        tokens = clip.ln_final(self.blocks(clip.transformer, tokens, self.mask).transpose(0, 1))
        text = tokens[torch.arange(len(ids)), ids.argmax(-1)] @ clip.text_projection
        scale = clip.logit_scale.exp()
        return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t().to(image.dtype)


def bench_vifi(bench, clip, tok, compiled):
    B, T, res = bench.cfg["clips"], bench.cfg["T"], bench.cfg["res"]
    video = torch.randn(B, T, 3, res, res, device=bench.device)  # (B, T, 3, H, W) normalized pixels
    tag, key = " [compiled]" * compiled, "_compiled" * compiled
    for C in bench.cfg["classes"]:
        model = vifi.ViFiCLIP(clip, class_names(C), mode="finetune", tokenizer=tok)
        opt = bench.adamw(model.trainable_parameters())
        labels = torch.randint(C, (B,), device=bench.device)
        run = compile_fresh(model) if compiled else model
        L = model.text_ids.shape[1]  # prompt length, cut after the last EOT
        vision, text = B * T * image_flops(clip.config, res), C * text_flops(clip.config, L)
        model.train()
        seconds = bench.seconds(lambda: vifi_step(run, opt, video, labels, bench.amp))
        bench.add(f"vifi_train_c{C}{key}", f"vifi train, {B}x{T}, C={C}{tag}", seconds, B * T,
                  3 * (vision + text), prompt_tokens=L)
        # the official style, eager as the official code runs: same weights, same FLOPs of work
        if not compiled:
            official = OfficialStyle(model).to(bench.device)
            step = lambda: vifi_step(official, opt, video, labels, bench.amp)
            official_seconds = bench.seconds(step)
            L0 = clip.config.context_length  # every prompt at full length
            official_flops = 3 * (vision + C * text_flops(clip.config, L0))
            bench.add(f"vifi_train_official_c{C}", f"vifi train, official style ({L0} tokens), "
                      f"C={C}", official_seconds, B * T, official_flops,
                      speedup=official_seconds / seconds)

        def evaluate():
            with torch.no_grad(), bench.amp:
                run(video)
        model.eval()  # the warm-up encodes the prompts once; the timed repeats read the cache
        seconds = bench.seconds(evaluate)
        bench.add(f"vifi_eval_c{C}{key}", f"vifi eval, cached text, {B}x{T}, C={C}{tag}", seconds,
                  B * T, vision)
        del model, opt, run


def bench_memory(bench, tok):
    """Training steps at mem_T frames per clip. Checkpointing runs first: malloc may keep freed
    memory, which a later and smaller run would count as its own."""
    cfg = bench.cfg
    B, T, res, C = cfg["mem_clips"], cfg["mem_T"], cfg["res"], cfg["classes"][0]
    free(bench.device)
    base = memory(bench.device)
    clip = bench.new_clip()
    model = vifi.ViFiCLIP(clip, class_names(C), mode="finetune", tokenizer=tok).train()
    opt = bench.adamw(model.trainable_parameters())
    labels = torch.randint(C, (B,), device=bench.device)
    video = torch.randn(B, T, 3, res, res, device=bench.device)
    text_tokens = model.text_ids.shape[1]
    flops = 3 * (B * T * image_flops(clip.config, res) + C * text_flops(clip.config, text_tokens))
    for ckpt in (True, False):
        clip.set_grad_checkpointing(ckpt)
        step = lambda: vifi_step(model, opt, video, labels, bench.amp)
        step()  # AdamW's state exists from here on, in both runs
        free(bench.device)
        measured = reset_peak(bench.device) and base is not None
        seconds = bench.seconds(step, warmup=0)
        used = memory(bench.device, peak=True) - base if measured else None
        key, label = (("memory_ckpt", "checkpointing") if ckpt else
                      ("memory_no_ckpt", "no checkpointing"))
        bench.add(key, f"vifi train, {B}x{T}, C={C}, {label}", seconds, B * T, flops, used)


def generated_videos(cfg, folder):
    """name -> path of the generated videos: UCF101-like (make_test_video's defaults: 175 frames,
    320x240, MPEG-4 in AVI), Kinetics-like (250 frames, 340x256, H.264 in MP4, x264's default
    keyframe interval 250, as the common Kinetics copies), and the same with a panning noise
    texture, harder to compress, as camera footage is."""
    small = cfg["small"]
    kinetics = dict(codec="libx264", **(dict(num_frames=50, width=84, height=64) if small else
                                        dict(num_frames=250, width=340, height=256)))
    kinds = {"ucf101": ("avi", dict(num_frames=50, width=80, height=60) if small else {}),
             "kinetics": ("mp4", kinetics),
             "kinetics_textured": ("mp4", dict(kinetics, texture=TEXTURE))}
    paths = {}
    os.makedirs(folder, exist_ok=True)
    for name, (extension, video_args) in kinds.items():
        paths[name] = os.path.join(folder, f"{name}_like.{extension}")
        tools.make_test_video(paths[name], **video_args)
    return paths


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as DataLoader sets it in every worker process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_data(cfg, videos):
    """clips/s of one worker: decoding alone and the whole pipeline."""
    cpu, out = torch.device("cpu"), {}
    with one_thread():
        for name, path in ((kind, videos[kind]) for kind in ("ucf101", "kinetics")):
            for T in cfg["data_T"]:
                def decode():
                    with data.VideoReader(path) as video:
                        video.read(data.sample_indices(len(video), T, train=True))
                dataset = data.VideoDataset([(path, 0)], ["x"], frames=T, size=cfg["data_size"],
                                            train=True)
                decode_rate = 1 / median_seconds(decode, cpu, 1, cfg["repeats"])
                pipeline_rate = 1 / median_seconds(lambda: dataset[0], cpu, 1, cfg["repeats"])
                out[f"{name}_t{T}"] = dict(decode_clips_per_s=decode_rate,
                                           pipeline_clips_per_s=pipeline_rate,
                                           pipeline_over_decode=pipeline_rate / decode_rate)
    return out


# --------------------------------------------------------------------------------------------------
# The data path end to end: prepared copies (tools.py prepare), worker scaling, and train.py's own
# loop

def read_rates(paths, T, size, clips, rounds):
    """clips/s of one worker reading `clips` training clips (decode, TSN sampling, augmentation)
    from each of `paths`. The files take turns, `rounds` times, and every file gets the same clips:
    the load of a shared machine then falls alike on all of them, and the median per file is what is
    compared."""
    rates = {path: [] for path in paths}
    with one_thread():
        for seed in range(rounds):
            for path in paths:
                dataset = data.VideoDataset([(path, 0)], ["x"], frames=T, size=size, train=True)
                random.seed(seed)  # the same frames and views for every file
                start = time.perf_counter()
                for _ in range(clips):
                    dataset[0]
                rates[path].append(clips / (time.perf_counter() - start))
    return {path: statistics.median(per_round) for path, per_round in rates.items()}


def psnr(original, prepared, T=16, clips=4):
    """dB of the prepared file's frames against the original's, at the frames of `clips` test
    clips."""
    with data.VideoReader(original) as video:
        rng = random.Random(0)  # the clips of multi-clip testing, the same for both files
        indices = [i for _ in range(clips) for i in data.sample_indices(len(video), T, True, rng)]
        frames = video.read(indices).double()
    mse = (data.read_frames(prepared, indices).double() - frames).square().mean().item()
    return 10 * math.log10(255 ** 2 / max(mse, 1e-10))


def prepared_copy(src, folder, keyint=None, crf=None, fast_decode=True):
    """tools.prepare_video with its defaults, or a setting of the trade-off -> (path, seconds to
    encode)."""
    if keyint is None:
        tag, settings = "default", {}
    else:
        tag = f"k{keyint}_crf{crf}{'' if fast_decode else '_nofastdecode'}"
        settings = dict(keyint=keyint, quality={"libx264": crf}, fast_decode=fast_decode)
    dst = os.path.join(folder, f"{tag}_{os.path.basename(src)}")
    start = time.perf_counter()
    tools.prepare_video(src, dst, **settings)
    return dst, time.perf_counter() - start


def bench_prepare(cfg, videos, folder):
    """The trade-off of preparing Kinetics-like videos: keyframe interval x x264 CRF -> one worker's
    clips/s at T = 16 against the original's, bytes against the original's, PSNR against the
    original's frames."""
    out = {}
    os.makedirs(folder)
    for name in ("kinetics", "kinetics_textured"):
        src = videos[name]
        copies = {(keyint, crf, fast): prepared_copy(src, folder, keyint, crf, fast)
                  for keyint, crf, fast in cfg["prepare_grid"]}
        paths = [src] + [path for path, _ in copies.values()]
        rates = read_rates(paths, 16, cfg["data_size"], *cfg["prepare_reads"])
        for (keyint, crf, fast), (path, seconds) in copies.items():
            out[f"{name}_k{keyint}_crf{crf}{'' if fast else '_nofastdecode'}"] = dict(
                video=name, keyint=keyint, crf=crf, fast_decode=fast, clips_per_s=rates[path],
                original_clips_per_s=rates[src], speedup=rates[path] / rates[src],
                bytes_ratio=os.path.getsize(path) / os.path.getsize(src), psnr_db=psnr(src, path),
                encode_s=seconds)
    return out


def loader_rate(dataset, workers, clips, batch=4):
    """clips/s of a DataLoader with `workers` worker processes, after each worker's first batch
    (start-up)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         shuffle=True)
    batches = iter(loader)
    for _ in range(workers):
        next(batches)
    start, seen = time.perf_counter(), 0
    for batch in itertools.islice(batches, clips // batch):
        seen += len(batch["video"])
    return seen / (time.perf_counter() - start)


def bench_workers(cfg, videos, prepared):
    """Worker scaling of the training pipeline, 1 ... all cores, on each kind of video, original and
    prepared."""
    out = {}
    counts = sorted({n for n in (1, 2, 4, 8, 16, 32) if n <= os.cpu_count()} | {os.cpu_count()})
    for name, T in (("kinetics", 16), ("ucf101", 8)):
        for kind, path in (("original", videos[name]), ("prepared", prepared[name])):
            dataset = data.VideoDataset([(path, 0)] * 4096, ["x"], frames=T, size=cfg["data_size"],
                                        train=True)
            for workers in counts:
                rate = loader_rate(dataset, workers, cfg["e2e"]["clips_per_worker"] * workers)
                out[f"{name}_t{T}_{kind}_w{workers}"] = dict(video=name, T=T, files=kind,
                                                             workers=workers, clips_per_s=rate)
                print(f"pipeline {name} T={T} {kind:8s} {workers:2d} workers: "
                      f"{fmt(rate):>7s} clips/s", flush=True)
    return out


@contextlib.contextmanager
def clips_in_memory():
    """Every VideoDataset serves, for each path, the first clip it loaded: train.py's loop without
    decoding or augmenting, the bound that faster files could approach. (DataLoader forks its
    workers on Linux, so they inherit the patch; under another start method they would decode as
    usual.)"""
    load, cache = data.VideoDataset.load, {}

    def cached(self, path, *args):
        if path not in cache:
            cache[path] = load(self, path, *args)
        return cache[path]
    data.VideoDataset.load = cached
    try:
        yield
    finally:
        data.VideoDataset.load = load


def train_loop_rate(path, T, cfg, compiled, folder):
    """clips/s of train.py's training loop (its DataLoader, normalization, mixup, forward, backward,
    AdamW) over `path` listed steps x micro-batch times: the second of two epochs (the first pays
    for start-up)."""
    e2e, classes = cfg["e2e"], 10
    root, lists = os.path.dirname(path), os.path.join(folder, "lists")
    os.makedirs(lists, exist_ok=True)
    name = os.path.basename(path)
    with open(os.path.join(lists, "train.txt"), "w") as f:
        f.writelines(f"{name} {i % classes}\n" for i in range(e2e["steps"] * e2e["micro_batch"]))
    with open(os.path.join(lists, "test.txt"), "w") as f:
        f.write(f"{name} 0\n")
    with open(os.path.join(lists, "labels.csv"), "w") as f:
        names = class_names(classes)
        f.write("id,name\n" + "".join(f"{i},{label}\n" for i, label in enumerate(names)))
    out = os.path.join(folder, "run")
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--dataset", "list", "--root", root, "--train-list", f"{lists}/train.txt",
            "--test-list", f"{lists}/test.txt", "--labels", f"{lists}/labels.csv",
            "--model", e2e["model"], "--frames", str(T), "--input-size", str(e2e["size"]),
            "--epochs", "2", "--batch-size", str(e2e["micro_batch"]),
            "--micro-batch", str(e2e["micro_batch"]), "--workers", str(e2e["workers"]),
            "--views", "1x1", "--protocol", "supervised", "--out", out]
    # On a CPU the step runs on one thread and the workers get the other cores: OpenMP's threads
    # crawl when the cores are oversubscribed. train.py's own output (its table, results path,
    # warnings) is not the benchmark's.
    with one_thread() if e2e["cpu"] else contextlib.nullcontext(), quiet():
        train.main(train.get_args(argv + ["--compile"] * compiled))
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["clips_per_s"]


@contextlib.contextmanager
def quiet():
    """stdout and stderr (Python's, and warnings) discarded inside; an exception still propagates
    with its message."""
    with open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def bench_train_loop(cfg, videos, prepared, folder, compiled):
    """train.py's loop on each kind of video, original and prepared, against the same loop on clips
    in memory."""
    out = {}
    for name, T in (("kinetics", 16), ("ucf101", 8)):
        with clips_in_memory():
            bound = train_loop_rate(videos[name], T, cfg, compiled, folder)
        for kind, path in (("original", videos[name]), ("prepared", prepared[name])):
            rate = train_loop_rate(path, T, cfg, compiled, folder)
            key = f"{name}_t{T}_{kind}{'_compiled' * compiled}"
            out[key] = dict(video=name, T=T, files=kind, compiled=compiled, clips_per_s=rate,
                            in_memory_clips_per_s=bound, of_bound=rate / bound)
            print(f"train.py loop {key}: {fmt(rate)} clips/s, {rate / bound:.2f}x the in-memory "
                  f"{fmt(bound)}", flush=True)
    return out


def e2e_model(cfg, device, folder):
    """--model for train.py: its small scratch CLIP on a CPU; on a GPU, ViT-B/16 with random
    weights, saved as a state dict (no download; its prompts need CLIP's BPE vocabulary, cached or
    at $VIFI_BPE)."""
    if device.type != "cuda" or cfg["small"]:
        return "scratch"
    path = os.path.join(folder, "vit_b16_random.pt")
    torch.save(clip_model.CLIP(clip_model.CLIPConfig()).state_dict(), path)
    return path


def bench_e2e(cfg, device, videos, folder, compiled, results, saved):
    """Trade-off table, worker scaling and train.py's loop into `results`, calling saved() after
    each. Each has its own subfolder of `folder`: the list dataset indexes the files under its root
    once, when the first loop runs."""
    sizes = E2E_GPU if device.type == "cuda" and not cfg["small"] else E2E_CPU
    e2e = cfg["e2e"] = {**sizes, **cfg.get("e2e", {})}
    e2e["model"], e2e["cpu"] = e2e_model(cfg, device, folder), device.type == "cpu"
    results["prepare"] = bench_prepare(cfg, videos, os.path.join(folder, "grid"))
    print_prepare(results["prepare"])
    saved()
    os.makedirs(os.path.join(folder, "prepared"))
    prepared = {name: prepared_copy(videos[name], os.path.join(folder, "prepared"))[0]
                for name in ("kinetics", "ucf101")}
    results["workers"] = bench_workers(cfg, videos, prepared)
    saved()
    results["train_loop"] = bench_train_loop(cfg, videos, prepared, folder, compiled=False)
    if compiled:
        saved()
        results["train_loop"].update(bench_train_loop(cfg, videos, prepared, folder, compiled=True))
    for row in results["train_loop"].values():
        print(f"train.py loop, {row['video']} T={row['T']} {row['files']}"
              f"{' compiled' * row['compiled']}: {fmt(row['clips_per_s'])} clips/s = "
              f"{row['of_bound']:.2f}x the in-memory {fmt(row['in_memory_clips_per_s'])}")


def print_prepare(rows):
    print(f"\n{'prepared Kinetics-like, T=16':34s} {'keyint':>6s} {'crf':>4s} {'clips/s':>8s} "
          f"{'speed-up':>9s} {'bytes':>6s} {'PSNR dB':>8s} {'encode s':>9s}")
    for row in rows.values():
        video = row["video"] + ("" if row["fast_decode"] else ", no fastdecode")
        print(f"{video:34s} {row['keyint']:>6d} {row['crf']:>4d} {fmt(row['clips_per_s']):>8s} "
              f"{row['speedup']:>8.2f}x {row['bytes_ratio']:>5.2f}x {row['psnr_db']:>8.1f} "
              f"{row['encode_s']:>9.2f}", flush=True)


# --------------------------------------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, TypeError), open("/proc/cpuinfo") as f:
        model = re.search(r"model name\s*:\s*(.+)", f.read())[1].strip()
        return f"{model}, {torch.get_num_threads()} threads"
    return platform.processor() or "cpu"


def fmt(v):
    return "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def print_header(device, bench, tok_name):
    print(f"{device_name(device)} | torch {torch.__version__} | peak {fmt(bench.peak / 1e12)} "
          f"TFLOP/s ({bench.peak_dtype} matmul) | tokenizer: {tok_name}")
    print(f"\n{'benchmark':50s} {'ms/step':>9s} {'frames/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak MB':>8s}")


def print_summary(results):
    print()
    if results.get("peak_unreliable"):
        print(f"* MFU n/a: a step ran faster than the peak measured ({fmt(results['peak_tflops'])} "
              "TFLOP/s), so that peak is unreliable\n  (the machine was busy while it was timed) "
              "and every MFU above is too high; rerun on an idle machine")
    for row in results["model"].values():
        if "speedup" in row:
            speedup = row["speedup"]  # the official-style step's time over the lean one's
            how = (f"{speedup:.2f}x faster than" if speedup >= 1 else
                   f"{1 / speedup:.2f}x slower than")
            print(f"the lean eager step is {how}: {row['label']}")
    # peak without checkpointing over peak with it; None where no peak is measured
    ratio = results["memory_ratio"]
    if ratio is None:
        print("activation checkpointing: no memory peak can be measured on this device")
    elif ratio >= 1:
        print(f"activation checkpointing cuts peak memory {fmt(ratio)}x")
    else:
        print("activation checkpointing does not cut peak memory at this size "
              f"(without / with = {ratio:.2f})")
    print(f"\n{'data, one worker':18s} {'decode clips/s':>15s} {'pipeline clips/s':>17s} "
          f"{'pipeline/decode':>16s}")
    for name, rates in results["data"].items():
        print(f"{name:18s} {fmt(rates['decode_clips_per_s']):>15s} "
              f"{fmt(rates['pipeline_clips_per_s']):>17s} {rates['pipeline_over_decode']:>16.2f}")
    feed = results["data_feed"]
    print(f"{feed['video']}: {feed['workers']} workers x "
          f"{fmt(feed['pipeline_clips_per_s_per_worker'])} clips/s = "
          f"{fmt(feed['pipeline_clips_per_s'])} clips/s (if they scale linearly) vs training at "
          f"{fmt(feed['train_clips_per_s'])} clips/s: "
          f"{'feeds' if feed['feeds'] else 'does not feed'} the model")


def bench_model(args, device, cfg, results, videos):
    """Everything but --e2e: the model's steps, memory, one worker's data rates, and whether they
    add up."""
    if device.type == "cuda":
        # fixed shapes: cuDNN picks its kernels (the official style's conv) once
        torch.backends.cudnn.benchmark = True
    bench = Bench(device, cfg)
    config = SMALL_CLIP if args.small else clip_model.CLIPConfig()
    tok, tok_name = text_tokenizer(config.vocab_size)
    print_header(device, bench, tok_name)
    results.update(tokenizer=tok_name, peak_tflops=bench.peak / 1e12, peak_dtype=bench.peak_dtype,
                   model=bench.rows)
    clip = bench.new_clip()
    bench_vision(bench, clip, compiled=False)
    bench_vifi(bench, clip, tok, compiled=False)
    del clip
    bench_memory(bench, tok)
    results["data"] = bench_data(cfg, videos)
    with_ckpt = bench.rows["memory_ckpt"].get("peak_mb")
    without = bench.rows["memory_no_ckpt"].get("peak_mb")
    results["memory_ratio"] = without / with_ckpt if with_ckpt and without else None
    # Does the pipeline feed training at 32 frames per clip? Workers on every core against the step
    # without checkpointing (on a CPU those cores also train, so this means something only next to a
    # GPU).
    video = f"ucf101_t{max(cfg['data_T'])}"
    per_worker, workers = results["data"][video]["pipeline_clips_per_s"], os.cpu_count()
    train_rate = cfg["mem_clips"] / (bench.rows["memory_no_ckpt"]["ms"] / 1e3)
    results["data_feed"] = dict(video=video, workers=workers,
                                pipeline_clips_per_s_per_worker=per_worker,
                                pipeline_clips_per_s=workers * per_worker,
                                train_clips_per_s=train_rate,
                                feeds=workers * per_worker >= train_rate)
    # last: compiling takes minutes, and everything above is already measured by then
    if args.compile:
        save(results, args.json)  # so an interrupted run still leaves the eager numbers
        clip = bench.new_clip()
        bench_vision(bench, clip, compiled=True)
        bench_vifi(bench, clip, tok, compiled=True)
    results["peak_unreliable"] = bench.peak_unreliable
    print_summary(results)


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = {**(SMALL if args.small else FULL), **({"repeats": args.repeats} if args.repeats else {})}
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results = dict(device=device_name(device), device_type=device.type, torch=torch.__version__,
                   date=date, small=args.small, compile=args.compile, config=cfg)
    with tempfile.TemporaryDirectory() as folder:
        videos = generated_videos(cfg, os.path.join(folder, "original"))
        if not args.e2e:
            bench_model(args, device, cfg, results, videos)
        if args.e2e or args.small:
            results["e2e"] = {}
            bench_e2e(cfg, device, videos, folder, args.compile, results["e2e"],
                      lambda: save(results, args.json))
    save(results, args.json)
    return results


def save(results, path):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {path}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="a small CLIP, few frames, tiny videos: seconds on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="also time the torch.compile variants")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--repeats", type=int,
                        help="timed repeats per measurement (default 10; --small 3)")
    parser.add_argument("--e2e", action="store_true",
                        help="only the data path end to end: prepared copies, worker scaling, "
                        "train.py's loop against clips in memory (--small runs it too)")
    parser.add_argument("--json", metavar="FILE",
                        help="write every number, the device, torch version and date")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
