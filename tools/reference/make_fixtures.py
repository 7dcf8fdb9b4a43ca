#!/usr/bin/env python3
"""Generate the parity fixtures under fixtures/ from the real reference libraries.

Run by hand (never in CI):

    tools/reference/setup.sh && tools/reference/.venv/bin/python tools/reference/make_fixtures.py

Everything runs on CPU in float32 with fixed seeds and 2 threads; running it twice gives
byte-identical files. See tools/reference/README.md for what each fixture holds.
"""

import gzip
import hashlib
import json
import math
import os
import shutil
import sys

import numpy as np
import regex
import PIL
import safetensors
import skimage
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import open_clip
from PIL import Image
from safetensors.torch import load_file
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

torch.set_num_threads(2)
torch.manual_seed(0)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(REPO, "fixtures")
REF = os.path.join(FIX, "reference")
IMG = os.path.join(FIX, "images")
VOCAB = os.path.join(FIX, "vocab")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PHOTOS = {  # name -> file inside skimage/data
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
}
BATCH = ["chelsea", "coffee"]  # the batch of 2 used by the model fixtures (some sizes use one of them)

GENERATOR = json.dumps({
    "script": "tools/reference/make_fixtures.py",
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "timm": timm.__version__,
    "open_clip": open_clip.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
    "scikit-image": skimage.__version__,
}, sort_keys=True)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def save(path, tensors, config=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"generator": GENERATOR}
    if config is not None:
        meta["config"] = json.dumps(config, sort_keys=True)
    out = {}
    for k, v in tensors.items():
        assert isinstance(v, torch.Tensor), k
        assert v.dtype in (torch.float32, torch.int64, torch.uint8), (k, v.dtype)
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{k}: non-finite values"
        out[k] = v.detach().contiguous().clone()
    write_safetensors(path, out, meta)
    loaded = load_file(path)  # round trip through the real safetensors reader
    assert set(loaded) == set(out)
    for k in out:
        assert loaded[k].dtype == out[k].dtype and torch.equal(loaded[k], out[k]), k
    log(f"  wrote {os.path.relpath(path, REPO)}: {len(out)} tensors, {os.path.getsize(path)} bytes")


_ST_DTYPE = {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}


def write_safetensors(path, tensors, metadata):
    """safetensors writer with a deterministic header (sorted keys). safetensors.torch.save_file
    stores __metadata__ through a hash map, so its key order (and the file bytes) change from run
    to run; this writer gives byte-identical files for identical inputs."""
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = t.numpy().tobytes()  # little-endian on x86
        header[name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def check_not_degenerate(name, t):
    t = t.float()
    assert torch.isfinite(t).all(), f"{name}: NaN/inf"
    assert t.std() > 1e-3, f"{name}: (nearly) constant, std={t.std().item()}"
    # every sample of a batch must differ from the others
    if t.dim() >= 2 and t.shape[0] > 1:
        assert (t[0] - t[1]).abs().max() > 1e-3, f"{name}: batch items identical"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Init:
    """Seeded random values for every learnable tensor (one generator per model)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.done = set()

    def normal(self, shape, std, mean=0.0):
        return torch.randn(shape, generator=self.g, dtype=torch.float32) * std + mean

    def uniform(self, shape, lo, hi):
        return torch.rand(shape, generator=self.g, dtype=torch.float32) * (hi - lo) + lo

    def set(self, model, name, value):
        p = dict(model.named_parameters())[name]
        assert p.shape == value.shape, (name, p.shape, value.shape)
        with torch.no_grad():
            p.copy_(value)
        self.done.add(name)


def randomize(model, init, token_std=0.5, fan_in_of=None):
    """Overwrite every parameter of `model` with seeded random values.

    LayerNorm weight 1+0.1·N, every bias 0.1·N, LayerScale gamma U(0.1, 1.0), token / position
    embeddings token_std·N, weight matrices N(0, 1/fan_in) (so attention logits are O(1) and
    the attention pattern, RoPE and position tables all visibly matter), logit_scale ln(1/0.07).
    """
    fan_in_of = fan_in_of or {}
    ln_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for pn, _ in mod.named_parameters(recurse=False):
                ln_params.add(f"{mname}.{pn}" if mname else pn)
    for name, p in sorted(model.named_parameters()):
        leaf = name.split(".")[-1]
        if name in ln_params:
            v = init.normal(p.shape, 0.1, 1.0) if leaf == "weight" else init.normal(p.shape, 0.1)
        elif leaf == "gamma":
            v = init.uniform(p.shape, 0.1, 1.0)
        elif leaf == "logit_scale":
            v = torch.full(p.shape, math.log(1 / 0.07))
        elif name in fan_in_of:
            v = init.normal(p.shape, fan_in_of[name] ** -0.5)
        elif leaf.endswith("bias"):
            v = init.normal(p.shape, 0.1)
        elif leaf in ("cls_token", "reg_token", "pos_embed", "mask_token", "class_embedding",
                      "positional_embedding", "register_tokens") or name.endswith("token_embedding.weight"):
            v = init.normal(p.shape, token_std)
        elif p.dim() >= 2:  # nn.Linear / nn.Conv2d weight: (out, in, ...)
            v = init.normal(p.shape, int(np.prod(p.shape[1:])) ** -0.5)
        else:
            raise AssertionError(f"no init rule for {name} {tuple(p.shape)}")
        init.set(model, name, v)
    missing = {n for n, _ in model.named_parameters()} - init.done
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

def skimage_data_dir():
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def load_photo(name):
    return Image.open(os.path.join(IMG, PHOTOS[name])).convert("RGB")


def rounded_size(w, h, size):
    """Longer side -> size. Python's round() (half to even) on float64, as open_clip's
    ResizeKeepRatio does; ties do occur (see the crop boxes) and are part of the test."""
    scale = size / max(w, h)
    return round(w * scale), round(h * scale)


def letterbox_u8(img, size, centred=False):
    """img (PIL RGB) -> uint8 tensor [3, size, size]: longer side to `size` with PIL bicubic,
    pasted on black at (0,0) or centred at ((size-nw)//2, (size-nh)//2)."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = rounded_size(w, h, size)
    resized = img.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    off = ((size - nw) // 2, (size - nh) // 2) if centred else (0, 0)
    canvas.paste(resized, off)
    arr = np.asarray(canvas, dtype=np.uint8).copy()  # H, W, 3
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def normalise(u8, mean, std):
    """uint8 [..., 3, H, W] -> float32: (u8/255 - mean)/std, exactly these fp32 ops in this order."""
    x = u8.to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def batch_u8(size, names=BATCH):
    return torch.stack([letterbox_u8(load_photo(n), size) for n in names])


def copy_photos():
    os.makedirs(IMG, exist_ok=True)
    src = skimage_data_dir()
    for name, fn in PHOTOS.items():
        shutil.copyfile(os.path.join(src, fn), os.path.join(IMG, fn))
    lic = f"""# Photos

Copied byte for byte from the scikit-image {skimage.__version__} wheel (`skimage/data/`) by
`tools/reference/make_fixtures.py`. Source and licence as scikit-image states them in the
docstrings of `skimage/data/_fetchers.py` (functions `astronaut`, `chelsea`, `coffee`, `rocket`):

| file | size (w×h) | what | source | licence (as stated by scikit-image) |
| --- | --- | --- | --- | --- |
| `astronaut.png` | 512×512 | Eileen Collins, NASA astronaut | NASA Great Images database, <https://flic.kr/p/r9qvLn> | "No known copyright restrictions, released into the public domain." |
| `chelsea.png` | 451×300 | Chelsea the cat | photographer Stefan van der Walt | "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)." |
| `coffee.png` | 600×400 | coffee cup, courtesy of Pikolo Espresso Bar | photographer Rachel Michetti | "No copyright restrictions. CC0 by the photographer (Rachel Michetti)." |
| `rocket.jpg` | 640×427 | launch of DSCOVR on Falcon 9 | SpaceX Photos, <https://www.flickr.com/photos/spacexphotos/16511594820/> | "The image was captured by SpaceX and released in the public domain." |

SHA-256:
"""
    for fn in PHOTOS.values():
        with open(os.path.join(IMG, fn), "rb") as f:
            lic += f"- `{fn}`: `{hashlib.sha256(f.read()).hexdigest()}`\n"
    with open(os.path.join(IMG, "LICENSE.md"), "w") as f:
        f.write(lic)
    log("  copied photos to fixtures/images/")


# --------------------------------------------------------------------------------------------
# shared plain-PyTorch pieces (the method spec, written out)
# --------------------------------------------------------------------------------------------

def ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def lin(x, sd, prefix, bias=True):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"] if bias else None)


def resize_pos_table(pos, grid0, grid, n_prefix, antialias):
    """pos [1, n_prefix + grid0^2, C] -> [1, n_prefix + gh*gw, C]; prefix entries kept.
    F.interpolate(mode='bicubic', align_corners=False, antialias=antialias, size=(gh, gw))."""
    gh, gw = grid
    if (gh, gw) == (grid0, grid0):
        return pos
    prefix, patch = pos[:, :n_prefix], pos[:, n_prefix:]
    c = patch.shape[-1]
    patch = patch.reshape(1, grid0, grid0, c).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False, antialias=antialias)
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, c)
    return torch.cat([prefix, patch], dim=1)


def split_heads(t, heads):  # [B, N, C] -> [B, h, N, d]
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t):  # [B, h, N, d] -> [B, N, C]
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def decoupled_mix(q, k, v, heads, mode, scale=None):
    """Attention mixing of the decoupled last block (method spec §1.2): no RoPE, no residual.
    mode 'qq': softmax(Q Qᵀ·scale); 'kk': softmax(K Kᵀ); 'csa': softmax(Q Qᵀ) + softmax(K Kᵀ)."""
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if mode == "qq":
        logits = qh @ qh.transpose(-2, -1)
        if scale is not None:
            logits = logits * scale
        a = logits.softmax(dim=-1)
    elif mode == "kk":
        a = (kh @ kh.transpose(-2, -1)).softmax(dim=-1)
    elif mode == "csa":
        a = (qh @ qh.transpose(-2, -1)).softmax(dim=-1) + (kh @ kh.transpose(-2, -1)).softmax(dim=-1)
    else:
        raise ValueError(mode)
    return merge_heads(a @ vh)


def to_map(tokens, gh, gw):
    """[B, N, E] (row-major tokens, n = row*gw + col) -> [B, E, gh, gw]."""
    b, n, e = tokens.shape
    assert n == gh * gw
    return tokens.transpose(1, 2).reshape(b, e, gh, gw).contiguous()


# --------------------------------------------------------------------------------------------
# 1. EVA02-CLIP vision tower
# --------------------------------------------------------------------------------------------

EVA_CFG = dict(
    family="eva02_clip_vision",
    timm_class="timm.models.eva.Eva (configured like eva02_base_patch16_clip_224)",
    width=64, depth=3, heads=4, head_dim=16, mlp_hidden=170, patch_size=16, image_size=224,
    embed_dim=32, register_tokens=0, layer_scale=False, rope_ref_grid=16, rope_theta=10000.0,
    rope_layout="interleaved_pairs", rope_on_prefix=False, eps=1e-6, pos_grid=14,
    qkv_bias="q_and_v", k_bias=False, inner_ln=True, mlp="swiglu", mlp_norm=True,
    mlp_act="silu", head_bias=True, final_norm=True, pool="cls",
    pos_resize=dict(mode="bicubic", align_corners=False, antialias=False, cls_kept=True),
    decoupled_scale_default=None,
)


def build_eva():
    c = EVA_CFG
    m = Eva(img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["width"], depth=c["depth"],
            num_heads=c["heads"], qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
            scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), global_pool="token",
            num_classes=c["embed_dim"], dynamic_img_size=True)
    m.eval()
    assert m.blocks[0].mlp.fc1_g.out_features == c["mlp_hidden"]
    randomize(m, Init(1001))
    return m


def eva_timm_to_evaclip(sd, rope_sin, rope_cos, depth):
    """timm Eva state_dict -> EVA-CLIP original layout (prefix 'visual.'). Inverse of the renames
    in timm.models.eva.checkpoint_filter_fn."""
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("attn.q_proj.bias", "attn.q_bias")
        n = n.replace("attn.v_proj.bias", "attn.v_bias")
        n = n.replace("attn.norm.", "attn.inner_attn_ln.")
        n = n.replace("mlp.fc1_g.", "mlp.w1.")
        n = n.replace("mlp.fc1_x.", "mlp.w2.")
        n = n.replace("mlp.norm.", "mlp.ffn_ln.")
        n = n.replace("mlp.fc2.", "mlp.w3.")
        out["visual." + n] = v
    # derived RoPE buffers for the native grid, as EVA-CLIP checkpoints carry them
    out["visual.rope.freqs_cos"] = rope_cos
    out["visual.rope.freqs_sin"] = rope_sin
    for i in range(depth):
        out[f"visual.blocks.{i}.attn.rope.freqs_cos"] = rope_cos
        out[f"visual.blocks.{i}.attn.rope.freqs_sin"] = rope_sin
    return out


def eva_rope(gh, gw, head_dim, ref=16, theta=10000.0):
    """Method spec §1.1: t = i·ref/L; freqs 1/theta^(j/(head_dim/4)), j < head_dim/4; the first half
    of the head dims encodes the row, the second the column; each angle used for an adjacent pair.
    Returns sin, cos of shape [gh*gw, head_dim] (row-major tokens)."""
    nb = head_dim // 4
    bands = 1.0 / (theta ** (torch.arange(nb, dtype=torch.float32) / nb))
    ty = torch.arange(gh, dtype=torch.float32) / gh * ref
    tx = torch.arange(gw, dtype=torch.float32) / gw * ref
    ay = (ty[:, None] * bands)[:, None, :].expand(gh, gw, nb)
    ax = (tx[:, None] * bands)[None, :, :].expand(gh, gw, nb)
    ang = torch.cat([ay, ax], dim=-1).reshape(gh * gw, 2 * nb).repeat_interleave(2, dim=-1)
    return ang.sin(), ang.cos()


def apply_rope(x, sin, cos):
    """(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) on adjacent pairs."""
    rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    return x * cos + rot * sin


def eva_embed(sd, img, c, antialias=False):
    p = c["patch_size"]
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    b, ch, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = resize_pos_table(sd["pos_embed"], c["pos_grid"], (gh, gw), 1, antialias)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + pos
    return x, (gh, gw), pos


def eva_block(sd, i, x, c, sin, cos):
    pre = f"blocks.{i}"
    eps, heads = c["eps"], c["heads"]
    h = ln(x, sd, pre + ".norm1", eps)
    q = split_heads(lin(h, sd, pre + ".attn.q_proj"), heads)
    k = split_heads(lin(h, sd, pre + ".attn.k_proj", bias=False), heads)
    v = split_heads(lin(h, sd, pre + ".attn.v_proj"), heads)
    q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], sin, cos)], dim=2)
    k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], sin, cos)], dim=2)
    a = ((q @ k.transpose(-2, -1)) * c["head_dim"] ** -0.5).softmax(dim=-1)
    o = merge_heads(a @ v)
    o = ln(o, sd, pre + ".attn.norm", eps)
    x = x + lin(o, sd, pre + ".attn.proj")
    h = ln(x, sd, pre + ".norm2", eps)
    h = F.silu(lin(h, sd, pre + ".mlp.fc1_g")) * lin(h, sd, pre + ".mlp.fc1_x")
    h = ln(h, sd, pre + ".mlp.norm", eps)
    return x + lin(h, sd, pre + ".mlp.fc2")


def eva_forward(sd, img, c, antialias=False):
    """Plain EVA02-CLIP vision forward (timm key names). Returns tokens entering the last block,
    the L2-normalised image embedding, grid, position table and RoPE tables."""
    x, (gh, gw), pos = eva_embed(sd, img, c, antialias)
    sin, cos = eva_rope(gh, gw, c["head_dim"], c["rope_ref_grid"], c["rope_theta"])
    before_last = None
    for i in range(c["depth"]):
        if i == c["depth"] - 1:
            before_last = x
        x = eva_block(sd, i, x, c, sin, cos)
    x = ln(x, sd, "norm", c["eps"])
    emb = F.normalize(lin(x[:, 0], sd, "head"), dim=-1)
    return before_last, emb, (gh, gw), pos, sin, cos


def eva_decoupled(sd, x, c, grid, mode, scale=None):
    pre = f"blocks.{c['depth'] - 1}"
    eps = c["eps"]
    h = ln(x, sd, pre + ".norm1", eps)
    q = lin(h, sd, pre + ".attn.q_proj")
    k = lin(h, sd, pre + ".attn.k_proj", bias=False)
    v = lin(h, sd, pre + ".attn.v_proj")
    o = decoupled_mix(q, k, v, c["heads"], mode, scale)
    o = lin(ln(o, sd, pre + ".attn.norm", eps), sd, pre + ".attn.proj")
    content = lin(ln(o[:, 1:], sd, "norm", eps), sd, "head")
    cmap = to_map(content, *grid)
    if mode == "qq":
        ctx = q[:, 1:]
    elif mode == "kk":
        ctx = k[:, 1:]
    else:
        ctx = torch.cat([F.normalize(q[:, 1:], dim=-1), F.normalize(k[:, 1:], dim=-1)], dim=-1)
    return cmap, ctx


EVA_BATCH_560 = ["coffee"]
EVA_KEEP_560 = ("in.560.u8", "560.image_embedding", "560.content_map.qq", "560.context.qq")


def make_eva(report):
    log("EVA02-CLIP tiny")
    c = EVA_CFG
    m = build_eva()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}

    # RoPE: timm vs the spec formula, at several grids
    for g in [(14, 14), (20, 20), (35, 35), (7, 9)]:
        emb = m.rope.get_embed(shape=g)
        t_sin, t_cos = emb.chunk(2, dim=-1)
        s_sin, s_cos = eva_rope(*g, c["head_dim"])
        d = max((t_sin - s_sin).abs().max().item(), (t_cos - s_cos).abs().max().item())
        report.append(f"EVA RoPE grid {g}: max |timm - spec| = {d:.3g}")
        assert d == 0.0, d
    sin14, cos14 = eva_rope(14, 14, c["head_dim"])

    # EVA-CLIP layout + round trip through timm's own checkpoint_filter_fn
    evaclip = eva_timm_to_evaclip(sd, sin14, cos14, c["depth"])
    back = eva_checkpoint_filter_fn(dict(evaclip), m)
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    m.load_state_dict(back, strict=True)
    save(os.path.join(REF, "eva_tiny.timm.safetensors"), sd, c)
    save(os.path.join(REF, "eva_tiny.evaclip.safetensors"), evaclip, c)

    io = {"norm.mean": torch.tensor(CLIP_MEAN), "norm.std": torch.tensor(CLIP_STD)}
    # 224 and 320: batch [chelsea, coffee], every output. 560 (the student size): coffee only and
    # only the four tensors in EVA_KEEP_560, to keep the fixtures small (still non-square, so the
    # letterbox padding is exercised at the real student size).
    for r, names in ((224, BATCH), (320, BATCH), (560, EVA_BATCH_560)):
        u8 = batch_u8(r, names)
        img = normalise(u8, CLIP_MEAN, CLIP_STD)
        with torch.no_grad():
            before, emb, grid, pos, sin, cos = eva_forward(sd, img, c, antialias=False)
            timm_emb = F.normalize(m(img), dim=-1)
            _, emb_aa, _, _, _, _ = eva_forward(sd, img, c, antialias=True)
        e_spec = rel_err(emb, timm_emb)
        e_aa = rel_err(emb_aa, timm_emb)
        report.append(f"EVA R={r}: image_embedding rel err spec(no-AA) vs timm = {e_spec:.3g}; "
                      f"plain forward with antialias=True vs timm = {e_aa:.3g}")
        assert e_aa < 1e-5, e_aa
        if r == 224:
            assert e_spec < 1e-5
        io[f"in.{r}.u8"] = u8
        io[f"{r}.tokens_before_last"] = before
        io[f"{r}.image_embedding"] = emb
        if r != 560:  # debugging aids (derived, not part of the model input); skipped at 560 for size
            io[f"{r}.pos_embed"] = pos
            io[f"{r}.rope.sin"] = sin
            io[f"{r}.rope.cos"] = cos
        with torch.no_grad():
            for mode, scale, key in [("qq", None, "qq"), ("qq", c["head_dim"] ** -0.5, "qq_scaled"),
                                     ("kk", None, "kk"), ("csa", None, "csa")]:
                cmap, ctx = eva_decoupled(sd, before, c, grid, mode, scale)
                io[f"{r}.content_map.{key}"] = cmap
                if key != "qq_scaled":
                    io[f"{r}.context.{key}"] = ctx
        for k in list(io):
            if k.startswith(f"{r}."):
                check_not_degenerate(k, io[k])
        # the pos table and RoPE must influence outputs
        assert (io[f"{r}.content_map.qq"] - io[f"{r}.content_map.qq_scaled"]).abs().max() > 1e-2
        if r == 560:
            for k in [k for k in io if k.startswith("560.") and k not in EVA_KEEP_560]:
                del io[k]
    assert all(k in io for k in EVA_KEEP_560)
    save(os.path.join(REF, "eva_tiny.io.safetensors"), io, c)


# --------------------------------------------------------------------------------------------
# 2. DINOv2 with registers
# --------------------------------------------------------------------------------------------

DINO_CFG = dict(
    family="dinov2_reg",
    timm_class="timm.models.vision_transformer.VisionTransformer (configured like vit_base_patch14_reg4_dinov2)",
    width=48, depth=3, heads=3, head_dim=16, mlp_hidden=192, patch_size=14, image_size=518,
    embed_dim=48, register_tokens=4, layer_scale=True, rope_ref_grid=None, eps=1e-6, pos_grid=37,
    mlp_act="gelu_erf", qkv_bias=True, final_norm=True, head=None,
    token_order="cls, registers, patches", pos_embed_for_registers=False,
    pos_resize=dict(mode="bicubic", align_corners=False, antialias=True, size_not_scale=True,
                    interpolate_offset=0.0, skipped_at_native_grid=True),
)


def make_dino(report):
    log("DINOv2-reg tiny")
    c = DINO_CFG
    m = VisionTransformer(img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["width"],
                          depth=c["depth"], num_heads=c["heads"], mlp_ratio=4, init_values=1e-5,
                          reg_tokens=4, no_embed_class=True, dynamic_img_size=True, num_classes=0)
    m.eval()
    init = Init(2002)
    randomize(m, init)
    # Meta layout: cls_token and pos_embed[:, 0] are separate tensors; timm folds them together
    meta_cls = init.normal((1, 1, c["width"]), 0.5)
    meta_pos0 = init.normal((1, 1, c["width"]), 0.5)
    mask_token = init.normal((1, c["width"]), 0.5)
    with torch.no_grad():
        m.cls_token.copy_(meta_cls + meta_pos0)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    meta = {}
    for k, v in sd.items():
        if k == "cls_token":
            meta["cls_token"] = meta_cls
        elif k == "reg_token":
            meta["register_tokens"] = v
        elif k == "pos_embed":
            meta["pos_embed"] = torch.cat([meta_pos0, v], dim=1)
        else:
            meta[k] = v
    meta["mask_token"] = mask_token
    back = vit_checkpoint_filter_fn(dict(meta), m)
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    save(os.path.join(REF, "dinov2_tiny.timm.safetensors"), sd, c)
    save(os.path.join(REF, "dinov2_tiny.meta.safetensors"), meta, c)

    def meta_forward(img, antialias=True):
        """Meta hub DinoVisionTransformer.forward_features written out (reg model: antialias=True,
        interpolate_offset=0 -> size=(h0, w0)); returns x_norm_patchtokens."""
        p = c["patch_size"]
        x = F.conv2d(img, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=p)
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([meta["cls_token"].expand(b, -1, -1), x], dim=1)
        x = x + resize_pos_table(meta["pos_embed"], c["pos_grid"], (gh, gw), 1, antialias)
        x = torch.cat([x[:, :1], meta["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
        eps, heads = c["eps"], c["heads"]
        for i in range(c["depth"]):
            pre = f"blocks.{i}"
            h = ln(x, meta, pre + ".norm1", eps)
            qkv = lin(h, meta, pre + ".attn.qkv")
            q, k, v = [split_heads(t, heads) for t in qkv.chunk(3, dim=-1)]
            a = ((q @ k.transpose(-2, -1)) * c["head_dim"] ** -0.5).softmax(dim=-1)
            o = lin(merge_heads(a @ v), meta, pre + ".attn.proj")
            x = x + meta[pre + ".ls1.gamma"] * o
            h = ln(x, meta, pre + ".norm2", eps)
            h = lin(F.gelu(lin(h, meta, pre + ".mlp.fc1")), meta, pre + ".mlp.fc2")
            x = x + meta[pre + ".ls2.gamma"] * h
        x = ln(x, meta, "norm", eps)
        return to_map(x[:, 1 + c["register_tokens"]:], gh, gw)

    io = {"norm.mean": torch.tensor(IMAGENET_MEAN), "norm.std": torch.tensor(IMAGENET_STD)}
    # 280 and 490 (the VFM size): batch [chelsea, coffee]; native 518: chelsea only (size)
    for r, names in ((280, BATCH), (490, BATCH), (518, ["chelsea"])):
        u8 = batch_u8(r, names)
        img = normalise(u8, IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            feats = m.forward_features(img)
            g = r // c["patch_size"]
            pf = to_map(feats[:, 1 + c["register_tokens"]:], g, g)
            mine = meta_forward(img, antialias=True)
            mine_noaa = meta_forward(img, antialias=False)
        e = rel_err(mine, pf)
        e2 = rel_err(mine_noaa, pf)
        report.append(f"DINOv2 R={r}: Meta-style plain forward (antialias) vs timm rel err {e:.3g}; "
                      f"without antialias vs timm {e2:.3g}")
        assert e < 1e-5, e
        io[f"in.{r}.u8"] = u8
        io[f"{r}.patch_features"] = pf
        check_not_degenerate(f"{r}.patch_features", pf)
    save(os.path.join(REF, "dinov2_tiny.io.safetensors"), io, c)


# --------------------------------------------------------------------------------------------
# 2b. DINO v1 (alternative VFM; the real one is ViT-B/8)
# --------------------------------------------------------------------------------------------

DINO1_META_RESIZE_CALL = (
    "F.interpolate(pos_embed[:, 1:].reshape(1, 28, 28, C).permute(0, 3, 1, 2), "
    "scale_factor=((H // 8 + 0.1) / math.sqrt(784), (W // 8 + 0.1) / math.sqrt(784)), mode='bicubic')")

DINO1_CFG = dict(
    family="dino_v1",
    timm_class="timm.models.vision_transformer.VisionTransformer (configured like vit_base_patch8_224.dino)",
    meta_class="facebookresearch/dino vision_transformer.py::vit_base(patch_size=8) (VisionTransformer)",
    width=48, depth=2, heads=3, head_dim=16, mlp_hidden=192, patch_size=8, image_size=224,
    embed_dim=48, register_tokens=0, layer_scale=False, rope_ref_grid=None, eps=1e-6, pos_grid=28,
    mlp_act="gelu_erf", qkv_bias=True, final_norm=True, head=None, token_order="cls, patches",
    pos_embed_for_cls=True, output="norm(x)[:, 1:] (CLS dropped), reshaped [B, C, H/8, W/8]",
    pos_resize=dict(
        source="facebookresearch/dino vision_transformer.py::VisionTransformer.interpolate_pos_encoding",
        call=DINO1_META_RESIZE_CALL,
        mode="bicubic", align_corners=False, antialias=False, recompute_scale_factor=None,
        size_not_scale=False, interpolate_offset=0.1, cls_kept=True,
        output_size="floor(28 * scale_factor) = H // 8 (resp. W // 8)",
        source_coordinate=("src = (dst + 0.5) * (1.0 / scale_factor) - 0.5 with scale_factor = (g + 0.1) / 28 "
                           "(torch: 1.0 / scale_factor in float64, then used as float32): step 28 / (g + 0.1), "
                           "not 28 / g; 4 taps, cubic a = -0.75, tap indices clamped to [0, 27]"),
        scale_factor_order="(rows, cols): Meta unpacks x.shape as (B, nc, w, h), so its w0 is the row count",
        skipped_when="number of patches == 784 and H == W (the native 28x28 grid): table used as is"),
    timm_pos_resize=dict(mode="bicubic", align_corners=False, antialias=True, size_not_scale=True,
                         note="timm's forward differs from Meta's off the native grid; fixtures follow Meta"),
)
DINO1_IO = ((224, BATCH), (320, ["chelsea"]))


def dino1_meta_pos(pos, gh, gw, c):
    """facebookresearch/dino VisionTransformer.interpolate_pos_encoding, written out (x of shape
    [B, 3, H, W]; Meta names H `w` and W `h`, the order of the scale factors is (H, W))."""
    npatch = gh * gw
    n = pos.shape[1] - 1
    if npatch == n and gh == gw:  # Meta: `npatch == N and w == h`
        return pos
    class_pos_embed = pos[:, 0]
    patch_pos_embed = pos[:, 1:]
    dim = pos.shape[-1]
    w0, h0 = gh + 0.1, gw + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def cubic_resize_explicit(t, out_size, inv_scale, a=-0.75):
    """[1, C, n, n] -> [1, C, out, out] with the plain bicubic convolution (Keys, a = -0.75),
    src = (dst + 0.5) * inv_scale - 0.5, neighbour indices clamped to [0, n-1]; float64.
    Used only to check the description of Meta's call in the config."""
    def weights(n_in, n_out):
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        for d in range(n_out):
            src = (d + 0.5) * inv_scale - 0.5
            i0 = math.floor(src)
            f = src - i0
            for k in range(-1, 3):
                x = abs(f - k)
                if x <= 1:
                    wt = ((a + 2) * x - (a + 3)) * x * x + 1
                elif x < 2:
                    wt = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
                else:
                    wt = 0.0
                w[d, min(max(i0 + k, 0), n_in - 1)] += wt
        return w
    n = t.shape[-1]
    wy, wx = weights(n, out_size[0]), weights(n, out_size[1])
    return torch.einsum("yi,bcij,xj->bcyx", wy, t.double(), wx)


def make_dino1(report):
    log("DINO v1 tiny")
    c = DINO1_CFG
    m = VisionTransformer(img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["width"],
                          depth=c["depth"], num_heads=c["heads"], mlp_ratio=4, qkv_bias=True,
                          dynamic_img_size=True, num_classes=0)
    m.eval()
    assert m.blocks[0].mlp.fc1.out_features == c["mlp_hidden"] and m.blocks[0].norm1.eps == c["eps"]
    assert m.reg_token is None and not m.no_embed_class and m.pos_embed.shape == (1, 1 + 28 * 28, 48)
    randomize(m, Init(5005))
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    # Meta's DINO v1 layout is timm's layout: same names, same shapes (pos_embed includes the CLS
    # entry, no registers/LayerScale/head). Checked through timm's own checkpoint_filter_fn.
    meta = dict(sd)
    back = vit_checkpoint_filter_fn(dict(meta), m)
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    m.load_state_dict(back, strict=True)
    expect = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "norm.weight", "norm.bias"}
    for i in range(c["depth"]):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expect |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    assert set(meta) == expect, set(meta) ^ expect
    save(os.path.join(REF, "dino_tiny.meta.safetensors"), meta, c)

    def meta_forward(img, pos_fn):
        """facebookresearch/dino VisionTransformer.prepare_tokens + blocks + norm, written out;
        returns the patch tokens after the final norm as [B, C, H/8, W/8]."""
        p = c["patch_size"]
        x = F.conv2d(img, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=p)
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([meta["cls_token"].expand(b, -1, -1), x], dim=1)
        x = x + pos_fn(meta["pos_embed"], gh, gw)
        eps, heads = c["eps"], c["heads"]
        for i in range(c["depth"]):
            pre = f"blocks.{i}"
            h = ln(x, meta, pre + ".norm1", eps)
            qkv = lin(h, meta, pre + ".attn.qkv")
            q, k, v = [split_heads(t, heads) for t in qkv.chunk(3, dim=-1)]
            a = ((q @ k.transpose(-2, -1)) * c["head_dim"] ** -0.5).softmax(dim=-1)
            x = x + lin(merge_heads(a @ v), meta, pre + ".attn.proj")
            h = ln(x, meta, pre + ".norm2", eps)
            x = x + lin(F.gelu(lin(h, meta, pre + ".mlp.fc1")), meta, pre + ".mlp.fc2")
        x = ln(x, meta, "norm", eps)
        return to_map(x[:, 1:], gh, gw)

    def meta_pos(pos, gh, gw):
        return dino1_meta_pos(pos, gh, gw, c)

    def timm_style_pos(pos, gh, gw):  # timm: size=(gh, gw), antialias=True
        return resize_pos_table(pos, c["pos_grid"], (gh, gw), 1, antialias=True)

    def plain_size_pos(pos, gh, gw):  # size=(gh, gw), no antialias, no +0.1
        return resize_pos_table(pos, c["pos_grid"], (gh, gw), 1, antialias=False)

    io = {"norm.mean": torch.tensor(IMAGENET_MEAN), "norm.std": torch.tensor(IMAGENET_STD)}
    for r, names in DINO1_IO:
        u8 = batch_u8(r, names)
        img = normalise(u8, IMAGENET_MEAN, IMAGENET_STD)
        g = r // c["patch_size"]
        with torch.no_grad():
            pf = meta_forward(img, meta_pos)
            timm_pf = to_map(m.forward_features(img)[:, 1:], g, g)
            e_timm = rel_err(pf, timm_pf)
            e_timm_style = rel_err(meta_forward(img, timm_style_pos), timm_pf)
            e_plain = rel_err(meta_forward(img, plain_size_pos), pf)
        line = (f"DINO v1 R={r}: Meta forward vs timm forward_features rel err {e_timm:.3g} "
                f"(max|d|/max|timm|); plain forward with timm's resize (size, antialias=True) vs timm "
                f"{e_timm_style:.3g}")
        if r != c["image_size"]:
            line += f"; Meta vs size=({g},{g}) without the +0.1 (no antialias) {e_plain:.3g}"
        report.append(line)
        assert e_timm_style < 1e-5, e_timm_style
        if r == c["image_size"]:
            assert e_timm < 1e-5, e_timm
        else:
            assert e_timm > 1e-3, e_timm  # the two resizes must visibly differ
            # the description in the config, checked: Meta's call in float64 equals the explicit
            # formula with src = (dst + 0.5) / scale_factor - 0.5 to rounding; in float32 (the
            # fixture) torch's kernel differs from the exact result by fp32 rounding only
            pos = meta["pos_embed"]
            sf = (g + 0.1) / math.sqrt(784)
            exact = cubic_resize_explicit(pos[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2), (g, g), 1.0 / sf)
            d64 = (meta_pos(pos.double(), g, g)[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2) - exact)
            d32 = (meta_pos(pos, g, g)[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).double() - exact)
            d64, d32 = d64.abs().max().item(), d32.abs().max().item()
            report.append(f"DINO v1 R={r}: Meta's pos resize (scale_factor={sf!r}) vs explicit bicubic "
                          f"(a=-0.75, src=(dst+0.5)/scale_factor-0.5, indices clamped), float64: max abs "
                          f"diff {d64:.3g}; torch float32 vs exact: {d32:.3g} (table max |v| "
                          f"{pos.abs().max().item():.3g}); size=({g},{g}) instead would shift src by "
                          f"{(g - 1 + 0.5) * (28 / g - 1 / sf):.4f} cells at the last column")
            assert d64 < 1e-12 and d32 < 1e-5, (d64, d32)
        io[f"in.{r}.u8"] = u8
        io[f"{r}.patch_features"] = pf
        check_not_degenerate(f"{r}.patch_features", pf)
    save(os.path.join(REF, "dino_tiny.io.safetensors"), io, c)


# --------------------------------------------------------------------------------------------
# 3. OpenAI-style CLIP (open_clip)
# --------------------------------------------------------------------------------------------

OC_CFG = dict(
    family="openai_clip",
    open_clip_class="open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=True)",
    width=64, depth=3, heads=4, head_dim=16, mlp_hidden=256, patch_size=16, image_size=224,
    embed_dim=32, register_tokens=0, layer_scale=False, rope_ref_grid=None, eps=1e-5, pos_grid=14,
    mlp_act="quick_gelu", ln_pre=True, patch_bias=False, pool="cls", proj_bias=False,
    pos_resize=dict(mode="bicubic", align_corners=False, antialias=False, cls_kept=True),
    text_width=8, text_heads=2, text_layers=2, text_mlp_hidden=32, context_length=77,
    vocab_size=49408, text_pool="argmax_of_ids (EOT)", text_causal_mask=True,
)

PROMPTS = ["a photo of a cat", "a photo of a dog.", "a cup of coffee on a wooden table",
           "a rocket launching into the sky", "an astronaut in an orange suit",
           "a photo of a tabby cat lying on a blanket"]


def oc_block(sd, i, x, c, attn_only_mode=None):
    pre = f"visual.transformer.resblocks.{i}"
    eps, heads, w = c["eps"], c["heads"], c["width"]
    h = ln(x, sd, pre + ".ln_1", eps)
    W, B = sd[pre + ".attn.in_proj_weight"], sd[pre + ".attn.in_proj_bias"]
    q = F.linear(h, W[:w], B[:w])
    k = F.linear(h, W[w:2 * w], B[w:2 * w])
    v = F.linear(h, W[2 * w:], B[2 * w:])
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    a = ((qh @ kh.transpose(-2, -1)) * c["head_dim"] ** -0.5).softmax(dim=-1)
    x = x + lin(merge_heads(a @ vh), sd, pre + ".attn.out_proj")
    h = ln(x, sd, pre + ".ln_2", eps)
    h = lin(h, sd, pre + ".mlp.c_fc")
    h = h * torch.sigmoid(1.702 * h)
    return x + lin(h, sd, pre + ".mlp.c_proj")


def oc_forward(sd, img, c):
    p = c["patch_size"]
    x = F.conv2d(img, sd["visual.conv1.weight"], None, stride=p)
    b, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].reshape(1, 1, -1).expand(b, -1, -1)
    pos = resize_pos_table(sd["visual.positional_embedding"].unsqueeze(0), c["pos_grid"], (gh, gw), 1, False)
    x = torch.cat([cls, x], dim=1) + pos
    x = ln(x, sd, "visual.ln_pre", c["eps"])
    before = None
    for i in range(c["depth"]):
        if i == c["depth"] - 1:
            before = x
        x = oc_block(sd, i, x, c)
    x = ln(x, sd, "visual.ln_post", c["eps"])
    emb = F.normalize(x[:, 0] @ sd["visual.proj"], dim=-1)
    return before, emb, (gh, gw)


def oc_decoupled(sd, x, c, grid):
    pre = f"visual.transformer.resblocks.{c['depth'] - 1}"
    w = c["width"]
    h = ln(x, sd, pre + ".ln_1", c["eps"])
    W, B = sd[pre + ".attn.in_proj_weight"], sd[pre + ".attn.in_proj_bias"]
    q = F.linear(h, W[:w], B[:w])
    v = F.linear(h, W[2 * w:], B[2 * w:])
    o = lin(decoupled_mix(q, q, v, c["heads"], "qq"), sd, pre + ".attn.out_proj")
    content = ln(o[:, 1:], sd, "visual.ln_post", c["eps"]) @ sd["visual.proj"]
    return to_map(content, *grid), q[:, 1:]


def make_openclip(report):
    log("OpenAI-style CLIP tiny (open_clip)")
    c = OC_CFG
    vision_cfg = dict(layers=c["depth"], width=c["width"], head_width=c["head_dim"], mlp_ratio=4.0,
                      patch_size=c["patch_size"], image_size=c["image_size"])
    text_cfg = dict(context_length=c["context_length"], vocab_size=c["vocab_size"], width=c["text_width"],
                    heads=c["text_heads"], layers=c["text_layers"], mlp_ratio=4.0)
    m = open_clip.model.CLIP(embed_dim=c["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    m.eval()
    assert m.visual.transformer.resblocks[0].attn.num_heads == c["heads"]
    assert m.visual.transformer.resblocks[0].ln_1.eps == c["eps"]
    # visual.proj / text_projection are used as x @ P, so their fan-in is shape[0]
    fan = {"visual.proj": c["width"], "text_projection": c["text_width"]}
    randomize(m, Init(3003), fan_in_of=fan)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    save(os.path.join(REF, "openai_tiny.openclip.safetensors"), sd, dict(c, vision_cfg=vision_cfg, text_cfg=text_cfg))

    io = {"norm.mean": torch.tensor(CLIP_MEAN), "norm.std": torch.tensor(CLIP_STD)}
    for r in (224, 320):
        u8 = batch_u8(r)
        img = normalise(u8, CLIP_MEAN, CLIP_STD)
        with torch.no_grad():
            before, emb, grid = oc_forward(sd, img, c)
            if r == 224:
                ref = m.encode_image(img, normalize=True)
                e = rel_err(emb, ref)
                # tokens entering the last block, from open_clip's own modules
                xt = m.visual._embeds(img)
                for blk in m.visual.transformer.resblocks[:-1]:
                    xt = blk(xt)
                e2 = rel_err(before, xt)
                report.append(f"open_clip R=224: plain forward vs encode_image rel err {e:.3g}; "
                              f"tokens_before_last vs open_clip modules {e2:.3g}")
                assert e < 1e-5 and e2 < 1e-5
                emb = ref  # store the library's own output at the native size
            cmap, ctx = oc_decoupled(sd, before, c, grid)
        io[f"in.{r}.u8"] = u8
        io[f"{r}.image_embedding"] = emb
        io[f"{r}.tokens_before_last"] = before
        io[f"{r}.content_map.qq"] = cmap
        io[f"{r}.context.qq"] = ctx
        for k in list(io):
            if k.startswith(f"{r}."):
                check_not_degenerate(k, io[k])
    ids = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        temb = m.encode_text(ids, normalize=True)
    check_not_degenerate("text.embedding", temb)
    io["text.ids"] = ids
    io["text.embedding"] = temb
    save(os.path.join(REF, "openai_tiny.io.safetensors"), io, dict(c, prompts=PROMPTS))


# --------------------------------------------------------------------------------------------
# 4. tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_TEXTS = [
    "a photo of a cat",
    "a photo of a dog.",
    "A PHOTO OF A CAT",
    "Hello, world! How are you?",
    "don't stop, it's fine; we're here, they've gone, I'm ok, we'll see, he'd go",
    "DON'T SHOUT, IT'S LOUD",
    "the year 2025 had 365 days and 3.14159 is pi",
    "room 101, tel. +1-555-0100",
    "café naïve résumé Zürich",
    "cafe\u0301 (decomposed accent)",
    "東京タワーの写真",
    "一只猫的照片",
    "a photo of a 🐱 and a 🚀!",
    "👨‍👩‍👧 family emoji with ZWJ",
    "fish &amp; chips &lt;3 &quot;quoted&quot;",
    "double escaped &amp;amp; ampersand",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand   runs   of spaces",
    "curly quotes: \u201cdon\u2019t\u201d",
    "ﬁne ligatures and ｆｕｌｌｗｉｄｔｈ letters",
    "mojibake: cafÃ© and donâ€™t",
    "under_score snake_case kebab-case CamelCase",
    "punctuation!!! ??? ... --- ***",
    "<start_of_text> literal special tokens <end_of_text>",
    "Ελληνικά και русский текст",
    "",
    "x",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    " ".join(["a photo of a very long and detailed scene with many objects"] * 12),
    ",".join(str(i) for i in range(60)),
]


def make_tokenizer(report):
    log("tokenizer")
    tok = open_clip.tokenizer._tokenizer
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = open_clip.tokenize([text])[0].tolist()
        cleaned = tok.clean_fn(text)
        pieces = []
        for t in regex.findall(tok.pat, cleaned):
            t = "".join(tok.byte_encoder[b] for b in t.encode("utf-8"))
            pieces.extend(tok.bpe(t).split(" "))
        n_real = len(pieces) + 2
        cases.append({"text": text, "cleaned": cleaned, "pieces": pieces,
                      "truncated": n_real > 77, "ids": ids})
    assert cases[0]["ids"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407], cases[0]["ids"][:7]
    assert any(c["truncated"] for c in cases)
    path = os.path.join(REF, "tokenizer_cases.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"generator": json.loads(GENERATOR), "context_length": 77, "sot": tok.sot_token_id,
                   "eot": tok.eot_token_id, "cases": cases}, f, ensure_ascii=False, indent=1)
    log(f"  wrote {os.path.relpath(path, REPO)}: {len(cases)} cases")
    for cse in cases:
        if cse["cleaned"] != " ".join(cse["text"].split()).lower():
            report.append(f"tokenizer: clean({cse['text']!r}) = {cse['cleaned']!r}")

    os.makedirs(VOCAB, exist_ok=True)
    src = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    dst = os.path.join(VOCAB, "bpe_simple_vocab_16e6.txt.gz")
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    n_lines = len(gzip.open(dst).read().decode("utf-8").split("\n"))
    with open(os.path.join(VOCAB, "README.md"), "w") as f:
        f.write(f"""# CLIP BPE vocabulary

`bpe_simple_vocab_16e6.txt.gz` is copied byte for byte from the open_clip wheel
(`open-clip-torch` {open_clip.__version__} from PyPI, file `open_clip/bpe_simple_vocab_16e6.txt.gz`),
which took it from OpenAI's CLIP repository (<https://github.com/openai/CLIP>, `clip/bpe_simple_vocab_16e6.txt.gz`).

Licence: MIT. open_clip: Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini,
Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi,
Ali Farhadi, Ludwig Schmidt. OpenAI CLIP: Copyright (c) 2021 OpenAI. Both under the MIT licence
(permission to use, copy, modify, merge, publish, distribute, sublicense and/or sell, provided the
copyright notice and permission notice are included).

SHA-256 `{digest}`; {n_lines} lines after gunzip: line 0 is a version header, lines 1..48894 are the
merges open_clip uses (`merges[1:49152-256-2+1]`); vocabulary = 256 byte symbols + the same with
`</w>` + 48894 merges + `<start_of_text>` (49406) + `<end_of_text>` (49407) = 49408.
""")
    log("  copied vocab to fixtures/vocab/")


# --------------------------------------------------------------------------------------------
# 5. RoIAlign
# --------------------------------------------------------------------------------------------

def make_roi_align(report):
    log("roi_align")
    g = torch.Generator().manual_seed(4004)
    boxes = torch.tensor([
        [0, 2.3, 1.7, 9.8, 8.4],       # inside
        [1, 0.5, 0.5, 14.5, 11.5],     # inside, nearly the whole map
        [0, 0.0, 0.0, 5.0, 4.0],       # touching top-left border
        [1, 10.0, 8.0, 15.0, 12.0],    # touching bottom-right border
        [0, -3.2, -2.5, 4.1, 3.3],     # partly outside top-left
        [1, 12.4, 9.1, 18.7, 14.2],    # partly outside bottom-right
        [0, 20.0, 15.0, 25.0, 18.0],   # fully outside (beyond)
        [1, -10.0, -8.0, -4.0, -3.0],  # fully outside (negative)
        [0, 5.2, 6.1, 5.7, 6.4],       # sub-pixel
        [1, 14.6, 11.7, 14.9, 11.95],  # sub-pixel at the border
        [0, 7.0, 5.0, 7.0, 5.0],       # zero size
        [1, 3.3, 2.0, 3.3, 8.0],       # zero width
        [0, -5.0, -5.0, 20.0, 17.0],   # large, covering everything
        [1, -1.0, -1.0, 16.0, 13.0],   # large, a bit over the border
        [0, 0.2, 5.5, 14.8, 6.0],      # thin horizontal strip
        [1, 4.0, 3.0, 9.0, 10.0],      # integer box
        [0, -0.9, 3.0, 0.4, 7.5],      # straddles x = -0.5 .. 0 (clamp zone)
        [1, 13.9, -0.8, 15.6, 2.2],    # straddles the right/top edges
    ], dtype=torch.float32)
    out = {}
    for prefix, scale, bx in [("", 1.0, boxes), ("s025.", 0.25, None)]:
        fmap = torch.randn((2, 8, 12, 15), generator=g)
        if bx is None:  # boxes in input pixels for spatial_scale 0.25
            bx = boxes.clone()
            bx[:, 1:] = bx[:, 1:] * 4.0 + torch.rand((bx.shape[0], 4), generator=g) * 1.5
            bx[10, 1:] = torch.tensor([30.0, 22.0, 30.0, 22.0])  # keep a zero-size box
        fmap.requires_grad_(True)
        o = torchvision.ops.roi_align(fmap, bx, output_size=1, spatial_scale=scale, sampling_ratio=-1,
                                      aligned=True)
        up = torch.randn(o.shape, generator=g)
        (o * up).sum().backward()
        out[prefix + "map"] = fmap.detach()
        out[prefix + "boxes"] = bx
        out[prefix + "out"] = o.detach()
        out[prefix + "upstream"] = up
        out[prefix + "grad_map"] = fmap.grad.detach()
        nz = (o.detach().abs().sum(dim=(1, 2, 3)) > 0).tolist()
        report.append(f"roi_align{'' if scale == 1 else ' s025'}: non-zero outputs per box {nz}")
    save(os.path.join(REF, "roi_align.safetensors"), out,
         dict(output_size=1, sampling_ratio=-1, aligned=True, spatial_scale={"": 1.0, "s025.": 0.25},
              box_format="batch_index, x0, y0, x1, y1 (input pixels)"))


# --------------------------------------------------------------------------------------------
# 6. PIL preprocessing
# --------------------------------------------------------------------------------------------

CROP_BOXES = {  # integer (x0, y0, x1, y1); some make w·scale / h·scale land exactly on .5
    "astronaut": [(10, 20, 458, 245), (100, 50, 260, 400)],   # 448x225 -> 224x112.5 (tie); 160x350 upscale
    "chelsea": [(0, 0, 451, 300), (140, 60, 177, 83)],        # whole image; 37x23 tiny (upscale)
    "coffee": [(5, 10, 453, 237), (250, 60, 600, 400)],       # 448x227 -> 113.5 (tie); touching right/bottom
    "rocket": [(0, 0, 640, 427), (200, 100, 350, 420)],       # whole image; tall crop
}


# photos whose 560/490 letterboxes are stored here; chelsea/coffee at those sizes are the model
# inputs `in.560.u8` (eva, coffee only) and `in.490.u8` (dinov2, [chelsea, coffee])
PREPROCESS_FULL = ("astronaut", "rocket")


def make_preprocess(report):
    log("preprocess")
    out = {}
    for name in PHOTOS:
        img = load_photo(name)
        if name in PREPROCESS_FULL:  # chelsea/coffee letterboxes are the model io inputs instead
            out[f"{name}.student560"] = letterbox_u8(img, 560)
            out[f"{name}.vfm490"] = letterbox_u8(img, 490)
        crops = []
        for box in CROP_BOXES[name]:
            crop = img.crop(box)
            w, h = crop.size
            nw, nh = rounded_size(w, h, 224)
            report.append(f"preprocess {name} box {box}: crop {w}x{h} -> {nw}x{nh} "
                          f"(exact {w * 224 / max(w, h):.3f}x{h * 224 / max(w, h):.3f})")
            crops.append(letterbox_u8(crop, 224, centred=True))
        out[f"{name}.crop224"] = torch.stack(crops)
        out[f"{name}.boxes"] = torch.tensor(CROP_BOXES[name], dtype=torch.int64)
        for s in (560, 490):
            w, h = img.size
            report.append(f"preprocess {name} {w}x{h} -> {s}: {rounded_size(w, h, s)} "
                          f"(exact {w * s / max(w, h):.3f}x{h * s / max(w, h):.3f})")
    save(os.path.join(REF, "preprocess.safetensors"), out,
         dict(resample="PIL.Image.BICUBIC", rounding="python round() (half to even) of w*size/max(w,h)",
              student=dict(size=560, pad="right/bottom", photos=list(PREPROCESS_FULL)),
              vfm=dict(size=490, pad="right/bottom", photos=list(PREPROCESS_FULL)),
              crop=dict(size=224, pad="centred ((224-nw)//2, (224-nh)//2)", cut="PIL Image.crop(box)"),
              layout="uint8 [3, H, W] (RGB, before normalisation)"))


def main():
    report = []
    os.makedirs(REF, exist_ok=True)
    copy_photos()
    make_preprocess(report)
    make_roi_align(report)
    make_tokenizer(report)
    make_eva(report)
    make_dino(report)
    make_dino1(report)
    make_openclip(report)
    with open(os.path.join(REF, "generation_report.txt"), "w") as f:
        f.write("\n".join(report) + "\n")
    log("\n".join(report))
    total = 0
    for root, _, files in os.walk(FIX):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    log(f"total fixtures size: {total} bytes")


if __name__ == "__main__":
    main()
