"""
ViFi-CLIP: "Fine-tuned CLIP Models are Efficient Video Learners" (Rasheed et al., CVPR 2023,
arXiv 2212.03640).

The whole method is CLIP applied to frames, with nothing added for time:
  video (B, T, 3, H, W) -> every frame through CLIP's image encoder in one batch  -> (B, T, D)
                        -> mean over T (temporal pooling)                         -> (B, D) video
  class names -> prompts "a photo of a {name}." -> CLIP's text encoder            -> (C, D) classes
  logits = exp(logit_scale) * cos(video, class)                                   -> (B, C)
Fine-tuning both towers on video with cross-entropy over these logits ("ViFi-CLIP", paper Sec. 3) is
enough to bridge the image-to-video gap: the frame-level features learn motion cues through the
averaged loss. Mean pooling works because each frame embedding already describes its scene and pose;
the average keeps what the video's frames agree on, and fine-tuning teaches the encoder to make
frame features whose average is discriminative.

For low-data regimes, "bridge and prompt" (Sec. 3.2): freeze the video-fine-tuned model and learn
deep prompts, n tokens per layer on each side (text: right after SOT; vision: after the patch
tokens), replaced before every layer up to a depth. The layout is the official repository's, so its prompt
checkpoints load here.

Letters in shape comments: B clips, V views of a video (clips x crops, averaged in evaluation),
T frames, C classes, D joint embedding size, L tokens (of a text, or of an image: class token,
patches, prompts), n prompt tokens.

This file imports only clip_model.py and tokenizer.py at module level, so the three copy into other
code together; archive.py is imported where a checkpoint is read or a file downloaded. To classify a
video from the command line: `python predict.py VIDEO --labels "class a,class b"`.
"""
import os
import re
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import tokenizer

MODES = ("finetune", "prompt", "zeroshot")
TOWERS = ("both", "image", "text")


class ConfigError(ValueError):
    """A mode, tower choice or prompt size that this CLIP cannot have."""


def check_device(name):
    """--device names a device torch can use on this machine (train.py, predict.py): refused with
    one line before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name; expected cpu, "
                          "cuda, cuda:N, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch can use; leave --device "
                          "out to use the CPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          "numbered from 0")
    try:  # any other kind (mps, xpu, ...): an empty tensor there is the cheapest test
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # AssertionError: a torch built without that backend
        raise ConfigError(f"--device {name}: this torch build or machine has no such device; leave --device "
                          "out for the best available") from None
    return device


def tokenizer_for(clip):
    """CLIP's BPE for OpenAI's vocabulary (its file fetched into the cache on first use); the
    byte-level tokenizer for a model trained from scratch with it."""
    byte_level = tokenizer.Tokenizer(byte_level=True)
    if clip.config.vocab_size == byte_level.vocab_size:
        return byte_level
    try:
        return tokenizer.default_tokenizer()
    except tokenizer.VocabError:  # not found: fetched into the cache (sha256 checked), then read
        fetch_model_files(None)
        return tokenizer.default_tokenizer()


def clean_classname(name):
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'brush_hair' -> 'brush hair': words the text encoder
    knows."""
    name = name.replace("_", " ")
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)  # split CamelCase
    return " ".join(name.split()).lower()


_warned_prompts = set()  # the prompts already reported by warn_long_prompts


def warn_long_prompts(classnames, prompts, tok, context_length):
    """A warning on stderr, once per prompt, for each prompt that is cut to the text encoder's
    context (the official code stops with an error there; a long class name should not stop a
    run)."""
    for name, prompt in zip(classnames, prompts):
        length = len(tok.encode(prompt)) + 2  # with SOT and EOT
        if length > context_length and prompt not in _warned_prompts:
            _warned_prompts.add(prompt)
            print(f"warning: the prompt of class {name!r} is {length} tokens, more than the text "
                  f"encoder's context of {context_length}: it is cut to fit, keeping its "
                  "end-of-text token (the official code stops with an error); shorten the class "
                  "name to keep all of it", file=sys.stderr)


@dataclass
class ViFiConfig:
    """What a ViFiCLIP is, beyond the CLIP it wraps and its class list; a checkpoint saves it as a
    dict."""
    mode: str = "finetune"     # one of MODES
    towers: str = "both"       # finetune: the encoders that train, one of TOWERS
    template: str | None = None  # the prompt around a class name; None: the mode's (see resolve)
    clean_names: bool = False  # prompts hold clean_classname(name) instead of the name verbatim
    n_ctx_text: int = 10       # prompt mode: learned tokens per layer on the text side,
    n_ctx_vision: int = 10     # on the vision side,
    depth_text: int = 12       # and how many layers get them, text
    depth_vision: int = 12     # and vision
    norm: str = "clip"         # the pixel mean/std the inputs need: "clip" or "imagenet"

    def resolve(self, clip_config):
        """Fill in what the mode implies and refuse what a CLIP of clip_config's sizes cannot have
        (ConfigError). Changes this config in place: ViFiCLIP calls it on its own copy."""
        if self.mode != "prompt":  # no prompts: its checkpoints record none
            self.n_ctx_text = self.n_ctx_vision = self.depth_text = self.depth_vision = 0
        if self.mode not in MODES or self.towers not in TOWERS:
            raise ConfigError(f"mode must be one of {MODES}, towers one of {TOWERS}; "
                              f"got {self.mode!r}, {self.towers!r}")
        # the official prompts: the class name alone for zero-shot CLIP, a photo of it for
        # fine-tuning
        self.template = self.template or ("{}" if self.mode == "zeroshot" else "a photo of a {}.")
        if self.template.count("{}") != 1:
            raise ConfigError(f"the template must hold exactly one '{{}}' for the class name; "
                              f"got {self.template!r}")
        if self.mode != "prompt":
            return self
        c, n_text, n_vision = clip_config, self.n_ctx_text, self.n_ctx_vision
        if not (0 < self.depth_text <= c.text_layers and 0 < self.depth_vision <= c.vision_layers):
            raise ConfigError(f"prompt depths must be in 1..{c.text_layers} (text) and 1..{c.vision_layers} "
                              f"(vision); got {self.depth_text}, {self.depth_vision}")
        if not (0 < n_text <= c.context_length - 4 and n_vision > 0):  # SOT, a name, '.', EOT
            raise ConfigError(f"prompt tokens must be in 1..{c.context_length - 4} (text, a context of "
                              f"{c.context_length}) and at least 1 (vision); got {n_text}, {n_vision}")
        return self


class ViFiCLIP(nn.Module):
    """
    clip: a clip_model.CLIP; classnames: the labels, in class-id order; mode: one of MODES; cfg: a
    ViFiConfig, whose fields `mode` and the other keywords override; tokenizer: tokenizer_for(clip)
    unless given.
    finetune: the towers named by `towers` train ('both' is ViFi-CLIP; 'image' and 'text' are the
    paper's ablations).
    prompt: every CLIP weight frozen, deep text and vision prompts train (n_ctx_*, depth_*).
    zeroshot: vanilla CLIP.
    """

    def __init__(self, clip, classnames, mode=None, cfg=None, tokenizer=None, **overrides):
        super().__init__()
        mode = {"mode": mode} if mode else {}
        cfg = replace(cfg or ViFiConfig(), **overrides, **mode).resolve(clip.config)  # its own copy
        self.clip, self.cfg, self.tokenizer = clip, cfg, tokenizer or tokenizer_for(clip)
        self.text_prompts, self.vision_prompts = nn.ParameterList(), nn.ParameterList()
        if cfg.mode == "prompt":
            # One (n, width) prompt per layer up to the depth, drawn with std 0.02 as the official
            # ones were.
            c = clip.config
            self.text_prompts.extend(nn.Parameter(0.02 * torch.randn(cfg.n_ctx_text, c.text_width))
                                     for _ in range(cfg.depth_text))
            self.vision_prompts.extend(nn.Parameter(0.02 * torch.randn(cfg.n_ctx_vision, c.vision_width))
                                       for _ in range(cfg.depth_vision))
        # Checked by text_features: a plain list (nothing registered twice), which torch.compile
        # reads
        self.text_side = [*self.text_prompts, *clip.transformer.parameters()]
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self.set_classnames(classnames)

    # model.mode, model.norm: the config's (train.py sets the norm used)
    mode = property(lambda self: self.cfg.mode)
    norm = property(lambda self: self.cfg.norm, lambda self, name: setattr(self.cfg, "norm", name))

    def trainable_parameters(self):
        """The parameters this mode trains; all others are frozen by the constructor."""
        if self.cfg.mode == "prompt":
            return [*self.text_prompts, *self.vision_prompts]
        if self.cfg.mode == "zeroshot":
            return []
        c = self.clip
        # What the official fine-tuning trains: not the token embedding (it embeds the prompts once,
        # outside the trained text encoder), and logit_scale only when both towers train.
        text = [c.positional_embedding, c.text_projection, *c.transformer.parameters(),
                *c.ln_final.parameters()]
        image = list(c.visual.parameters())
        return {"both": image + text + [c.logit_scale], "image": image, "text": text}[self.cfg.towers]

    # --- text side ----------------------------------------------------------------------------------

    def prompts_for(self, classnames):
        names = [clean_classname(n) if self.cfg.clean_names else n for n in classnames]
        # n placeholders, replaced by the learned text prompts after embedding
        if self.cfg.mode == "prompt":
            x = " ".join(["X"] * len(self.text_prompts[0]))
            # '_' -> ' ', as the official prompt learner does
            return [f"{x} {name.replace('_', ' ')}." for name in names]
        return [self.cfg.template.format(name) for name in names]

    def set_classnames(self, classnames):
        """Switch the class list (for example base -> novel classes); the text cache starts
        again."""
        self.classnames, prompts = list(classnames), self.prompts_for(classnames)
        warn_long_prompts(self.classnames, prompts, self.tokenizer, self.clip.config.context_length)
        ids = tokenizer.tokenize(prompts, self.clip.config.context_length, tokenizer=self.tokenizer)
        # (C, 77) -> (C, L): cut after the last EOT (as encode_text does)
        ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
        self.register_buffer("text_ids", ids.to(self.clip.logit_scale.device), persistent=False)
        self.text_cache = None

    def text_features(self):
        """(C, D); cached unless the text side is training right now, so evaluation encodes the
        prompts once."""
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.text_side):
            return self.clip.encode_text(self.text_ids, list(self.text_prompts), cut=False)
        if self.text_cache is None or self.text_cache.device != self.text_ids.device:
            with torch.no_grad():
                self.text_cache = self.clip.encode_text(self.text_ids, list(self.text_prompts), cut=False)
        return self.text_cache

    def train(self, mode=True):
        # weights may change in training, or have changed: encode again when asked
        self.text_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.text_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- video side ---------------------------------------------------------------------------------

    def encode_video(self, video):
        B, T = video.shape[:2]
        # (B, T, 3, H, W) -> (B*T, 3, H, W): all frames in one batched pass
        images = video.flatten(0, 1)
        feats = self.clip.encode_image(images, list(self.vision_prompts))  # (B*T, D)
        # (B*T, D) -> (B, T, D) -> (B, D): temporal mean pooling
        return feats.view(B, T, -1).mean(dim=1)

    def forward(self, video):
        """video: (B, T, 3, H, W) normalized pixels -> logits (B, C)."""
        v = F.normalize(self.encode_video(video), dim=-1)
        t = F.normalize(self.text_features(), dim=-1)
        return self.clip.logit_scale.exp() * v @ t.t().to(v.dtype)

    @torch.no_grad()
    def predict(self, views):
        """views: (B, V, T, 3, H, W) normalized pixels, V views of each video -> (B, C) class
        probabilities: the softmax of each view's logits, averaged over the views. In float32, also
        under autocast."""
        logits = self(views.flatten(0, 1))  # (B, V, T, 3, H, W) -> (B*V, T, 3, H, W) -> (B*V, C)
        probs = logits.float().softmax(-1).view(*views.shape[:2], -1)  # (B*V, C) -> (B, V, C)
        return probs.mean(dim=1)  # (B, V, C) -> (B, C)


# --------------------------------------------------------------------------------------------------
# Checkpoints: the official releases and this project's own. archive.py reads them (imported where a
# file is read), so that no file can run code; it also fetches the files a named model needs.

class _CfgNode(dict):
    """Stands in for yacs' CfgNode, a dict subclass holding sets of key names, so official configs
    unpickle."""


# The ids of OpenAI's BPE (256 bytes, their 256 word-final forms, 48894 merges, SOT and EOT), the
# only tokenizer the official code uses: the vocabulary of every official checkpoint's base CLIP.
OPENAI_VOCAB_SIZE = 49408
# of tokenizer.BPE_URL
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OFFICIAL_GLOBALS = {("yacs.config", "CfgNode"): _CfgNode, ("builtins", "set"): set,
                    ("__builtin__", "set"): set}


def read_checkpoint(path):
    """The dict in a checkpoint file, ours or an official release. archive.read_archive reads it:
    only tensors, plain containers and yacs config nodes unpickle, so no file can run code, and a
    damaged file is refused."""
    import archive
    expected = "an official ViFi-CLIP checkpoint or one written by train.py"
    ck = archive.read_archive(path, expected, OFFICIAL_GLOBALS)
    if not (isinstance(ck, dict) and isinstance(ck.get("model"), dict)):
        found = f"a dict with keys {list(ck)[:4]}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise archive.CheckpointError(f"{path}: holds {found}, not a checkpoint (a dict with the weights "
                                      "under 'model', as train.py and the official code write); a CLIP's "
                                      "own weights go to --model")
    clip_model.check_names(ck["model"], path)
    return ck


def load_official_checkpoint(path, clip, classnames, clean_names=False, ck=None, **kw):
    """A ViFiCLIP holding an official ViFi-CLIP release (fine-tuned or prompt-learned). `clip` is
    the base CLIP it was trained from: it supplies the token embedding, which official checkpoints
    do not store. Official models were trained on raw class names (clean_names=False) and ImageNet
    mean/std pixels.
    `ck`: the file's contents, if read."""
    import archive
    ck = read_checkpoint(path) if ck is None else ck
    sd = ck.get("model", ck) if isinstance(ck, dict) else {}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not {"image_encoder.conv1.weight", "logit_scale"} <= sd.keys():
        raise archive.CheckpointError(
            f"{path}: not an official ViFi-CLIP checkpoint: expected keys 'image_encoder.*', "
            f"'text_encoder.*', 'logit_scale' under 'model', found e.g. {list(sd)[:3]}. Checkpoints of "
            "train.py load with load_checkpoint.")
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
        # prompt_learner.token_prefix/suffix/complete_text_embeddings: the training class list's
        # embedded prompts; prompts are embedded again here for the classes asked for.
    layers = {"text": sorted(text_p), "vision": sorted(vision_p)}
    if (text_p or vision_p) and any(not ids or ids != list(range(len(ids))) for ids in layers.values()):
        raise archive.CheckpointError(
            f"{path}: prompts for layers {layers['text']} (text) and {layers['vision']} (vision); an "
            "official prompt checkpoint holds both sides' from layer 0 on, without gaps")
    arch = ((ck.get("config") or {}).get("MODEL") or {}).get("ARCH", "the model it was trained from")
    base = clip.state_dict()
    check_base(path, mapped, base, clip.config, arch)
    try:
        model_clip = clip_model.build({**base, **mapped, "token_embedding.weight":
                                       base["token_embedding.weight"]}, path)
    except clip_model.ModelError as e:
        raise clip_model.ModelError(f"{e}. Does the base CLIP match the checkpoint? Its config says "
                                    f"{arch}.") from None
    prompted = dict(mode="prompt", n_ctx_text=len(text_p[0]), n_ctx_vision=len(vision_p[0]),
                    depth_text=len(text_p), depth_vision=len(vision_p)) if text_p else dict(mode="finetune")
    model = ViFiCLIP(model_clip.to(clip.logit_scale.device), classnames, clean_names=clean_names,
                     norm="imagenet", **{**prompted, **kw})
    with torch.no_grad():
        for params, found in ((model.text_prompts, text_p), (model.vision_prompts, vision_p)):
            for i, p in enumerate(params):
                p.copy_(found[i])
    return model.eval()


def check_base(path, mapped, base, base_cfg, arch):
    """Refuse a base CLIP of other sizes than the official checkpoint's CLIP (mapped: its weights
    under CLIP's names, all but the token embedding). The checkpoint's weights replace the base's,
    so without this a base of another context length or vocabulary would predict with a mix of two
    models. The official code tokenizes only with OpenAI's BPE (its clip/simple_tokenizer.py), so
    the checkpoint's vocabulary is that one's."""
    import archive
    try:
        found = clip_model.CLIPConfig.from_state_dict({**mapped, "token_embedding.weight":
                                                                base["token_embedding.weight"]})
    except (KeyError, IndexError, AttributeError) as e:  # a key missing, or a non-tensor under it
        raise archive.CheckpointError(f"{path}: not a whole official ViFi-CLIP checkpoint "
                                      f"({type(e).__name__}: {e} in its text_encoder.* or image_encoder.* "
                                      "weights)") from None
    found = replace(found, vocab_size=OPENAI_VOCAB_SIZE)
    differ = [f for f in asdict(found) if getattr(found, f) != getattr(base_cfg, f)]
    if differ:
        sizes = lambda cfg: ", ".join(f"{f}={getattr(cfg, f)}" for f in differ)  # noqa: E731
        raise archive.CheckpointError(f"{path}: an official checkpoint of a CLIP with {sizes(found)}, but "
                                      f"the base CLIP (--model) has {sizes(base_cfg)}: pass the base CLIP "
                                      f"it was trained from (its config says {arch})")


def checkpoint_config(model):
    """What load_checkpoint needs to rebuild a ViFiCLIP around its saved weights: its config and
    class list."""
    return {**asdict(model.cfg), "classnames": model.classnames}


def load_checkpoint(path, clip=None, classnames=None, tokenizer=None, ck=None, **kw):
    """Any checkpoint: this project's ({'model': state dict, 'vifi': checkpoint_config(...)},
    self-contained) or an official one (needs the base `clip`). `classnames` replaces the saved
    class list;
    `ck`: the file's contents, if already read."""
    import archive
    ck = read_checkpoint(path) if ck is None else ck
    if not (isinstance(ck, dict) and "vifi" in ck):
        if clip is None:
            raise archive.CheckpointError(f"{path} is an official ViFi-CLIP checkpoint: pass the base CLIP "
                                          "(--model)")
        return load_official_checkpoint(path, clip, classnames, ck=ck, **kw)
    saved_clip = clip_model.build(ck["model"], path)  # an own checkpoint holds its whole CLIP
    try:
        saved = ViFiConfig(**{k: v for k, v in ck["vifi"].items() if k != "classnames"})
        classnames = classnames or ck["vifi"]["classnames"]
        model = ViFiCLIP(saved_clip, classnames, cfg=saved, tokenizer=tokenizer, **kw)
    except (TypeError, KeyError) as e:
        raise archive.CheckpointError(f"{path}: its 'vifi' entry does not describe a ViFiCLIP "
                                      f"({type(e).__name__}: {e}); expected the checkpoint_config(...) "
                                      "that train.py saves") from None
    # build() checked the CLIP's keys; the prompts are checked here, so a missing or renamed one is
    # an error too
    clip_model.check_state_dict(ck["model"], model.state_dict(), path,
                                "the ViFi-CLIP its 'vifi' entry describes")
    model.load_state_dict(ck["model"])
    return model.eval()


def model_files(model_name, need_vocab=True):
    """(url, path, sha256) of what a model needs from the network: OpenAI's weights for a name of
    clip_model.MODELS (nothing for a path or None), and CLIP's BPE vocabulary if need_vocab and
    $VIFI_BPE does not name a copy."""
    weights = [clip_model.release(model_name)] if model_name in clip_model.MODELS else []
    vocab = [(tokenizer.BPE_URL, os.path.join(tokenizer.cache_dir(), tokenizer.BPE_FILE), BPE_SHA256)]
    return weights + (vocab if need_vocab and not os.environ.get("VIFI_BPE") else [])


def fetch_model_files(model_name, need_vocab=True):
    """Download what model_files names, every file before failing: offline, one message names all
    that is missing."""
    import archive
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


if __name__ == "__main__":  # the method and its checkpoints: classifying a video is predict.py's
    import shlex
    print(f"error: vifi.py has no command line; to classify a video: python predict.py "
          f"{shlex.join(sys.argv[1:]) or 'VIDEO --labels ...'}", file=sys.stderr)
    sys.exit(2)
