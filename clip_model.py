"""
CLIP (Radford et al. 2021), vision transformer variants only, written from scratch for reading and
for speed.

Two towers map an image and a text to vectors in one embedding space:
  image (N, 3, R, R) -> patches -> ViT -> class token -> ln_post -> @ proj            -> (N, D)
  ids   (N, L)       -> tokens  -> causal transformer -> token at EOT -> @ text_projection -> (N, D)
and `logit_scale` is the learned inverse temperature of the cosine similarities.

Parameter names and shapes are OpenAI's, so an OpenAI state dict loads with
`load_state_dict(strict=True)` and no rename table; every size is read off the state dict's shapes,
as OpenAI's `build_model` does. What differs from OpenAI's model.py is how the math runs (each point
is explained where it is done):
- batch-first tensors and `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)
  instead of `nn.MultiheadAttention`; the packed `in_proj_weight` is kept, so one matmul makes q, k
  and v (Attention);
- QuickGELU as one silu kernel, its constants folded into the MLP's weights (MLP);
- the patch embedding as one matmul over the cut-out patches instead of a convolution
  (VisionTransformer.forward);
- the text side stops at the last EOT of the batch (CLIP.encode_text), and the image side's last
  block computes the class token alone, the only token read (VisionTransformer.forward);
- fp32 parameters that run under `torch.autocast` (bf16/fp16), optional activation checkpointing per
  block, and positional embeddings interpolated when the input size differs from the checkpoint's.

Both encoders take optional deep prompts (a list, one (n, width) tensor per layer from the first):
the hook that ViFi-CLIP's "bridge and prompt" stage needs (vifi.py). Without them this is plain
CLIP.

`load(name_or_path)` takes a name of MODELS (OpenAI's release, downloaded once, sha256 checked) or
the path of a TorchScript archive, a state dict or a checkpoint of this project. archive.py reads
every file, without running code from it.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

class ModelError(RuntimeError):
    """A state dict that is not a whole, finite CLIP ViT (or ViFi-CLIP): the message names the file
    and the key."""


# OpenAI's public releases; the folder name in each URL is the file's sha256.
MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/"
                      "ViT-L-14-336px.pt",
}


@dataclass
class CLIPConfig:
    embed_dim: int = 512           # D, the joint embedding size
    image_resolution: int = 224    # R, the size the positional embedding was trained at
    vision_layers: int = 12
    vision_width: int = 768
    patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12

    @classmethod
    def from_state_dict(cls, sd):
        """Every size from the tensors' shapes (OpenAI's checkpoints carry no config)."""
        def layers(prefix):  # count the distinct block indices under prefix
            return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        patch = sd["visual.conv1.weight"].shape[-1]
        return cls(embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid,
                   vision_layers=layers("visual.transformer.resblocks."),
                   vision_width=sd["visual.conv1.weight"].shape[0],
                   patch_size=patch, context_length=sd["positional_embedding"].shape[0],
                   vocab_size=sd["token_embedding.weight"].shape[0],
                   text_width=sd["ln_final.weight"].shape[0],
                   text_layers=layers("transformer.resblocks."))


class MLP(nn.Module):
    """c_fc -> QuickGELU -> c_proj, where QuickGELU(h) = h * sigmoid(1.702 h) is the GELU
    approximation CLIP was trained with (the exact GELU would change the pretrained outputs).

    QuickGELU(h) = silu(1.702 h) / 1.702, so both constants fold into the weights: c_fc's weight and
    bias are scaled by 1.702 and c_proj's weight by 1 / 1.702 on the fly. The (N, L, 4W) activation,
    the largest tensor of a block, then passes through one fused silu kernel instead of three
    elementwise ones, and backward keeps one copy of it instead of three. Scaling the small weight
    matrices costs next to nothing; the result is the same function."""

    def __init__(self, width):
        super().__init__()
        # OpenAI's names: the state dict's keys are mlp.c_fc / mlp.c_proj
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        h = F.silu(F.linear(x, 1.702 * self.c_fc.weight, 1.702 * self.c_fc.bias))
        return F.linear(h, self.c_proj.weight / 1.702, self.c_proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's packed parameters, computed by SDPA on (B, L, width)
    tensors; with keep_weights (predict.votes_and_relevance), written out as softmax(q k^T /
    sqrt(d)) v, weights kept in self.weights."""

    def __init__(self, width):
        super().__init__()
        self.heads = width // 64  # OpenAI's rule: 64 channels per head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.keep_weights, self.weights = False, None

    def forward(self, x, causal, n_out=None):
        """x: (B, L, width) -> (B, n_out, width): the outputs of the first n_out tokens (all L when
        None), each attending to every token (or, if causal, to those up to itself)."""
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # (B, L, 3W) -> 3 x (B, h, L, W/h)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA's fused kernels never hold the (B, h, n_out, L) weights; this path does
        if self.keep_weights:
            # (B, h, n_out, L)
            scores = q[:, :, :n_out] @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
            if causal:  # query i sees keys 0..i, as is_causal below
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            self.weights = scores.softmax(dim=-1)
            y = self.weights @ v
        else:
            # causal: query i sees keys 0..i
            y = F.scaled_dot_product_attention(q[:, :, :n_out], k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, -1, W)  # (B, h, n_out, W/h) -> (B, n_out, W)
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x, causal=False, n_out=None):
        """(B, L, width) -> (B, n_out, width); n_out=None keeps all L tokens."""
        x = x[:, :n_out] + self.attn(self.ln_1(x), causal, n_out)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x, causal=False, deep_prompts=(), prompt_start=0, out_tokens=None):
        """x: (B, L, width). deep_prompts[i-1] (n, width) replaces tokens
        prompt_start..prompt_start+n before block i. out_tokens=n: the caller reads only the first n
        tokens' outputs, so the last block computes only those (every token still serves as a key
        and value) -> (B, n, width)."""
        for i, block in enumerate(self.resblocks):
            if 0 < i <= len(deep_prompts):
                # (n, W) -> (B, n, W)
                p = deep_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :prompt_start], p, x[:, prompt_start + p.shape[1]:]], dim=1)
            n_out = out_tokens if i == len(self.resblocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input and recompute the block in backward: long clips fit
                # in memory, for the price of a second forward pass.
                x = checkpoint(block, x, causal, n_out, use_reentrant=False)
            else:
                x = block(x, causal, n_out)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, self.patch_size = cfg.vision_width, cfg.patch_size
        scale = w ** -0.5
        # run as a matmul
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((cfg.image_resolution // cfg.patch_size) ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

    def position_embedding(self, gh, gw):
        """The (1 + gh*gw, width) positional embedding, bicubic-resized on the patch grid if the
        input size differs."""
        pos = self.positional_embedding
        g = round((pos.shape[0] - 1) ** 0.5)
        if (gh, gw) == (g, g):
            return pos
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (g*g, W) -> (1, W, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        # (1, W, gh, gw) -> (gh*gw, W)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])

    def forward(self, x, prompts=None):
        """x: (N, 3, H, W) normalized pixels -> (N, D). prompts: [layer-0 tokens appended, then one
        per later block]."""
        # A stride-p convolution over non-overlapping p x p patches is one matmul: cut the image
        # into patches and apply conv1's weight as a linear layer. The same function, and faster
        # than cuDNN's kernels for this conv.
        N, C, p = x.shape[0], x.shape[1], self.patch_size
        gh, gw = x.shape[2] // p, x.shape[3] // p
        # edge pixels short of a patch drop, as in conv
        x = x[:, :, :gh * p, :gw * p].reshape(N, C, gh, p, gw, p)
        # -> (N, gh, gw, C, p, p) -> (N, gh*gw, C*p*p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, C * p * p)
        # conv1.weight (W, C, p, p) -> (W, C*p*p): (N, gh*gw, W)
        x = F.linear(x, self.conv1.weight.flatten(1))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # (N, 1 + gh*gw, W)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(gh, gw).to(x.dtype)
        start = x.shape[1]
        if prompts:  # visual prompt tokens go after the patches, as in the official ViFi-CLIP code
            x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = self.ln_pre(x)
        # Only the class token is read, so the last block skips the other tokens' attention outputs
        # and MLPs (exact, and ~6% of ViT-B/16's FLOPs): (N, L, W) -> (N, 1, W)
        x = self.transformer(x, deep_prompts=prompts[1:] if prompts else (), prompt_start=start, out_tokens=1)
        return self.ln_post(x[:, 0]) @ self.proj  # the class token


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self):
        """OpenAI's initialization, for models trained from scratch (loading pretrained weights
        overwrites it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text_width ** -0.5)
        for tower in (self.transformer, self.visual.transformer):
            width, depth = tower.resblocks[0].ln_1.weight.shape[0], len(tower.resblocks)
            proj_std = width ** -0.5 * (2 * depth) ** -0.5
            for b in tower.resblocks:
                nn.init.normal_(b.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(b.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(b.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(b.mlp.c_proj.weight, std=proj_std)

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_checkpointing = self.transformer.grad_checkpointing = enabled

    def encode_image(self, images, prompts=None):
        return self.visual(images, prompts)

    def encode_text(self, ids, prompts=None, cut=True):
        """ids: (N, L) token ids, EOT the largest id of each row -> (N, D). prompts[0] replaces
        tokens 1..n (after SOT). cut=False: the caller has already cut the ids after their last EOT
        (vifi.py does it once per class list)."""
        if cut and not torch.compiler.is_compiling():
            # Causal attention: nothing after the batch's last EOT can change an EOT output, so drop
            # it (exact; a class prompt is ~10-20 of the 77 tokens).
            # Finding where to cut reads a GPU value, which stalls the CPU until the GPU has caught
            # up: callers that encode the same ids every step cut them once. Under torch.compile
            # nothing is cut, for a static graph.
            ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
        x = self.token_embedding(ids)  # (N, L) -> (N, L, W)
        # the prompt tokens take the place of the placeholder words and get their positions too
        if prompts:
            p = prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)
        x = x + self.positional_embedding[: ids.shape[1]]
        x = self.transformer(x, causal=True, deep_prompts=prompts[1:] if prompts else (), prompt_start=1)
        x = self.ln_final(x)
        # (N, L, W) -> (N, W)
        eot = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return eot @ self.text_projection

    def forward(self, images, ids):
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


# --------------------------------------------------------------------------------------------------
# Loading: OpenAI's releases and this project's checkpoints -> a CLIP. archive.py reads the files
# (without running code from them) and downloads the releases; what follows turns what it reads into
# a model.

def read_state_dict(path):
    """A TorchScript archive (OpenAI's format), a plain state dict, or a checkpoint holding one
    under 'model'; read by read_archive, so no file can run code whatever it holds."""
    expected = ("a CLIP state dict, a checkpoint holding one under 'model', OpenAI's TorchScript "
                f"release or one of the names {list(MODELS)} (official ViFi-CLIP checkpoints load "
                "with vifi.load_official_checkpoint or --checkpoint)")
    import archive  # reads the file without running code from it
    obj = archive.read_archive(path, expected, script=True)
    if isinstance(obj, archive.ScriptObject):
        return archive.script_tensors(obj)
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def clip_state_dict(sd, path="<state dict>"):
    """Strip any prefix ('module.', 'clip.') in front of OpenAI's names; fp32 tensors; drop the
    non-tensor extras."""
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    check_names(sd, path)
    anchor = "visual.conv1.weight"
    prefixes = [k[: -len(anchor)] for k in sd if isinstance(k, str) and k.endswith(anchor)]
    if not prefixes:
        raise ModelError(f"{path}: not a CLIP ViT state dict (no key ending in '{anchor}'; found e.g. "
                         f"{list(sd)[:3]}). Official ViFi-CLIP checkpoints load through "
                         "vifi.load_official_checkpoint.")
    p = prefixes[0]
    out = {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p) and torch.is_tensor(v)}
    # OpenAI's archives carry these; unused
    for extra in ("input_resolution", "context_length", "vocab_size"):
        out.pop(extra, None)
    if "visual.proj" not in out:
        raise ModelError(f"{path}: a ResNet CLIP (no 'visual.proj'); only the ViT models are supported.")
    return out


def build(sd, path="<state dict>"):
    """A CLIP whose sizes are read off sd's shapes, holding sd's weights; errors name the first
    offending key."""
    sd = clip_state_dict(sd, path)
    try:
        cfg = CLIPConfig.from_state_dict(sd)
    except KeyError as e:
        raise ModelError(f"{path}: missing key {e.args[0]!r} of a CLIP state dict") from None
    with torch.device("meta"):  # no memory, no init: every tensor comes from sd
        model = CLIP(cfg)
    check_state_dict(sd, model.state_dict(), path, f"the CLIP ViT its other shapes describe ({cfg})")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def check_names(sd, path):
    """Refuse a state dict with a key that is not a parameter's name (a str)."""
    odd = next((k for k in sd if not isinstance(k, str)), None)
    if odd is not None:
        raise ModelError(f"{path}: its weights are named by a {type(odd).__name__} key ({str(odd)[:60]}); "
                         "a state dict names each tensor by a str")


def check_finite(sd, keys, path):
    """Refuse NaN or inf in the floating-point tensors sd holds under keys: such weights predict
    nothing, and a run that diverged should fail where it is loaded, naming the key, not later as a
    NaN loss or uniform outputs."""
    for k in keys:
        if torch.is_floating_point(sd[k]) and not torch.isfinite(sd[k]).all():
            raise ModelError(f"{path}: key {k!r} holds NaN or inf values; use a checkpoint saved before "
                             "the weights diverged")


def check_state_dict(sd, expected, path, model):
    """Refuse sd unless it holds exactly the keys of `expected` (a model's state_dict), each a
    finite tensor of the same shape; the error names the file, the first offending key and `model`,
    the model it was checked against."""
    for k, v in expected.items():
        if k not in sd:
            raise ModelError(f"{path}: missing key {k!r} (expected shape {tuple(v.shape)}) of {model}")
        found = tuple(sd[k].shape) if torch.is_tensor(sd[k]) else type(sd[k]).__name__
        if found != tuple(v.shape):
            raise ModelError(f"{path}: key {k!r} has shape {found}, expected {tuple(v.shape)} for "
                             f"{model}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ModelError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) for "
                         f"{model}")
    check_finite(sd, expected, path)


def release(name):
    """(url, path in the cache, sha256) of OpenAI's release `name` of MODELS (its URL's folder is
    the sha256)."""
    import archive  # the cache folder
    url = MODELS[name]
    return url, os.path.join(archive.cache_dir(), os.path.basename(url)), url.split("/")[-2]


def load(name_or_path, device="cpu"):
    """A model name of MODELS (downloaded once into $VIFI_CACHE or ~/.cache/vifi) or a checkpoint
    path -> fp32 CLIP."""
    import archive  # the sha256-checked download
    path = archive.download(*release(name_or_path)) if name_or_path in MODELS else name_or_path
    return build(read_state_dict(path), path).to(device).eval()


if __name__ == "__main__":
    import sys
    m = load(sys.argv[1] if len(sys.argv) > 1 else "ViT-B/16")
    print(m.config, f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters", sep="\n")
