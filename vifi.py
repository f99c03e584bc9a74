"""
ViFi-CLIP: "Fine-tuned CLIP Models are Efficient Video Learners" (Rasheed et al., CVPR 2023, arXiv 2212.03640).

The whole method is CLIP applied to frames, with nothing added for time:
  video (B, T, 3, H, W) -> every frame through CLIP's image encoder in one batch -> (B, T, D)
                        -> mean over T (temporal pooling)                        -> (B, D)   video embedding
  class names -> prompts "a photo of a {name}." -> CLIP's text encoder           -> (C, D)   class embeddings
  logits = exp(logit_scale) * cos(video, class)                                  -> (B, C)
Fine-tuning both towers on video with cross-entropy over these logits ("ViFi-CLIP", paper Sec. 3) is enough to
bridge the image-to-video gap: the frame-level features learn motion cues through the averaged loss. Mean pooling
works because each frame embedding already describes its scene and pose; the average keeps what the video's frames
agree on, and fine-tuning teaches the encoder to make frame features whose average is discriminative.

For low-data regimes, "bridge and prompt" (Sec. 3.2): freeze the video-fine-tuned model and learn deep prompts,
n tokens per layer on each side (text: right after SOT; vision: after the patch tokens), replaced before every
layer up to a depth. The layout is the official repository's, so its prompt checkpoints load here.

Letters in shape comments: B clips, V views of a video (clips x crops, averaged in evaluation), T frames, C classes,
D joint embedding size, L tokens (of a text, or of an image: class token, patches, prompts), n prompt tokens.

Run on a video: `python vifi.py VIDEO --labels "class a,class b" [--model ViT-B/16] [--checkpoint FILE]`;
`--explain report.html` adds what each frame votes and where the encoder looks (votes_and_relevance, report.py).
"""
import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import archive
import clip_model
import tokenizer

MODES = ("finetune", "prompt", "zeroshot")
TOWERS = ("both", "image", "text")


class ConfigError(ValueError):
    """A mode, tower choice or prompt size that this CLIP cannot have."""


def check_device(name):
    """--device names a device torch can use on this machine: refused with one line before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name; expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch can use; leave --device out "
                          "to use the CPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                          "from 0")
    try:  # any other kind (mps, xpu, ...): an empty tensor there is the cheapest test
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # AssertionError: a torch built without that backend
        raise ConfigError(f"--device {name}: this torch build or machine has no such device; leave --device out "
                          "for the best available") from None
    return device


def tokenizer_for(clip):
    """CLIP's BPE for OpenAI's vocabulary; the byte-level tokenizer for a model trained from scratch with it."""
    byte_level = tokenizer.Tokenizer(byte_level=True)
    return byte_level if clip.config.vocab_size == byte_level.vocab_size else tokenizer.default_tokenizer()


def clean_classname(name):
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'brush_hair' -> 'brush hair': words the text encoder knows."""
    name = name.replace("_", " ")
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)  # split CamelCase
    return " ".join(name.split()).lower()


@dataclass
class ViFiConfig:
    """What a ViFiCLIP is, beyond the CLIP it wraps and its class list; a checkpoint saves it as a dict."""
    mode: str = "finetune"     # one of MODES
    towers: str = "both"       # finetune: the encoders that train, one of TOWERS
    template: str | None = None  # the prompt around a class name; None: the mode's own (see ViFiCLIP)
    clean_names: bool = False  # prompts hold clean_classname(name) instead of the name verbatim
    n_ctx_text: int = 10       # prompt mode: learned tokens per layer on the text side,
    n_ctx_vision: int = 10     # on the vision side,
    depth_text: int = 12       # and how many layers get them, text
    depth_vision: int = 12     # and vision
    norm: str = "clip"         # the name of the pixel mean/std the inputs need: "clip" or "imagenet" (data.NORMS)


class ViFiCLIP(nn.Module):
    """
    clip: a clip_model.CLIP; classnames: the labels, in class-id order; mode: one of MODES; cfg: a ViFiConfig, whose
    fields `mode` and the other keywords override; tokenizer: tokenizer_for(clip) unless given.
    finetune: the towers named by `towers` train ('both' is ViFi-CLIP; 'image' and 'text' are the paper's ablations).
    prompt: every CLIP weight frozen, deep text and vision prompts train (n_ctx_*, depth_*); zeroshot: vanilla CLIP.
    """

    def __init__(self, clip, classnames, mode=None, cfg=None, tokenizer=None, **overrides):
        super().__init__()
        cfg = replace(cfg or ViFiConfig(), **overrides, **({"mode": mode} if mode else {}))  # this model's own copy
        if cfg.mode != "prompt":  # no prompts: its checkpoints record none
            cfg.n_ctx_text = cfg.n_ctx_vision = cfg.depth_text = cfg.depth_vision = 0
        if cfg.mode not in MODES or cfg.towers not in TOWERS:
            raise ConfigError(f"mode must be one of {MODES}, towers one of {TOWERS}; got {cfg.mode!r}, {cfg.towers!r}")
        cfg.template = cfg.template or ("{}" if cfg.mode == "zeroshot" else "a photo of a {}.")  # the official prompts
        if cfg.template.count("{}") != 1:
            raise ConfigError(f"the template must hold exactly one '{{}}' for the class name; got {cfg.template!r}")
        self.clip, self.cfg, self.tokenizer = clip, cfg, tokenizer or tokenizer_for(clip)
        self.text_prompts, self.vision_prompts = nn.ParameterList(), nn.ParameterList()
        if cfg.mode == "prompt":
            c = clip.config
            n_text, n_vision, d_text, d_vision = cfg.n_ctx_text, cfg.n_ctx_vision, cfg.depth_text, cfg.depth_vision
            if not (0 < d_text <= c.text_layers and 0 < d_vision <= c.vision_layers):
                raise ConfigError(f"prompt depths must be in 1..{c.text_layers} (text) and 1..{c.vision_layers} "
                                  f"(vision); got {d_text}, {d_vision}")
            if not (0 < n_text <= c.context_length - 4 and n_vision > 0):  # SOT, a name, '.', EOT
                raise ConfigError(f"prompt tokens must be in 1..{c.context_length - 4} (text, a context of "
                                  f"{c.context_length}) and at least 1 (vision); got {n_text}, {n_vision}")
            # One (n, width) prompt per layer up to the depth, drawn with std 0.02 as the official ones were.
            self.text_prompts.extend(nn.Parameter(0.02 * torch.randn(n_text, c.text_width)) for _ in range(d_text))
            self.vision_prompts.extend(nn.Parameter(0.02 * torch.randn(n_vision, c.vision_width))
                                       for _ in range(d_vision))
        # Checked by text_features: a plain list (nothing registered twice), which torch.compile reads (README, Speed)
        self.text_side = [*self.text_prompts, *clip.transformer.parameters()]
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self.set_classnames(classnames)

    mode = property(lambda self: self.cfg.mode)  # model.mode, model.norm: the config's (train.py sets the norm used)
    norm = property(lambda self: self.cfg.norm, lambda self, name: setattr(self.cfg, "norm", name))

    def trainable_parameters(self):
        """The parameters this mode trains; all others are frozen by the constructor."""
        if self.cfg.mode == "prompt":
            return [*self.text_prompts, *self.vision_prompts]
        if self.cfg.mode == "zeroshot":
            return []
        c = self.clip
        # What the official fine-tuning trains: not the token embedding (it embeds the prompts once, outside the
        # trained text encoder), and logit_scale only when both towers train.
        text = [c.positional_embedding, c.text_projection, *c.transformer.parameters(), *c.ln_final.parameters()]
        image = list(c.visual.parameters())
        return {"both": image + text + [c.logit_scale], "image": image, "text": text}[self.cfg.towers]

    # --- text side --------------------------------------------------------------------------------------------

    def prompts_for(self, classnames):
        names = [clean_classname(n) if self.cfg.clean_names else n for n in classnames]
        if self.cfg.mode == "prompt":  # n placeholder tokens, replaced by the learned text prompts after embedding
            x = " ".join(["X"] * len(self.text_prompts[0]))
            return [f"{x} {name.replace('_', ' ')}." for name in names]  # '_' -> ' ', as the official prompt learner
        return [self.cfg.template.format(name) for name in names]

    def set_classnames(self, classnames):
        """Switch the class list (for example base -> novel classes); the text cache starts again."""
        self.classnames, prompts = list(classnames), self.prompts_for(classnames)
        warn_long_prompts(self.classnames, prompts, self.tokenizer, self.clip.config.context_length)
        ids = tokenizer.tokenize(prompts, self.clip.config.context_length, tokenizer=self.tokenizer)
        ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]  # (C, 77) -> (C, L): cut after the last EOT (encode_text)
        self.register_buffer("text_ids", ids.to(self.clip.logit_scale.device), persistent=False)
        self.text_cache = None

    def text_features(self):
        """(C, D); cached unless the text side is training right now, so evaluation encodes the prompts once."""
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.text_side):
            return self.clip.encode_text(self.text_ids, list(self.text_prompts), cut=False)
        if self.text_cache is None or self.text_cache.device != self.text_ids.device:
            with torch.no_grad():
                self.text_cache = self.clip.encode_text(self.text_ids, list(self.text_prompts), cut=False)
        return self.text_cache

    def train(self, mode=True):
        self.text_cache = None  # weights may change in training, or have changed: encode again when next asked
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- video side -------------------------------------------------------------------------------------------

    def encode_video(self, video):
        B, T = video.shape[:2]
        images = video.flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W): all frames in one batched pass
        feats = self.clip.encode_image(images, list(self.vision_prompts))  # (B*T, D)
        return feats.view(B, T, -1).mean(dim=1)  # (B*T, D) -> (B, T, D) -> (B, D): temporal mean pooling

    def forward(self, video):
        """video: (B, T, 3, H, W) normalized pixels -> logits (B, C)."""
        v = F.normalize(self.encode_video(video), dim=-1)
        t = F.normalize(self.text_features(), dim=-1)
        return self.clip.logit_scale.exp() * v @ t.t().to(v.dtype)

    @torch.no_grad()
    def predict(self, views):
        """views: (B, V, T, 3, H, W) normalized pixels, V views of each video -> (B, C) class probabilities: the
        softmax of each view's logits, averaged over the views. In float32, also under autocast."""
        logits = self(views.flatten(0, 1))  # (B, V, T, 3, H, W) -> (B*V, T, 3, H, W) -> (B*V, C)
        return logits.float().softmax(-1).view(*views.shape[:2], -1).mean(dim=1)  # (B*V, C) -> (B, V, C) -> (B, C)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the official releases and this project's own

class _CfgNode(dict):
    """Stands in for yacs' CfgNode, a dict subclass holding sets of key names, so official configs unpickle."""


_warned_prompts = set()  # the prompts already reported by warn_long_prompts


def warn_long_prompts(classnames, prompts, tok, context_length):
    """A warning on stderr, once per prompt, for each prompt that is cut to the text encoder's context (the
    official code stops with an error there; a long class name should not stop a run)."""
    for name, prompt in zip(classnames, prompts):
        length = len(tok.encode(prompt)) + 2  # with SOT and EOT
        if length > context_length and prompt not in _warned_prompts:
            _warned_prompts.add(prompt)
            print(f"warning: the prompt of class {name!r} is {length} tokens, more than the text encoder's context of "
                  f"{context_length}: it is cut to fit, keeping its end-of-text token (the official code stops "
                  "with an error); shorten the class name to keep all of it", file=sys.stderr)


# The ids of OpenAI's BPE (256 bytes, their 256 word-final forms, 48894 merges, SOT and EOT), the only tokenizer
# the official code uses: the vocabulary of every official checkpoint's base CLIP.
OPENAI_VOCAB_SIZE = 49408
OFFICIAL_GLOBALS = {("yacs.config", "CfgNode"): _CfgNode, ("builtins", "set"): set, ("__builtin__", "set"): set}


def read_checkpoint(path):
    """The dict in a checkpoint file, ours or an official release. archive.read_archive reads it: only tensors,
    plain containers and yacs config nodes unpickle, so no file can run code, and a damaged file is refused."""
    ck = archive.read_archive(path, "an official ViFi-CLIP checkpoint or one written by train.py", OFFICIAL_GLOBALS)
    if not (isinstance(ck, dict) and isinstance(ck.get("model"), dict)):
        found = f"a dict with keys {list(ck)[:4]}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise archive.CheckpointError(f"{path}: holds {found}, not a checkpoint (a dict with the weights under "
                                      "'model', as train.py and the official code write); a CLIP's own weights "
                                      "go to --model")
    clip_model.check_names(ck["model"], path)
    return ck


def load_official_checkpoint(path, clip, classnames, clean_names=False, ck=None, **kw):
    """A ViFiCLIP holding an official ViFi-CLIP release (fine-tuned or prompt-learned). `clip` is the base CLIP it was
    trained from: it supplies the token embedding, which official checkpoints do not store. Official models were
    trained on raw class names (clean_names=False) and ImageNet mean/std pixels. `ck`: the file's contents, if read."""
    ck = read_checkpoint(path) if ck is None else ck
    sd = ck.get("model", ck) if isinstance(ck, dict) else {}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not {"image_encoder.conv1.weight", "logit_scale"} <= sd.keys():
        raise archive.CheckpointError(
            f"{path}: not an official ViFi-CLIP checkpoint: expected keys 'image_encoder.*', 'text_encoder.*', "
            f"'logit_scale' under 'model', found e.g. {list(sd)[:3]}. Checkpoints of train.py load with load_checkpoint.")
    clip_model.check_finite(sd, [k for k, v in sd.items() if torch.is_tensor(v)], path)
    deep = re.compile(r"(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")
    mapped, text_p, vision_p = {"logit_scale": sd["logit_scale"]}, {}, {}
    for k, v in sd.items():
        if m := deep.fullmatch(k):
            (vision_p if m[1] == "image" else text_p)[int(m[2])] = v
        elif k == "image_encoder.VPT":
            vision_p[0] = v
        elif k == "prompt_learner.ctx":
            text_p[0] = v
        elif k.startswith("image_encoder."):
            mapped["visual." + k.removeprefix("image_encoder.")] = v
        elif k.startswith("text_encoder."):
            mapped[k.removeprefix("text_encoder.")] = v
        # prompt_learner.token_prefix/suffix/complete_text_embeddings: the training class list's embedded prompts;
        # prompts are embedded again here for the classes asked for.
    arch = ((ck.get("config") or {}).get("MODEL") or {}).get("ARCH", "the model it was trained from")
    base = clip.state_dict()
    check_base(path, mapped, base, clip.config, arch)
    try:
        model_clip = clip_model.build({**base, **mapped, "token_embedding.weight": base["token_embedding.weight"]}, path)
    except archive.CheckpointError as e:
        raise archive.CheckpointError(f"{e}. Does the base CLIP match the checkpoint? Its config says {arch}.") from None
    prompted = dict(mode="prompt", n_ctx_text=len(text_p[0]), n_ctx_vision=len(vision_p[0]),
                    depth_text=len(text_p), depth_vision=len(vision_p)) if text_p else dict(mode="finetune")
    model = ViFiCLIP(model_clip.to(clip.logit_scale.device), classnames, clean_names=clean_names, norm="imagenet",
                     **{**prompted, **kw})
    with torch.no_grad():
        for params, found in ((model.text_prompts, text_p), (model.vision_prompts, vision_p)):
            for i, p in enumerate(params):
                p.copy_(found[i])
    return model.eval()


def check_base(path, mapped, base, base_cfg, arch):
    """Refuse a base CLIP of other sizes than the official checkpoint's CLIP (mapped: its weights under CLIP's names,
    all but the token embedding). The checkpoint's weights replace the base's, so without this a base of another
    context length or vocabulary would predict with a mix of two models. The official code tokenizes only with
    OpenAI's BPE (its clip/simple_tokenizer.py), so the checkpoint's vocabulary is that one's."""
    try:
        found = clip_model.CLIPConfig.from_state_dict({**mapped, "token_embedding.weight":
                                                                base["token_embedding.weight"]})
    except (KeyError, IndexError, AttributeError) as e:  # a key missing, or a non-tensor under it
        raise archive.CheckpointError(f"{path}: not a whole official ViFi-CLIP checkpoint ({type(e).__name__}: {e} "
                                      "in its text_encoder.* or image_encoder.* weights)") from None
    found = replace(found, vocab_size=OPENAI_VOCAB_SIZE)
    differ = [f for f in asdict(found) if getattr(found, f) != getattr(base_cfg, f)]
    if differ:
        sizes = lambda cfg: ", ".join(f"{f}={getattr(cfg, f)}" for f in differ)  # noqa: E731
        raise archive.CheckpointError(f"{path}: an official checkpoint of a CLIP with {sizes(found)}, but the base "
                                      f"CLIP (--model) has {sizes(base_cfg)}: pass the base CLIP it was trained from "
                                      f"(its config says {arch})")


def checkpoint_config(model):
    """What load_checkpoint needs to rebuild a ViFiCLIP around its saved weights: its config and class list."""
    return {**asdict(model.cfg), "classnames": model.classnames}


def load_checkpoint(path, clip=None, classnames=None, tokenizer=None, ck=None, **kw):
    """Any checkpoint: this project's ({'model': state dict, 'vifi': checkpoint_config(...)}, self-contained) or
    an official one (needs the base `clip`). `classnames` replaces the saved class list; `ck`: the file's contents,
    if already read."""
    ck = read_checkpoint(path) if ck is None else ck
    if not (isinstance(ck, dict) and "vifi" in ck):
        if clip is None:
            raise archive.CheckpointError(f"{path} is an official ViFi-CLIP checkpoint: pass the base CLIP (--model)")
        return load_official_checkpoint(path, clip, classnames, ck=ck, **kw)
    saved_clip = clip_model.build(ck["model"], path)  # an own checkpoint holds its whole CLIP
    try:
        saved = ViFiConfig(**{k: v for k, v in ck["vifi"].items() if k != "classnames"})
        model = ViFiCLIP(saved_clip, classnames or ck["vifi"]["classnames"], cfg=saved, tokenizer=tokenizer, **kw)
    except (TypeError, KeyError) as e:
        raise archive.CheckpointError(f"{path}: its 'vifi' entry does not describe a ViFiCLIP ({type(e).__name__}: "
                                      f"{e}); expected the checkpoint_config(...) that train.py saves") from None
    # build() checked the CLIP's keys; the prompts are checked here, so a missing or renamed one is an error too
    clip_model.check_state_dict(ck["model"], model.state_dict(), path, "the ViFi-CLIP its 'vifi' entry describes")
    model.load_state_dict(ck["model"])
    return model.eval()


def model_files(model_name, need_vocab=True):
    """(url, path, sha256) of what a model needs from the network: OpenAI's weights for a name of clip_model.MODELS
    (nothing for a path or None), and CLIP's BPE vocabulary if need_vocab and $VIFI_BPE does not name a copy."""
    weights = [clip_model.release(model_name)] if model_name in clip_model.MODELS else []
    vocab = [(tokenizer.BPE_URL, os.path.join(tokenizer.cache_dir(), tokenizer.BPE_FILE), tokenizer.BPE_SHA256)]
    return weights + (vocab if need_vocab and not os.environ.get("VIFI_BPE") else [])


def fetch_model_files(model_name, need_vocab=True):
    """Download what model_files names, every file before failing: offline, one message names all that is missing."""
    failed = []
    for url, path, sha256 in model_files(model_name, need_vocab):
        try:
            archive.download(url, path, sha256)
        except archive.CheckpointError:
            failed.append(f"{url} -> {path}")
    if failed:
        raise archive.CheckpointError("could not fetch what the model needs:\n  " + "\n  ".join(failed) +
                                      "\nWithout network, download them elsewhere and place them there "
                                      "(VIFI_CACHE sets the folder; VIFI_BPE may name the vocabulary file)")


# ----------------------------------------------------------------------------------------------------------------
# Explanation: what each frame votes for, and where the image encoder looks (drawn by report.py)

def votes_and_relevance(model, video, target=None):
    """video: one video's frames (T, 3, H, W), normalized. -> logits (C,), votes (T, C), and for `target` (default:
    the top class) relevance (T, gh, gw) over the patch grid.
    votes: the video embedding is the mean of the T frame embeddings f_t, so every logit splits exactly into T terms:
    s <mean f, t_c> / (|mean f| |t_c|) = sum_t s <f_t, t_c> / (T |mean f| |t_c|), one per frame.
    relevance (Chefer et al. 2021, gradient-weighted attention rollout): raw attention in a ViT is mostly mixing that
    is not specific to any class, and gradients alone are noisy, so each block's attention is weighted by its
    gradient for the class, only the positive part kept, and rolled out through the residual connections:
    R = I; for every block R += mean over heads(max(0, grad * A)) @ R; the map is the class token's row over patches."""
    vis = model.clip.visual
    for block in vis.transformer.resblocks:
        block.attn.keep_weights = True  # the written-out attention: same logits as SDPA, weights kept
    try:
        video = video.detach().requires_grad_()  # even with every weight frozen, the attention then carries gradients
        f = model.clip.encode_image(video, list(model.vision_prompts))  # (T, D)
        weights = [block.attn.weights for block in vis.transformer.resblocks]  # each (T, heads, L or 1, L)
    finally:
        for block in vis.transformer.resblocks:
            block.attn.keep_weights, block.attn.weights = False, None
    t = F.normalize(model.text_features(), dim=-1).to(f.dtype)  # (C, D)
    votes = model.clip.logit_scale.exp() * f @ t.t() / (len(f) * f.mean(dim=0).norm())  # (T, C)
    logits = votes.sum(dim=0)  # (C,)
    target = int(logits.argmax()) if target is None else target
    grads = torch.autograd.grad(logits[target], weights)
    T, L = len(f), weights[0].shape[-1]
    gh, gw = video.shape[-2] // vis.patch_size, video.shape[-1] // vis.patch_size
    eye = torch.eye(L, device=f.device)
    R = eye.repeat(T, 1, 1)  # (T, L, L): every token starts as evidence for itself only
    for i, (A, G) in enumerate(zip(weights, grads)):
        if 0 < i < len(model.vision_prompts):  # deep prompts (after the patches) replace their tokens before block i
            R[:, 1 + gh * gw:] = eye[1 + gh * gw:]
        R = R[:, :A.shape[2]] + (G * A).clamp(min=0).mean(dim=1) @ R  # (T, L or 1, L); the last block: class token
    relevance = R[:, 0, 1:1 + gh * gw].reshape(T, gh, gw)  # (T, L) -> (T, gh, gw): the class token over patches
    return dict(logits=logits.detach(), votes=votes.detach(), relevance=relevance.detach(), target=target)


# ----------------------------------------------------------------------------------------------------------------
# Command line: classify one video

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Top-5 classes of a video with a ViFi-CLIP or CLIP model.")
    p.add_argument("video", help="a video file PyAV can decode")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help='comma-separated class names, e.g. "archery,playing guitar"')
    g.add_argument("--labels-file", help="one class name per line, or an 'id,name' CSV")
    p.add_argument("--model", default="ViT-B/16", help="base CLIP: a name or a path (its weights with no --checkpoint)")
    p.add_argument("--checkpoint", help="an official ViFi-CLIP checkpoint or one written by train.py")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--views", default="1x1", help="CLIPSxCROPS test views, averaged")
    p.add_argument("--norm", choices=["clip", "imagenet"], help="pixel mean/std (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N, ... "
                   "(default: cuda if available)")
    p.add_argument("--explain", metavar="HTML", help="also write an explanation report (per-frame votes, relevance "
                                                     "maps) to this HTML file, and its numbers to the .json beside it")
    p.add_argument("--compare-base", action="store_true", help="--explain: add vanilla CLIP's (--model) maps")
    args = p.parse_args(argv)
    if args.explain and args.views != "1x1":
        p.error("--explain explains a single view; leave --views at 1x1")
    if args.compare_base and not (args.explain and args.checkpoint):
        p.error("--compare-base compares a fine-tuned --checkpoint with vanilla CLIP (--model) in an --explain report")
    if args.explain and not os.path.isdir(os.path.dirname(os.path.abspath(args.explain))):
        p.error(f"--explain {args.explain}: its folder does not exist; create it or choose another path")
    return args


def main(argv=None):
    args = parse_args(argv)
    import data  # only the command line decodes video: the model itself stays independent of the data code
    try:
        check_device(args.device)  # flags first, then files: all before any model is loaded (or downloaded)
        if args.explain and os.path.isdir(args.explain):
            raise ConfigError(f"--explain {args.explain} is a folder; expected the path of the HTML file to write "
                              f"(its numbers go to the .json beside it), e.g. "
                              f"{os.path.join(args.explain, 'report.html')}")
        if not os.path.isfile(args.video):
            found = "is a folder" if os.path.isdir(args.video) else "no such file"
            raise FileNotFoundError(f"{args.video}: {found}; expected a video file that PyAV can decode")
        if args.labels_file:  # one name per line, or an 'id,name' CSV (train.py's and the official label files)
            labels = data.read_labels(args.labels_file, plain=True)
        else:
            labels = [name.strip() for name in args.labels.split(",") if name.strip()]
        n_clips, n_crops = data.parse_views(args.views)  # bad flags are refused before any download
        if len(labels) < 2:
            given = f"--labels {args.labels!r}" if args.labels is not None else f"--labels-file {args.labels_file}"
            raise ConfigError(f"{given}: expected at least two class names, found {len(labels)}")
        if args.frames < 1:
            raise ConfigError(f"--frames {args.frames}: expected at least one frame")
        ck = read_checkpoint(args.checkpoint) if args.checkpoint else None
        own = ck is not None and "vifi" in ck  # an own checkpoint holds its CLIP
        if args.model in clip_model.MODELS and (not own or args.compare_base):
            fetch_model_files(args.model)  # OpenAI's weights and the vocabulary they read: offline, one message
        clip = None if own else clip_model.load(args.model)
        model = load_checkpoint(args.checkpoint, clip, labels, ck=ck) if ck else ViFiCLIP(clip, labels, mode="zeroshot")
        model.to(args.device).eval()
        base_model = None  # --compare-base: vanilla CLIP, the --model a fine-tuned checkpoint started from
        if args.compare_base:
            base_model = ViFiCLIP(clip or clip_model.load(args.model), labels, mode="zeroshot").to(args.device).eval()
        size = model.clip.config.image_resolution
        dataset = data.VideoDataset([(args.video, 0)], labels, args.frames, size, clips=n_clips, crops=n_crops)
        video, _ = dataset.load(args.video)  # uint8 (V, T, 3, H, W)
    except (OSError, data.VideoError, data.DatasetError, archive.CheckpointError, tokenizer.VocabError,
            ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def pixels(m):  # each model gets the pixel mean/std it was trained with, unless --norm says otherwise
        return data.normalize(video.to(args.device), *data.NORMS[args.norm or m.norm])

    probs = model.predict(pixels(model)[None])[0]  # (V, T, 3, H, W) -> (1, V, T, 3, H, W) -> (1, C) -> (C,)
    if args.explain:  # the same video again, through the path that keeps attention weights (logits: the votes' sums)
        import report
        result = votes_and_relevance(model, pixels(model)[0], target=int(probs.argmax()))  # (V=1, T, ...) -> (T, ...)
        base = base_model and votes_and_relevance(base_model, pixels(base_model)[0], target=result["target"])
        settings = dict(model=args.model if clip else None, checkpoint=args.checkpoint, frames=args.frames,
                        input_size=size, norm=args.norm or model.norm, device=args.device,
                        logit_scale=round(model.clip.logit_scale.exp().item(), 4),
                        relevance="gradient-weighted attention rollout (Chefer et al. 2021)",
                        base=args.model if base_model else None)
        report.write_report(args.explain, args.video, labels, video[0], result["logits"], result, settings, base)
    for p_, i in zip(*probs.topk(min(5, len(labels)))):
        print(f"{100 * p_.item():6.2f}%  {labels[i]}")
    if args.explain:
        print(f"wrote {args.explain} and {os.path.splitext(args.explain)[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
