"""
Classify one video with a ViFi-CLIP or CLIP model, and explain the answer (as nanoGPT's sample.py):

  python predict.py VIDEO --labels "archery,playing guitar" [--model ViT-B/16] [--checkpoint FILE]

prints the top-5 classes. `--explain report.html` also writes what each frame votes for and where
the image encoder looks (votes_and_relevance below; report.py draws the page), and `--compare-base`
adds vanilla CLIP's maps beside a fine-tuned checkpoint's.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import archive
import clip_model
import data
import report
import tokenizer
import vifi

# --------------------------------------------------------------------------------------------------
# Explanation: what each frame votes for, and where the image encoder looks (drawn by report.py)

def votes_and_relevance(model, video, target=None):
    """video: one video's frames (T, 3, H, W), normalized. -> logits (C,), votes (T, C), and for
    `target` (default: the top class) relevance (T, gh, gw) over the patch grid.
    votes: the video embedding is the mean of the T frame embeddings f_t, so every logit splits
    exactly into T terms, one per frame:
      s <mean f, t_c> / (|mean f| |t_c|) = sum_t s <f_t, t_c> / (T |mean f| |t_c|)
    relevance (Chefer et al. 2021, gradient-weighted attention rollout): raw attention in a ViT is
    mostly mixing that is not specific to any class, and gradients alone are noisy, so each block's
    attention is weighted by its gradient for the class, only the positive part kept, and rolled out
    through the residual connections:
      R = I; for every block R += mean over heads(max(0, grad * A)) @ R
    and the map is the class token's row over the patches."""
    vis = model.clip.visual
    for block in vis.transformer.resblocks:
        # the written-out attention: same logits as SDPA, weights kept
        block.attn.keep_weights = True
    try:
        # even with every weight frozen, the attention then carries gradients
        video = video.detach().requires_grad_()
        f = model.clip.encode_image(video, list(model.vision_prompts))  # (T, D)
        # each (T, heads, L or 1, L)
        weights = [block.attn.weights for block in vis.transformer.resblocks]
    finally:
        for block in vis.transformer.resblocks:
            block.attn.keep_weights, block.attn.weights = False, None
    text = F.normalize(model.text_features(), dim=-1).to(f.dtype)  # (C, D)
    votes = model.clip.logit_scale.exp() * f @ text.t() / (len(f) * f.mean(dim=0).norm())  # (T, C)
    logits = votes.sum(dim=0)  # (C,)
    target = int(logits.argmax()) if target is None else target
    grads = torch.autograd.grad(logits[target], weights)
    T, L = len(f), weights[0].shape[-1]
    gh, gw = video.shape[-2] // vis.patch_size, video.shape[-1] // vis.patch_size
    eye = torch.eye(L, device=f.device)
    R = eye.repeat(T, 1, 1)  # (T, L, L): every token starts as evidence for itself only
    for i, (A, G) in enumerate(zip(weights, grads)):
        # deep prompts (after the patches) replace theirs before block i
        if 0 < i < len(model.vision_prompts):
            R[:, 1 + gh * gw:] = eye[1 + gh * gw:]
        # (T, L or 1, L): the last block computes the class token alone
        R = R[:, :A.shape[2]] + (G * A).clamp(min=0).mean(dim=1) @ R
    # (T, L) -> (T, gh, gw): class token over patches
    relevance = R[:, 0, 1:1 + gh * gw].reshape(T, gh, gw)
    return dict(logits=logits.detach(), votes=votes.detach(), relevance=relevance.detach(), target=target)


# --------------------------------------------------------------------------------------------------
# Command line: classify one video

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Top-5 classes of a video with a ViFi-CLIP or CLIP model.")
    p.add_argument("video", help="a video file PyAV can decode")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help='comma-separated class names, e.g. "archery,playing guitar"')
    g.add_argument("--labels-file", help="one class name per line, or an 'id,name' CSV")
    p.add_argument("--model", default="ViT-B/16",
                   help="base CLIP: a name or a path (its weights with no --checkpoint)")
    p.add_argument("--checkpoint", help="an official ViFi-CLIP checkpoint or one written by train.py")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--views", default="1x1", help="CLIPSxCROPS test views, averaged")
    p.add_argument("--norm", choices=["clip", "imagenet"], help="pixel mean/std (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N, ... (default: cuda if available)")
    p.add_argument("--explain", metavar="HTML",
                   help="also write an explanation report (per-frame votes, relevance maps) to "
                        "this HTML file, and its numbers to the .json beside it")
    p.add_argument("--compare-base", action="store_true", help="--explain: add vanilla CLIP's (--model) maps")
    args = p.parse_args(argv)
    if args.explain and args.views != "1x1":
        p.error("--explain explains a single view; leave --views at 1x1")
    if args.compare_base and not (args.explain and args.checkpoint):
        p.error("--compare-base compares a fine-tuned --checkpoint with vanilla CLIP (--model) in an "
                "--explain report")
    if args.explain and not os.path.isdir(os.path.dirname(os.path.abspath(args.explain))):
        p.error(f"--explain {args.explain}: its folder does not exist; create it or choose another path")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        vifi.check_device(args.device)  # flags first, then files: all before any model is loaded
        if args.explain and os.path.isdir(args.explain):
            raise vifi.ConfigError(f"--explain {args.explain} is a folder; expected the path of the HTML "
                                   f"file to write (its numbers go to the .json beside it), e.g. "
                                   f"{os.path.join(args.explain, 'report.html')}")
        if not os.path.isfile(args.video):
            found = "is a folder" if os.path.isdir(args.video) else "no such file"
            raise FileNotFoundError(f"{args.video}: {found}; expected a video file that PyAV can decode")
        # one name per line, or an 'id,name' CSV (train.py's, the official files)
        if args.labels_file:
            labels = data.read_labels(args.labels_file, plain=True)
        else:
            labels = [name.strip() for name in args.labels.split(",") if name.strip()]
        n_clips, n_crops = data.parse_views(args.views)  # bad flags are refused before any download
        if len(labels) < 2:
            given = (f"--labels {args.labels!r}" if args.labels is not None
                     else f"--labels-file {args.labels_file}")
            raise vifi.ConfigError(f"{given}: expected at least two class names, found {len(labels)}")
        if args.frames < 1:
            raise vifi.ConfigError(f"--frames {args.frames}: expected at least one frame")
        ck = vifi.read_checkpoint(args.checkpoint) if args.checkpoint else None
        own = ck is not None and "vifi" in ck  # an own checkpoint holds its CLIP
        if args.model in clip_model.MODELS and (not own or args.compare_base):
            # OpenAI's weights and the vocabulary they read: offline, one message names both
            vifi.fetch_model_files(args.model)
        clip = None if own else clip_model.load(args.model)
        if ck:
            model = vifi.load_checkpoint(args.checkpoint, clip, labels, ck=ck)
        else:
            model = vifi.ViFiCLIP(clip, labels, mode="zeroshot")
        model.to(args.device).eval()
        # --compare-base: vanilla CLIP, the --model a fine-tuned checkpoint started from
        base_model = None
        if args.compare_base:
            base_model = vifi.ViFiCLIP(clip or clip_model.load(args.model), labels, mode="zeroshot")
            base_model.to(args.device).eval()
        size = model.clip.config.image_resolution
        dataset = data.VideoDataset([(args.video, 0)], labels, args.frames, size, clips=n_clips,
                                    crops=n_crops)
        video, _ = dataset.load(args.video)  # uint8 (V, T, 3, H, W)
    except (OSError, data.VideoError, data.DatasetError, archive.CheckpointError, clip_model.ModelError,
            tokenizer.VocabError, vifi.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # each model gets the pixel mean/std it was trained with, unless --norm says otherwise
    def pixels(m):
        return data.normalize(video.to(args.device), *data.NORMS[args.norm or m.norm])

    # (V, T, 3, H, W) -> (1, V, T, 3, H, W) -> (1, C) -> (C,)
    probs = model.predict(pixels(model)[None])[0]
    if args.explain:  # the same video again, through the path that keeps attention weights
        # (V=1, T, 3, H, W) -> (T, 3, H, W); its logits are the votes' sums
        result = votes_and_relevance(model, pixels(model)[0], target=int(probs.argmax()))
        base = base_model and votes_and_relevance(base_model, pixels(base_model)[0],
                                                  target=result["target"])
        settings = dict(model=args.model if clip else None, checkpoint=args.checkpoint, frames=args.frames,
                        input_size=size, norm=args.norm or model.norm, device=args.device,
                        logit_scale=round(model.clip.logit_scale.exp().item(), 4),
                        relevance="gradient-weighted attention rollout (Chefer et al. 2021)",
                        base=args.model if base_model else None)
        report.write_report(args.explain, args.video, labels, video[0], result["logits"], result, settings,
                            base)
    for p_, i in zip(*probs.topk(min(5, len(labels)))):
        print(f"{100 * p_.item():6.2f}%  {labels[i]}")
    if args.explain:
        print(f"wrote {args.explain} and {os.path.splitext(args.explain)[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
