"""
What the command lines draw: self-contained files, written from tensors and lists with no plotting
library.

- `python predict.py VIDEO --labels ... --explain report.html` (write_report), from the tensors of
  predict.votes_and_relevance: one HTML file (images inline as PNG data: URIs encoded by PyAV, no
  script, no network) and `report.json` beside it with the same numbers for scripts. Top to bottom
  the page shows the top-5 classes, then one row per sampled frame: the frame as the model saw it,
  where the image encoder looks for the top class (with --compare-base also where vanilla CLIP looks
  for it), and the frame's exact vote for the top class and for the runner-up; the last row shows
  that the votes sum to the logits.
- train.py's `curves.svg` (write_curves): the training loss and the test accuracy over the epochs.

Imports nothing of the project (the command lines call it with plain values), so the model and the
training loop hold no HTML or SVG.
"""
import base64
import html
import json
import math
import os

import av
import torch
import torch.nn.functional as F

import archive

# A dark-to-bright colour scale (black, purple, red, orange, pale yellow) for relevance 0..1,
# readable in greyscale.
HEAT_COLOURS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9],
                             [252, 255, 164]]).float()
# frames smaller than this are enlarged by a whole factor, so every pixel stays a square
DISPLAY_PX = 128

VOTES_TEXT = ("The video embedding is the mean of the frame embeddings f<sub>t</sub>, so every "
              "logit is exactly a sum of one vote per frame: s&#8201;&lang;f<sub>t</sub>, "
              "t<sub>c</sub>&rang; / (T&#8201;|mean f|&#8201;|t<sub>c</sub>|), with s = "
              "exp(logit_scale) = {scale:.2f}. The margin is the top class's vote minus the "
              "runner-up's; it sums to the difference of their logits, "
              "ln(p<sub>1</sub>/p<sub>2</sub>), so its long bars are the frames that decide "
              "between the two.")
MAPS_TEXT = ("Maps: gradient-weighted attention rollout (Chefer et al., CVPR 2021), which weights "
             "every block's attention by its gradient for the top class, keeps the positive part "
             "and carries it through the residual connections down to the image patches. Raw "
             "attention in a ViT mostly shows mixing that serves every class, and plain gradients "
             "are noisy, so this is the relevance that follows what the class token used; each map "
             "is scaled to its frame's maximum, from")
STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1150px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}p{max-width:900px}.settings{color:#666}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left}td{white-space:nowrap}
th{font-weight:600;vertical-align:bottom}
tr.sum td{border-top:1px solid #999;font-weight:600}img{display:block}
.bar{position:relative;display:inline-block;width:120px;height:14px;background:#eee;vertical-align:middle;
margin-right:6px}
.bar i{position:absolute;top:0;height:100%}.pos{background:#3b78d0}.neg{background:#d0553b}
.mid:after{content:"";position:absolute;left:50%;top:-3px;bottom:-3px;border-left:1px solid #555}"""


def png_uri(image):
    """uint8 (H, W, 3) -> 'data:image/png;base64,...', encoded with FFmpeg's PNG encoder through
    PyAV."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(image.contiguous().numpy(), format="rgb24"))
    return "data:image/png;base64," + base64.b64encode(b"".join(bytes(p) for p in packets)).decode()


def enlarge(images):
    """uint8 (T, 3, H, W) -> float (T, kH, kW, 3), each pixel repeated k times so that small frames
    are visible."""
    k = -(-DISPLAY_PX // images.shape[-1])  # ceil(DISPLAY_PX / W)
    images = images.float().repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return images.permute(0, 2, 3, 1)  # (T, 3, kH, kW) -> (T, kH, kW, 3)


def heat_overlay(pixels, relevance):
    """pixels: float (T, H, W, 3) from enlarge(); relevance (T, gh, gw) -> uint8 (T, H, W, 3): the
    frame under the heat colours, each frame's map scaled to its own maximum (how much each frame
    matters is what the votes say)."""
    heat = F.interpolate(relevance[:, None].float().cpu(), pixels.shape[1:3], mode="bilinear",
                         align_corners=False)
    # (T, 1, H, W) -> (T, H, W), 0..1
    heat = heat[:, 0] / heat.amax(dim=(1, 2, 3))[:, None, None].clamp(min=1e-12)
    # where each value falls between two colours of the scale
    pos = heat.clamp(0, 1) * (len(HEAT_COLOURS) - 1)
    low = pos.floor().long().clamp(max=len(HEAT_COLOURS) - 2)
    # (T, H, W, 3)
    colour = torch.lerp(HEAT_COLOURS[low], HEAT_COLOURS[low + 1], (pos - low)[..., None])
    # dark where irrelevant, the frame still shows
    return (0.4 * pixels + 0.6 * colour).round().to(torch.uint8)


def bar(value, scale, centred=True):
    """An HTML bar for value in [-scale, scale] drawn from a centre line (or [0, scale] from the
    left)."""
    width = (50 if centred else 100) * abs(value) / scale
    left = 50 - width if centred and value < 0 else (50 if centred else 0)
    return (f'<span class="bar{" mid" if centred else ""}"><i class="{"neg" if value < 0 else "pos"}" '
            f'style="left:{left:.1f}%;width:{width:.1f}%"></i></span>')


def image(pixels, alt, css=""):
    return f'<img src="{png_uri(pixels)}" alt="{html.escape(alt)}"{f" class={css!r}" if css else ""}>'


def write_report(path, video_path, labels, images, logits, result, settings, base=None):
    """Write the HTML report to `path` and its numbers to the .json beside it. images: uint8
    (T, 3, H, W), the frames as the model saw them; logits (C,): the model's, at least two classes
    (predict.py passes result["logits"], the votes' sums, which equal the ordinary forward's to
    1e-5); result and base: predict.votes_and_relevance of the model and of vanilla CLIP, for the
    top class."""
    votes = result["votes"]  # (T, C); each column sums to its logit
    probs = logits.softmax(dim=-1)
    ranked = probs.argsort(descending=True).tolist()
    top, second = ranked[:2]
    names, T = [html.escape(label) for label in labels], len(images)

    pixels = enlarge(images)
    maps = heat_overlay(pixels, result["relevance"])
    base_maps = heat_overlay(pixels, base["relevance"]) if base else None
    margin = votes[:, top] - votes[:, second]  # sums to logit difference = ln(p_top / p_second)
    scale = votes[:, [top, second]].abs().max().item() or 1.0
    columns = [(f"vote for &ldquo;{names[c]}&rdquo;", votes[:, c], scale,
                f"= logit {logits[c].item():.3f}") for c in (top, second)]
    log_ratio = (probs[top] / probs[second]).log().item()
    columns.append(("margin: the difference", margin, margin.abs().max().item() or 1.0,
                    f"= ln(p<sub>1</sub>/p<sub>2</sub>) = {log_ratio:.3f}"))
    header = ["frame", "input", f"where this model looks for &ldquo;{names[top]}&rdquo;",
              *(["where vanilla CLIP looks for it"] if base else []), *(h for h, *_ in columns)]
    rows = []
    for t in range(T):
        cells = [f"{t + 1} of {T}", image(pixels[t].round().to(torch.uint8), f"frame {t + 1}"),
                 image(maps[t], f"relevance, frame {t + 1}", "map")]
        if base:
            cells.append(image(base_maps[t], f"vanilla CLIP relevance, frame {t + 1}", "base-map"))
        cells += [f"{bar(v[t].item(), s)}{v[t].item():+.3f}" for _, v, s, _ in columns]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    sums = "".join(f"<td>sum {v.sum().item():.3f} {equals}</td>" for _, v, _, equals in columns)
    rows.append(f'<tr class="sum"><td colspan="{len(header) - len(columns)}">all {T} frames</td>'
                + sums + "</tr>")
    top5 = "".join(f"<tr><td>{names[c]}</td><td>{bar(probs[c].item(), 1.0, centred=False)}"
                   f"{100 * probs[c].item():.2f}%</td><td>logit {logits[c].item():.3f}</td></tr>"
                   for c in ranked[:5])
    compared = (f"<p>Vanilla CLIP gives &ldquo;{names[top]}&rdquo; "
                f"{100 * base['logits'].softmax(-1)[top].item():.2f}%.</p>" if base else "")
    gradient = ",".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in HEAT_COLOURS.tolist())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>ViFi-CLIP explanation: {html.escape(os.path.basename(video_path))}</title>\
<style>{STYLE}</style></head><body>
<h1>What the model sees in {html.escape(os.path.basename(video_path))}</h1>
<p class="settings">{html.escape(", ".join(f"{k}: {v}" for k, v in settings.items() if v is not None))}</p>
<h2>Prediction</h2><table>{top5}</table>{compared}
<h2>Frame by frame</h2><p>{VOTES_TEXT.format(scale=settings["logit_scale"])}</p>
<p>{MAPS_TEXT} <span class="bar" style="background:linear-gradient(90deg,{gradient})"></span>low to high</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in header)}</tr>
{chr(10).join(rows)}</table></body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    top5_entries = [dict(label=labels[c], probability=probs[c].item(), logit=logits[c].item())
                    for c in ranked[:5]]
    runner_up = dict(label=labels[second], logit=logits[second].item(),
                     votes=votes[:, second].tolist())
    report = dict(video=video_path, settings=settings, top5=top5_entries,
                  label=labels[top], logit=logits[top].item(), votes=votes[:, top].tolist(),
                  runner_up=runner_up, relevance=result["relevance"].tolist(),
                  base_relevance=base["relevance"].tolist() if base else None)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)


# --------------------------------------------------------------------------------------------------
# curves.svg

def ticks(top, count=5):
    """About `count` round values from 0 to at least `top`, a step of 1, 2 or 5 times a power of ten
    apart."""
    raw = max(top, 1e-9) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 5, 10) if s * power >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def write_curves(log, path):
    """curves.svg, no plotting library: the mean training loss of each epoch above, the top-1
    accuracy (%) of each evaluation below (its points marked), on one epoch axis with ticks."""
    # one panel; the margins hold titles and tick labels
    W, H, left, right, top, bottom = 640, 230, 64, 24, 30, 44
    # whole epochs only
    xs = [e for e in ticks(max([r["epoch"] for r in log] + [1])) if e == int(e)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" '
           f'font-family="sans-serif" font-size="12"><rect width="{W}" height="{2 * H}" fill="white"/>']
    panels = [("loss", "training loss", "cross-entropy", "#d62728"),
              ("top1", "test accuracy", "top-1 accuracy (%)", "#1f77b4")]
    for k, (key, title, unit, colour) in enumerate(panels):
        pts = [(r["epoch"], r[key]) for r in log if key in r]
        ys = list(range(0, 101, 20)) if key == "top1" else ticks(max([v for _, v in pts] + [0.1]))
        def x(e): return left + (W - left - right) * e / xs[-1]
        def y(v): return k * H + H - bottom - (H - top - bottom) * v / ys[-1]
        xy = [(x(e), y(v)) for e, v in pts]
        out += [f'<g class="panel"><text x="{left}" y="{k * H + 18}" font-weight="bold">{title}</text>',
                *(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                  f'stroke="#e3e3e3"/><text x="{left - 6}" y="{y(v) + 4:.1f}" '
                  f'text-anchor="end">{v:g}</text>'
                  for v in ys),
                *(f'<line x1="{x(e):.1f}" x2="{x(e):.1f}" y1="{y(0):.1f}" y2="{y(0) + 5:.1f}" '
                  f'stroke="black"/><text x="{x(e):.1f}" y="{y(0) + 18:.1f}" '
                  f'text-anchor="middle">{e:g}</text>' for e in xs),
                f'<path d="M{left},{top + k * H}V{y(0):.1f}H{W - right}" fill="none" stroke="black"/>',
                f'<text x="{(left + W - right) / 2}" y="{(k + 1) * H - 8}" '
                f'text-anchor="middle">epoch</text>',
                f'<text transform="translate(16,{k * H + (H + top - bottom) / 2}) rotate(-90)" '
                f'text-anchor="middle">{unit}</text>',
                f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}" fill="none" '
                f'stroke="{colour}" stroke-width="2"/>',
                *(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{4 if key == "top1" else 2}" '
                  f'fill="{colour}"/>' for a, b in xy),
                "</g>"]
    # whole or not at all: a full disk leaves any earlier curves.svg
    with archive.replacing(path) as f:
        f.write("\n".join(out + ["</svg>"]))
