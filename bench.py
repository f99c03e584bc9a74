"""
How fast ViFi-CLIP trains and evaluates, how much memory a step takes, and whether the data pipeline keeps up.
Random weights with the real sizes (no download) and synthetic inputs, on cuda if present, else the CPU.

    python bench.py                   # ViT-B/16 at 224 (hours on a CPU: use --small there)
    python bench.py --compile         # the torch.compile variants too
    python bench.py --small           # a tiny CLIP and tiny videos, seconds on a CPU (the tests run this)
    python bench.py --json out.json   # every number, with the device, torch version and date

What is timed (median of timed repeats after warm-up, the device synchronized around each repeat):
  vision train / infer  CLIP's image tower on 256 frames (32 clips x 8) at 224: forward, backward, AdamW (fused on
                        CUDA); and a no-grad forward
  vifi train C=101/400  the whole ViFi-CLIP step on 32 clips x 8 frames: all C class prompts through the text tower
                        (it trains, so they are encoded every step), cross-entropy over the (B, C) logits, AdamW
  vifi train, official  the baseline: the same weights and step run as the official code runs them (OpenAI's
                        model.py layout, nn.MultiheadAttention math, all 77 tokens of every prompt, every step)
  vifi eval             the same forward in eval mode: text features come from the cache, never re-encoded
  memory                a training step at 32 frames per clip with and without activation checkpointing. CUDA:
                        torch.cuda.max_memory_allocated; CPU (Linux): the peak resident memory (VmHWM, reset through
                        /proc/self/clear_refs), approximate since malloc may keep freed pages. Both count from
                        before the model is built: weights, grads, AdamW state, activations
  data                  clips/s of one worker (one thread, as in a DataLoader worker) on generated UCF101-like
                        (320x240, 7 s, MPEG-4 AVI) and Kinetics-like (340x256, 10 s, H.264 MP4) videos: decoding
                        the sampled frames alone vs the training pipeline (decode + TSN sample + augment, uint8 out)
FLOPs are those the code runs, counted from the shapes (image_flops, text_flops); a training step is 3x the
forward (the recompute of checkpointing is not counted, as usual for MFU). MFU divides by the peak of a large matmul
measured in this run: bf16 on CUDA (what autocast runs the model in), fp32 on CPU (the model runs in fp32 there).
"""
import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import clip_model
import data
import tokenizer
import vifi

# Sizes of a full run and of --small. Frames = clips x T; mem_* is the memory test at 32 frames per clip.
# --small has fewer classes: with a 64-wide text tower, 400 prompts would outweigh 8 tiny frames 30 to 1.
FULL = dict(small=False, res=224, clips=32, T=8, classes=(101, 400), mem_clips=8, mem_T=32, data_T=(8, 32),
            data_size=224, matmul=8192, warmup=3, repeats=10)
SMALL = dict(small=True, res=32, clips=2, T=4, classes=(10, 40), mem_clips=2, mem_T=8, data_T=(8, 32),
             data_size=32, matmul=512, warmup=1, repeats=3)
TINY_CLIP = clip_model.CLIPConfig(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, patch_size=8,
                                  text_width=64, text_layers=2)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs from shapes (2 per multiply-add). Layer norms, softmax, GELU and residual adds are left out: a few %.

def block_flops(width, tokens, queries):
    """Forward FLOPs of one block over a sequence of `tokens` tokens of `width` channels whose first `queries`
    outputs are computed (all of them but in the image tower's last block, which computes the class token alone)."""
    return (2 * tokens * width * 3 * width               # q, k, v of every token: one packed projection
            + 2 * 2 * queries * tokens * width           # q @ k^T and attention @ v, all heads together
            + 2 * queries * width * width                # output projection
            + 2 * 2 * queries * width * 4 * width)       # MLP: width -> 4 width -> width


def transformer_flops(width, layers, tokens):
    """Forward FLOPs of `layers` full blocks over one sequence of `tokens` tokens."""
    return layers * block_flops(width, tokens, tokens)


def image_flops(cfg, res):
    """Forward FLOPs the image tower runs for one frame: patch embedding, the ViT whose last block computes only the
    class token, the class token's projection. Published counts run every token through every block: ~6% more."""
    patches, w = (res // cfg.patch_size) ** 2, cfg.vision_width
    embed = 2 * patches * 3 * cfg.patch_size ** 2 * w  # the stride-p convolution is a matmul
    head = 2 * w * cfg.embed_dim
    return embed + transformer_flops(w, cfg.vision_layers - 1, patches + 1) + block_flops(w, patches + 1, 1) + head


def text_flops(cfg, tokens):
    """Forward FLOPs of the text tower for one prompt cut after EOT. Causal attention is counted in full; at ~10
    tokens the attention matmuls are under 1% of the projections."""
    return transformer_flops(cfg.text_width, cfg.text_layers, tokens) + 2 * cfg.text_width * cfg.embed_dim


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: without this we would time the launches


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):  # the first calls pay for allocation, cuDNN autotuning and torch.compile
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)  # the median ignores the odd hiccup (GC, another process) that a mean keeps


def memory(device, peak=False):
    """Bytes in use now (or at the peak since reset_peak): CUDA's allocator, or on Linux the resident memory."""
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
        f.write("5")  # Linux >= 4.0: the peak resident memory (VmHWM) starts again from the current one
        return True
    return False


def free(device):
    gc.collect()  # the previous section's model and optimizer, before the next is built or measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:  # hand freed heap pages back (glibc), so that the resident memory counts live memory and a later peak shows
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class Bench:
    """The device, precision and sizes of this run, and the rows measured so far."""

    def __init__(self, device, cfg):
        self.device, self.cfg, self.rows = device, cfg, {}
        # bf16 autocast over fp32 weights on GPU, as training does; plain fp32 on CPU
        self.amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        n = cfg["matmul"]
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        self.peak, self.peak_dtype = 2 * n ** 3 / self.seconds(lambda: a @ b), str(dtype).removeprefix("torch.")

    def seconds(self, fn, warmup=None):
        return median_seconds(fn, self.device, self.cfg["warmup"] if warmup is None else warmup, self.cfg["repeats"])

    def add(self, key, label, seconds, frames, flops, peak_bytes=None, **extra):
        r = dict(label=label, ms=1e3 * seconds, frames_per_s=frames / seconds, tflops=flops / seconds / 1e12,
                 mfu=flops / seconds / self.peak, **extra)
        if peak_bytes is not None:
            r["peak_mb"] = peak_bytes / 2 ** 20
        self.rows[key] = r
        print(f"{r['label']:50s} {fmt(r['ms']):>9s} {fmt(r['frames_per_s']):>9s} {fmt(r['tflops']):>8s} "
              f"{fmt(r['mfu']):>6s} {fmt(r['peak_mb']) if 'peak_mb' in r else '':>8s}", flush=True)  # as measured

    def adamw(self, params):
        # fused: one kernel for the whole update instead of several per parameter tensor
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.001, fused=self.device.type == "cuda")

    def new_clip(self):
        free(self.device)
        torch.manual_seed(0)
        return clip_model.CLIP(TINY_CLIP if self.cfg["small"] else clip_model.CLIPConfig()).to(self.device)


# ----------------------------------------------------------------------------------------------------------------
# Text: class names and their tokenizer

def class_names(n):
    """n distinct action-like names ('riding horse'). Common English words are one BPE token each, as in real
    label sets, so the prompts are as long as UCF101's and Kinetics' (~8-10 tokens with the template)."""
    verbs = ("playing riding throwing jumping cutting washing walking climbing swimming dancing eating brushing "
             "juggling kicking lifting making pushing pulling carrying catching").split()
    nouns = ("guitar horse ball rope hair dog bike cake tree water drum piano car snow wall boat fish paper box "
             "shoes ladder violin bread tire flag").split()
    names = [f"{verb} {noun}" for verb in verbs for noun in nouns]
    random.Random(0).shuffle(names)
    assert n <= len(names), f"at most {len(names)} generated class names"
    return names[:n]


class RandomTokens:
    """Stands in for CLIP's BPE when its vocabulary file is not on this machine (the bench never downloads):
    one random id per word or punctuation mark, about what BPE gives for common English, so the text tower sees
    prompts of realistic length. Which ids they are changes nothing in the timing; only the lengths matter."""

    def __init__(self, vocab_size):
        self.sot, self.eot, self.rng = vocab_size - 2, vocab_size - 1, random.Random(0)

    def encode(self, text):
        return [self.rng.randrange(self.sot) for _ in re.findall(r"\w+|[^\w\s]", text)]


def text_tokenizer(vocab_size):
    path = os.environ.get("VIFI_BPE") or os.path.join(tokenizer.cache_dir(), tokenizer.BPE_FILE)
    if os.path.isfile(path):
        return tokenizer.Tokenizer(path), "CLIP BPE"
    return RandomTokens(vocab_size), "random ids of realistic lengths (no BPE vocab: set VIFI_BPE)"


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks

def bench_vision(b, clip, compiled):
    frames, res = b.cfg["clips"] * b.cfg["T"], b.cfg["res"]
    x = torch.randn(frames, 3, res, res, device=b.device)  # (N, 3, H, W) normalized pixels
    visual, opt = clip.visual, b.adamw(clip.visual.parameters())
    run = compile_fresh(visual) if compiled else visual
    flops, tag, key = frames * image_flops(clip.config, res), " [compiled]" * compiled, "_compiled" * compiled

    def train():
        with b.amp:
            loss = run(x).float().square().mean()  # any scalar: the cost is the tower's forward and backward
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), b.amp:
            run(x)

    b.add(f"vision_train{key}", f"vision train, {frames} frames{tag}", b.seconds(train), frames, 3 * flops)
    b.add(f"vision_infer{key}", f"vision infer, {frames} frames{tag}", b.seconds(infer), frames, flops)


def compile_fresh(module):
    # Forget earlier graphs: after a model of other shapes, dynamo would recompile this one with dynamic shapes.
    torch.compiler.reset()
    return torch.compile(module)


def vifi_step(run, opt, video, labels, amp):
    with amp:
        loss = F.cross_entropy(run(video).float(), labels)  # (B, C) logits vs class ids
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class OfficialStyle(torch.nn.Module):
    """The same weights run the way the official code runs them (OpenAI's model.py): sequence-first tensors,
    nn.MultiheadAttention's math with a float causal mask, and every class prompt re-encoded at all 77 tokens on
    every step. The baseline of the speed targets; tests check it gives this project's logits."""

    def __init__(self, model):
        super().__init__()
        self.model, c = model, model.clip
        self.ids = tokenizer.tokenize(model.prompts_for(model.classnames), c.config.context_length,
                                      tokenizer=model.tokenizer)
        self.register_buffer("mask", torch.full((c.config.context_length,) * 2, float("-inf")).triu(1), persistent=False)

    @staticmethod
    def blocks(transformer, x, mask=None):
        for blk in transformer.resblocks:  # x: (L, N, W), as nn.MultiheadAttention wants it
            h = blk.ln_1(x)
            x = x + F.multi_head_attention_forward(
                h, h, h, h.shape[-1], blk.attn.heads, blk.attn.in_proj_weight, blk.attn.in_proj_bias, None, None,
                False, 0.0, blk.attn.out_proj.weight, blk.attn.out_proj.bias, need_weights=False,
                attn_mask=None if mask is None else mask.to(h.dtype))[0]
            h = F.linear(blk.ln_2(x), blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
            x = x + F.linear(h * torch.sigmoid(1.702 * h), blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)  # QuickGELU
        return x

    def forward(self, video):
        c, v = self.model.clip, self.model.clip.visual
        B, T = video.shape[:2]
        x = v.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, 3, H, W) -> (B*T, P, W)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], 1) + v.positional_embedding.to(x.dtype)
        x = self.blocks(v.transformer, v.ln_pre(x).transpose(0, 1)).transpose(0, 1)  # NLD -> LND -> NLD
        image = (v.ln_post(x[:, 0]) @ v.proj).view(B, T, -1).mean(1)  # (B*T, D) -> (B, D)
        ids = self.ids.to(video.device)
        t = (c.token_embedding(ids) + c.positional_embedding).transpose(0, 1)  # (C, 77, W) -> (77, C, W)
        t = c.ln_final(self.blocks(c.transformer, t, self.mask).transpose(0, 1))
        text = t[torch.arange(len(ids)), ids.argmax(-1)] @ c.text_projection
        return c.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t().to(image.dtype)


def bench_vifi(b, clip, tok, compiled):
    B, T, res = b.cfg["clips"], b.cfg["T"], b.cfg["res"]
    video = torch.randn(B, T, 3, res, res, device=b.device)  # (B, T, 3, H, W) normalized pixels
    tag, key = " [compiled]" * compiled, "_compiled" * compiled
    for C in b.cfg["classes"]:
        model = vifi.ViFiCLIP(clip, class_names(C), mode="finetune", tokenizer=tok)
        opt, labels = b.adamw(model.trainable_parameters()), torch.randint(C, (B,), device=b.device)
        run = compile_fresh(model) if compiled else model
        L = model.text_ids.shape[1]  # prompt length, cut after the last EOT
        vision, text = B * T * image_flops(clip.config, res), C * text_flops(clip.config, L)
        model.train()
        s = b.seconds(lambda: vifi_step(run, opt, video, labels, b.amp))
        b.add(f"vifi_train_c{C}{key}", f"vifi train, {B}x{T}, C={C}{tag}", s, B * T, 3 * (vision + text),
              prompt_tokens=L)
        if not compiled:  # the official style, eager as the official code runs: same weights, same FLOPs of work
            official = OfficialStyle(model).to(b.device)
            s0 = b.seconds(lambda: vifi_step(official, opt, video, labels, b.amp))
            b.add(f"vifi_train_official_c{C}", f"vifi train, official style (77 tokens), C={C}", s0, B * T,
                  3 * (vision + C * text_flops(clip.config, clip.config.context_length)), speedup=s0 / s)

        def evaluate():
            with torch.no_grad(), b.amp:
                run(video)
        model.eval()  # the warm-up encodes the prompts once; the timed repeats read the cache
        s = b.seconds(evaluate)
        b.add(f"vifi_eval_c{C}{key}", f"vifi eval, cached text, {B}x{T}, C={C}{tag}", s, B * T, vision)
        del model, opt, run


def bench_memory(b, tok):
    """Training steps at mem_T frames per clip. Checkpointing runs first: malloc may keep freed memory, which a
    later and smaller run would count as its own."""
    B, T, res, C = b.cfg["mem_clips"], b.cfg["mem_T"], b.cfg["res"], b.cfg["classes"][0]
    free(b.device)
    base = memory(b.device)
    clip = b.new_clip()
    model = vifi.ViFiCLIP(clip, class_names(C), mode="finetune", tokenizer=tok).train()
    opt, labels = b.adamw(model.trainable_parameters()), torch.randint(C, (B,), device=b.device)
    video = torch.randn(B, T, 3, res, res, device=b.device)
    flops = 3 * (B * T * image_flops(clip.config, res) + C * text_flops(clip.config, model.text_ids.shape[1]))
    for ckpt in (True, False):
        clip.set_grad_checkpointing(ckpt)
        step = lambda: vifi_step(model, opt, video, labels, b.amp)
        step()  # AdamW's state exists from here on, in both runs
        free(b.device)
        measured = reset_peak(b.device) and base is not None
        s = b.seconds(step, warmup=0)
        used = memory(b.device, peak=True) - base if measured else None
        key, label = ("memory_ckpt", "checkpointing") if ckpt else ("memory_no_ckpt", "no checkpointing")
        b.add(key, f"vifi train, {B}x{T}, C={C}, {label}", s, B * T, flops, used)


def bench_data(cfg, folder):
    """clips/s of one worker: torch on one thread, as DataLoader sets it in every worker process."""
    ucf, kinetics = os.path.join(folder, "ucf101_like.avi"), os.path.join(folder, "kinetics_like.mp4")
    # make_test_video's defaults are UCF101's format: 175 frames (7 s at 25 fps), 320x240, MPEG-4 in AVI.
    data.make_test_video(ucf, **(dict(num_frames=50, width=80, height=60) if cfg["small"] else {}))
    data.make_test_video(kinetics, codec="libx264", **(dict(num_frames=50, width=84, height=64) if cfg["small"]
                                                       else dict(num_frames=250, width=340, height=256)))
    threads, cpu, out = torch.get_num_threads(), torch.device("cpu"), {}
    torch.set_num_threads(1)
    try:
        for name, path in (("ucf101", ucf), ("kinetics", kinetics)):
            for T in cfg["data_T"]:
                def decode():
                    with data.VideoReader(path) as video:
                        video.read(data.sample_indices(len(video), T, train=True))
                dataset = data.VideoDataset([(path, 0)], ["x"], frames=T, size=cfg["data_size"], train=True)
                decode_rate = 1 / median_seconds(decode, cpu, 1, cfg["repeats"])
                pipeline_rate = 1 / median_seconds(lambda: dataset[0], cpu, 1, cfg["repeats"])
                out[f"{name}_t{T}"] = dict(decode_clips_per_s=decode_rate, pipeline_clips_per_s=pipeline_rate,
                                           pipeline_over_decode=pipeline_rate / decode_rate)
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, TypeError), open("/proc/cpuinfo") as f:
        return re.search(r"model name\s*:\s*(.+)", f.read())[1].strip() + f", {torch.get_num_threads()} threads"
    return platform.processor() or "cpu"


def fmt(v):
    return "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def print_header(device, b, tok_name):
    print(f"{device_name(device)} | torch {torch.__version__} | peak {fmt(b.peak / 1e12)} TFLOP/s "
          f"({b.peak_dtype} matmul) | tokenizer: {tok_name}")
    print(f"\n{'benchmark':50s} {'ms/step':>9s} {'frames/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak MB':>8s}")


def print_summary(res):
    print()
    for r in res["model"].values():
        if "speedup" in r:
            print(f"the lean eager step is {r['speedup']:.2f}x faster than: {r['label']}")
    print(f"activation checkpointing cuts peak memory {fmt(res['memory_ratio'])}x")
    print(f"\n{'data, one worker':18s} {'decode clips/s':>15s} {'pipeline clips/s':>17s} {'pipeline/decode':>16s}")
    for name, d in res["data"].items():
        print(f"{name:18s} {fmt(d['decode_clips_per_s']):>15s} {fmt(d['pipeline_clips_per_s']):>17s} "
              f"{d['pipeline_over_decode']:>16.2f}")
    f = res["data_feed"]
    print(f"{f['video']}: {f['workers']} workers x {fmt(f['pipeline_clips_per_s_per_worker'])} clips/s = "
          f"{fmt(f['pipeline_clips_per_s'])} clips/s (if they scale linearly) vs training at "
          f"{fmt(f['train_clips_per_s'])} clips/s: {'feeds' if f['feeds'] else 'does not feed'} the model")


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = {**(SMALL if args.small else FULL), **({"repeats": args.repeats} if args.repeats else {})}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its kernels (the official style's conv) once
    b = Bench(device, cfg)
    tok, tok_name = text_tokenizer((TINY_CLIP if args.small else clip_model.CLIPConfig()).vocab_size)
    print_header(device, b, tok_name)
    results = dict(device=device_name(device), device_type=device.type, torch=torch.__version__,
                   date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), small=args.small,
                   compile=args.compile, config=cfg, tokenizer=tok_name, peak_tflops=b.peak / 1e12,
                   peak_dtype=b.peak_dtype, model=b.rows)
    clip = b.new_clip()
    bench_vision(b, clip, compiled=False)
    bench_vifi(b, clip, tok, compiled=False)
    del clip
    bench_memory(b, tok)
    with tempfile.TemporaryDirectory() as folder:
        results["data"] = bench_data(cfg, folder)
    with_ckpt, without = b.rows["memory_ckpt"].get("peak_mb"), b.rows["memory_no_ckpt"].get("peak_mb")
    results["memory_ratio"] = without / with_ckpt if with_ckpt and without else None
    # Does the pipeline feed training at 32 frames per clip? Workers on every core against the step without
    # checkpointing (on a CPU those cores also train, so this means something only next to a GPU).
    video = f"ucf101_t{max(cfg['data_T'])}"
    per_worker, workers = results["data"][video]["pipeline_clips_per_s"], os.cpu_count()
    train_rate = cfg["mem_clips"] / (b.rows["memory_no_ckpt"]["ms"] / 1e3)
    results["data_feed"] = dict(video=video, workers=workers, pipeline_clips_per_s_per_worker=per_worker,
                                pipeline_clips_per_s=workers * per_worker, train_clips_per_s=train_rate,
                                feeds=workers * per_worker >= train_rate)
    if args.compile:  # last: compiling takes minutes, and everything above is already measured by then
        save(results, args.json)  # so an interrupted run still leaves the eager numbers
        clip = b.new_clip()
        bench_vision(b, clip, compiled=True)
        bench_vifi(b, clip, tok, compiled=True)
    print_summary(results)
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
    parser.add_argument("--small", action="store_true", help="a tiny CLIP, few frames, tiny videos: seconds on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile variants")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 10; --small 3)")
    parser.add_argument("--json", metavar="FILE", help="write every number, the device, torch version and date")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
