"""
The explanation report of `python vifi.py VIDEO --labels ... --explain report.html`, rendered from the tensors of
vifi.votes_and_relevance: one self-contained HTML file (images inline as PNG data: URIs encoded by PyAV, no script,
no network) and `report.json` beside it with the same numbers for scripts.

Top to bottom the page shows the top-5 classes, then one row per sampled frame: the frame as the model saw it,
where the image encoder looks for the top class (with --compare-base also where vanilla CLIP looks for it), and the
frame's exact vote for the top class and for the runner-up; the last row shows that the votes sum to the logits.

Imports nothing of the project (vifi.py's command line calls it with tensors), so the model code holds no HTML.
"""
import base64
import html
import json
import os

import av
import torch
import torch.nn.functional as F

# A dark-to-bright colour scale (black, purple, red, orange, pale yellow) for relevance 0..1, readable in greyscale.
HEAT_COLOURS = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]).float()
DISPLAY_PX = 128  # frames smaller than this are enlarged by a whole factor, so every pixel stays a square

VOTES_TEXT = ("The video embedding is the mean of the frame embeddings f<sub>t</sub>, so every logit is exactly a "
              "sum of one vote per frame: s&#8201;&lang;f<sub>t</sub>, t<sub>c</sub>&rang; / (T&#8201;|mean f|&#8201;"
              "|t<sub>c</sub>|), with s = exp(logit_scale) = {scale:.2f}. The margin is the top class's vote minus the "
              "runner-up's; it sums to the difference of their logits, ln(p<sub>1</sub>/p<sub>2</sub>), so its long "
              "bars are the frames that decide between the two.")
MAPS_TEXT = ("Maps: gradient-weighted attention rollout (Chefer et al., CVPR 2021), which weights every block's "
             "attention by its gradient for the top class, keeps the positive part and carries it through the residual "
             "connections down to the image patches. Raw attention in a ViT mostly shows mixing that serves every "
             "class, and plain gradients are noisy, so this is the relevance that follows what the class token used; "
             "each map is scaled to its frame's maximum, from")
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
    """uint8 (H, W, 3) -> 'data:image/png;base64,...', encoded with FFmpeg's PNG encoder through PyAV."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(image.contiguous().numpy(), format="rgb24"))
    return "data:image/png;base64," + base64.b64encode(b"".join(bytes(p) for p in packets)).decode()


def enlarge(frames):
    """uint8 (T, 3, H, W) -> float (T, kH, kW, 3), each pixel repeated k times so that small frames are visible."""
    k = -(-DISPLAY_PX // frames.shape[-1])  # ceil(DISPLAY_PX / W)
    return frames.float().repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1).permute(0, 2, 3, 1)


def heat_overlay(pixels, relevance):
    """pixels: float (T, H, W, 3) from enlarge(); relevance (T, gh, gw) -> uint8 (T, H, W, 3): the frame under the
    heat colours, each frame's map scaled to its own maximum (how much each frame matters is what the votes say)."""
    heat = F.interpolate(relevance[:, None].float().cpu(), pixels.shape[1:3], mode="bilinear", align_corners=False)
    heat = heat[:, 0] / heat.amax(dim=(1, 2, 3))[:, None, None].clamp(min=1e-12)  # (T, 1, H, W) -> (T, H, W), 0..1
    pos = heat.clamp(0, 1) * (len(HEAT_COLOURS) - 1)  # where each value falls between two colours of the scale
    low = pos.floor().long().clamp(max=len(HEAT_COLOURS) - 2)
    colour = torch.lerp(HEAT_COLOURS[low], HEAT_COLOURS[low + 1], (pos - low)[..., None])  # (T, H, W, 3)
    return (0.4 * pixels + 0.6 * colour).round().to(torch.uint8)  # dark where irrelevant, the frame still shows


def bar(value, scale, centred=True):
    """An HTML bar for value in [-scale, scale] drawn from a centre line (or [0, scale] from the left)."""
    width = (50 if centred else 100) * abs(value) / scale
    left = 50 - width if centred and value < 0 else (50 if centred else 0)
    return (f'<span class="bar{" mid" if centred else ""}"><i class="{"neg" if value < 0 else "pos"}" '
            f'style="left:{left:.1f}%;width:{width:.1f}%"></i></span>')


def image(pixels, alt, css=""):
    return f'<img src="{png_uri(pixels)}" alt="{html.escape(alt)}"{f" class={css!r}" if css else ""}>'


def write_report(path, video_path, labels, frames, logits, result, settings, base=None):
    """Write the HTML report to `path` and its numbers to the .json beside it. frames: uint8 (T, 3, H, W) as the
    model saw them; logits (C,): the model's ordinary forward, at least two classes; result and base:
    vifi.votes_and_relevance of the model and of vanilla CLIP, for the top class."""
    votes = result["votes"]  # (T, C); each column sums to its logit
    probs = logits.softmax(dim=-1)
    ranked = probs.argsort(descending=True).tolist()
    top, second = ranked[:2]
    names, T = [html.escape(label) for label in labels], len(frames)

    pixels = enlarge(frames)
    maps = heat_overlay(pixels, result["relevance"])
    base_maps = heat_overlay(pixels, base["relevance"]) if base else None
    margin = votes[:, top] - votes[:, second]  # sums to logit difference = ln(p_top / p_second)
    scale = votes[:, [top, second]].abs().max().item() or 1.0
    columns = [(f"vote for &ldquo;{names[c]}&rdquo;", votes[:, c], scale, f"= logit {logits[c].item():.3f}")
               for c in (top, second)]
    columns.append(("margin: the difference", margin, margin.abs().max().item() or 1.0,
                    f"= ln(p<sub>1</sub>/p<sub>2</sub>) = {(probs[top] / probs[second]).log().item():.3f}"))
    header = ["frame", "input", f"where this model looks for &ldquo;{names[top]}&rdquo;",
              *(["where vanilla CLIP looks for it"] if base else []), *(h for h, *_ in columns)]
    rows = []
    for t in range(T):
        cells = [f"{t + 1} of {T}", image(pixels[t].round().to(torch.uint8), f"frame {t + 1}"),
                 image(maps[t], f"relevance, frame {t + 1}", "map")]
        cells += [image(base_maps[t], f"vanilla CLIP relevance, frame {t + 1}", "base-map")] if base else []
        cells += [f"{bar(v[t].item(), s)}{v[t].item():+.3f}" for _, v, s, _ in columns]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append(f'<tr class="sum"><td colspan="{len(header) - len(columns)}">all {T} frames</td>'
                + "".join(f"<td>sum {v.sum().item():.3f} {equals}</td>" for _, v, _, equals in columns) + "</tr>")
    top5 = "".join(f"<tr><td>{names[c]}</td><td>{bar(probs[c].item(), 1.0, centred=False)}{100 * probs[c].item():.2f}%"
                   f"</td><td>logit {logits[c].item():.3f}</td></tr>" for c in ranked[:5])
    compared = (f"<p>Vanilla CLIP gives &ldquo;{names[top]}&rdquo; "
                f"{100 * base['logits'].softmax(-1)[top].item():.2f}%.</p>" if base else "")
    gradient = ",".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in HEAT_COLOURS.tolist())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>ViFi-CLIP explanation: {html.escape(os.path.basename(video_path))}</title><style>{STYLE}</style></head><body>
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
    report = dict(video=video_path, settings=settings,
                  top5=[dict(label=labels[c], probability=probs[c].item(), logit=logits[c].item()) for c in ranked[:5]],
                  label=labels[top], logit=logits[top].item(), votes=votes[:, top].tolist(),
                  runner_up=dict(label=labels[second], logit=logits[second].item(), votes=votes[:, second].tolist()),
                  relevance=result["relevance"].tolist(), base_relevance=base["relevance"].tolist() if base else None)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)
