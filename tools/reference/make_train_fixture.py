#!/usr/bin/env python3
"""Reference for ONE DeCLIP training step on the tiny models, repeated 3 times (same batch).

Run by hand (never in CI), after make_fixtures.py has produced the model weights:

    tools/reference/.venv/bin/python tools/reference/make_train_fixture.py

Writes fixtures/reference/train_step.safetensors (see tools/reference/README.md, "Training step").
Everything is float32 on CPU with 2 threads, written plainly in PyTorch (the model forwards are the
same plain code make_fixtures.py uses; the optimizer is torch.optim.AdamW pinned to its
single-tensor implementation; the schedule is open_clip's cosine_lr written out). Two runs give
byte-identical files.
"""

import hashlib
import json
import math
import os
import sys

import numpy as np
import PIL
import safetensors
import timm
import torch
import torch.nn.functional as F
import torchvision
import open_clip
from safetensors.torch import load_file
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (helpers: letterbox, normalise, plain forwards, writer)
from make_fixtures import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DINO_CFG, EVA_CFG, REF,  # noqa: E402
                           REPO, eva_block, eva_decoupled, eva_embed, eva_forward, eva_rope, letterbox_u8,
                           lin, ln, load_photo, normalise, rel_err, resize_pos_table, split_heads,
                           merge_heads, to_map)

torch.set_num_threads(2)
torch.manual_seed(0)

OUT = os.path.join(REF, "train_step.safetensors")

GENERATOR = json.dumps({
    "script": "tools/reference/make_train_fixture.py",
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "timm": timm.__version__,
    "open_clip": open_clip.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}, sort_keys=True)

STUDENT_SIZE = 224     # -> 14x14 grid (patch 16)
VFM_SIZE = 196         # -> 14x14 grid (patch 14)
CROP_SIZE = 224
GRID = 14
BATCH = ["chelsea", "coffee"]
# (rows m, cols n) per image; cells tile the image, row-major; DROP: (image index, cell index) removed
LAYOUTS = [(2, 3), (3, 2)]
DROP = [(1, 5)]        # the last cell of image 1 (0-based row 2, col 1 of coffee's 3x2 layout)

W_CONTENT, W_CONTEXT = 1.0, 0.1
BASE_LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1
WARMUP, TOTAL_STEPS, N_STEPS = 2, 6, 3

LAST = EVA_CFG["depth"] - 1
# frozen student tensors (EVA-CLIP names without "visual."), method spec §1.3
FROZEN_PREFIXES = ("patch_embed.", "norm.", "head.")
FROZEN_NAMES = ("cls_token", "pos_embed", f"blocks.{LAST}.attn.k_proj.weight")
FROZEN_LAST_PREFIXES = (f"blocks.{LAST}.norm2.", f"blocks.{LAST}.mlp.")
NO_DECAY_SUBSTRINGS = ("bn", "ln", "bias", "logit_scale")  # open_clip_train/main.py `exclude`

# EVA-CLIP -> timm renames (inverse of make_fixtures.eva_timm_to_evaclip; checked against
# timm.models.eva.checkpoint_filter_fn below)
EVACLIP_TO_TIMM = [("attn.q_bias", "attn.q_proj.bias"), ("attn.v_bias", "attn.v_proj.bias"),
                   ("attn.inner_attn_ln.", "attn.norm."), ("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."),
                   ("mlp.ffn_ln.", "mlp.norm."), ("mlp.w3.", "mlp.fc2.")]


def log(*a):
    print(*a, flush=True)


def evaclip_to_timm_name(n):
    for a, b in EVACLIP_TO_TIMM:
        n = n.replace(a, b)
    return n


def is_trainable(n):
    if n.startswith(FROZEN_PREFIXES) or n in FROZEN_NAMES or n.startswith(FROZEN_LAST_PREFIXES):
        return False
    return True


def decays(n, p):
    """open_clip_train/main.py: exclude = p.ndim < 2 or 'bn'/'ln'/'bias'/'logit_scale' in name."""
    return p.ndim >= 2 and not any(s in n for s in NO_DECAY_SUBSTRINGS)


def lr_at(step):
    """open_clip_train.scheduler.cosine_lr, written out."""
    if step < WARMUP:
        return BASE_LR * (step + 1) / WARMUP
    e, es = step - WARMUP, TOTAL_STEPS - WARMUP
    return 0.5 * (1 + math.cos(math.pi * e / es)) * BASE_LR


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def crop_plan():
    """-> list of (image index, (x0, y0, x1, y1) float64 original pixels), dropped cells removed."""
    plan = []
    for b, (name, (m, n)) in enumerate(zip(BATCH, LAYOUTS)):
        w, h = load_photo(name).size
        cells = []
        for i in range(m):
            for j in range(n):
                cells.append((w * j / n, h * i / m, w * (j + 1) / n, h * (i + 1) / m))
        for c, box in enumerate(cells):
            if (b, c) not in DROP:
                plan.append((b, box))
    return plan


def make_inputs():
    imgs = [load_photo(n) for n in BATCH]
    student_u8 = torch.stack([letterbox_u8(im, STUDENT_SIZE) for im in imgs])
    vfm_u8 = torch.stack([letterbox_u8(im, VFM_SIZE) for im in imgs])
    plan = crop_plan()
    crops, pix, orig, grid = [], [], [], []
    for b, box in plan:
        w, h = imgs[b].size
        r = tuple(round(v) for v in box)  # Python round: half to even
        crops.append(letterbox_u8(imgs[b].crop(r), CROP_SIZE, centred=True))
        pix.append(r)
        orig.append(box)
        s = STUDENT_SIZE / max(w, h)
        g = GRID / STUDENT_SIZE
        grid.append([float(b)] + [(v * s) * g for v in box])  # float64, then f32 below
    return dict(student_u8=student_u8, vfm_u8=vfm_u8, crops_u8=torch.stack(crops),
                boxes_pixels=torch.tensor(pix, dtype=torch.int64),
                boxes_original=torch.tensor(orig, dtype=torch.float64),
                boxes_grid=torch.tensor(grid, dtype=torch.float64).to(torch.float32))


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

def load_eva():
    """-> (EVA-CLIP names without 'visual.' -> tensor) for the model weights (RoPE buffers dropped)."""
    raw = load_file(os.path.join(REF, "eva_tiny.evaclip.safetensors"))
    out = {}
    for k, v in raw.items():
        assert k.startswith("visual."), k
        n = k[len("visual."):]
        if "rope.freqs_" in n:
            continue  # derived buffers (method spec §1.1: ignore)
        out[n] = v
    return out


def dinov2_forward(meta, img, c=DINO_CFG):
    """Meta DINOv2-reg forward_features written out (as make_fixtures.make_dino.meta_forward):
    antialiased bicubic position resize by size; returns patch tokens after the final norm [B,N,C]."""
    p = c["patch_size"]
    x = F.conv2d(img, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=p)
    b, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([meta["cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + resize_pos_table(meta["pos_embed"], c["pos_grid"], (gh, gw), 1, True)
    x = torch.cat([x[:, :1], meta["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    eps, heads = c["eps"], c["heads"]
    for i in range(c["depth"]):
        pre = f"blocks.{i}"
        h = ln(x, meta, pre + ".norm1", eps)
        qkv = lin(h, meta, pre + ".attn.qkv")
        q, k, v = [split_heads(t, heads) for t in qkv.chunk(3, dim=-1)]
        a = ((q @ k.transpose(-2, -1)) * c["head_dim"] ** -0.5).softmax(dim=-1)
        x = x + meta[pre + ".ls1.gamma"] * lin(merge_heads(a @ v), meta, pre + ".attn.proj")
        h = ln(x, meta, pre + ".norm2", eps)
        x = x + meta[pre + ".ls2.gamma"] * lin(F.gelu(lin(h, meta, pre + ".mlp.fc1")), meta, pre + ".mlp.fc2")
    x = ln(x, meta, "norm", eps)
    return x[:, 1 + c["register_tokens"]:], (gh, gw)


def student_forward(P, img):
    """Method spec §1.2: blocks 0..n-2 normal (RoPE), decoupled last block ('qq', no scale).
    P: timm names -> tensors. Returns content map [B,E,H,W] and context Q [B,N,C]."""
    c = EVA_CFG
    x, (gh, gw), _ = eva_embed(P, img, c)
    sin, cos = eva_rope(gh, gw, c["head_dim"], c["rope_ref_grid"], c["rope_theta"])
    for i in range(c["depth"] - 1):
        x = eva_block(P, i, x, c, sin, cos)
    return eva_decoupled(P, x, c, (gh, gw), "qq", None)


def declip_loss(P, student_img, boxes_grid, crop_emb, T):
    cmap, ctx = student_forward(P, student_img)
    per_image = [boxes_grid[boxes_grid[:, 0] == b, 1:] for b in range(student_img.shape[0])]
    roi = torchvision.ops.roi_align(cmap, per_image, output_size=1, spatial_scale=1.0,
                                    sampling_ratio=-1, aligned=True)
    s = F.normalize(roi.flatten(1), dim=-1)
    loss_content = 1.0 - (s * crop_emb).sum(-1).mean()
    qn = F.normalize(ctx, dim=-1)
    S = qn @ qn.transpose(1, 2)
    loss_context = (T - S).norm(dim=-1).mean()
    loss = W_CONTENT * loss_content + W_CONTEXT * loss_context
    return loss, loss_content, loss_context, dict(content_map=cmap, context=ctx, roi=roi, roi_features=s)


# --------------------------------------------------------------------------------------------

def save(path, tensors, config):
    mf._ST_DTYPE.setdefault(torch.float64, "F64")
    out = {}
    for k, v in tensors.items():
        assert isinstance(v, torch.Tensor), k
        assert v.dtype in (torch.float32, torch.float64, torch.int64, torch.uint8), (k, v.dtype)
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{k}: non-finite values"
        out[k] = v.detach().contiguous().clone()
    mf.write_safetensors(path, out, {"generator": GENERATOR, "config": json.dumps(config, sort_keys=True)})
    loaded = load_file(path)
    assert set(loaded) == set(out)
    for k in out:
        assert loaded[k].dtype == out[k].dtype and torch.equal(loaded[k], out[k]), k
    log(f"  wrote {os.path.relpath(path, REPO)}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def main():
    report = []
    inp = make_inputs()
    K = inp["crops_u8"].shape[0]
    assert K == 11 and inp["boxes_grid"].shape == (11, 5)

    # ---- weights -------------------------------------------------------------------------
    eva = load_eva()  # EVA-CLIP names
    timm_sd = {evaclip_to_timm_name(n): v for n, v in eva.items()}
    # the renames equal timm's own converter
    ref_timm = load_file(os.path.join(REF, "eva_tiny.timm.safetensors"))
    model = mf.build_eva()
    conv = eva_checkpoint_filter_fn({"visual." + n: v for n, v in eva.items()}, model)
    assert set(conv) == set(timm_sd) == set(ref_timm)
    for k in timm_sd:
        assert torch.equal(conv[k], timm_sd[k]) and torch.equal(ref_timm[k], timm_sd[k]), k
    model.load_state_dict(timm_sd, strict=True)
    teacher = {k: v.clone() for k, v in timm_sd.items()}  # frozen crop teacher (separate copy)
    vfm = load_file(os.path.join(REF, "dinov2_tiny.meta.safetensors"))

    names = sorted(eva)  # EVA-CLIP names
    trainable = [n for n in names if is_trainable(n)]
    frozen = [n for n in names if not is_trainable(n)]
    P = {}
    for n in names:
        t = eva[n].clone()
        t.requires_grad_(n in trainable)
        P[evaclip_to_timm_name(n)] = t
    params = {n: P[evaclip_to_timm_name(n)] for n in names}
    n_train = sum(params[n].numel() for n in trainable)
    decay = [n for n in trainable if decays(n, params[n])]
    no_decay = [n for n in trainable if not decays(n, params[n])]
    log(f"trainable tensors: {len(trainable)}, trainable parameters: {n_train}")
    log(f"  decay (wd {WD}): {decay}")
    log(f"  no decay: {no_decay}")
    log(f"  frozen: {frozen}")
    report.append(f"trainable parameters {n_train} in {len(trainable)} tensors "
                  f"({len(decay)} with weight decay, {len(no_decay)} without)")
    frozen_before = {n: params[n].detach().clone() for n in frozen}
    teacher_before = {k: v.clone() for k, v in teacher.items()}
    vfm_before = {k: v.clone() for k, v in vfm.items()}

    # ---- teachers (frozen, no grad) --------------------------------------------------------
    student_img = normalise(inp["student_u8"], CLIP_MEAN, CLIP_STD)
    vfm_img = normalise(inp["vfm_u8"], IMAGENET_MEAN, IMAGENET_STD)
    crop_img = normalise(inp["crops_u8"], CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        _, crop_emb, _, _, _, _ = eva_forward(teacher, crop_img, EVA_CFG)
        timm_emb = F.normalize(model(crop_img), dim=-1)
        feats, vgrid = dinov2_forward(vfm, vfm_img)
        assert vgrid == (GRID, GRID)
        fn = F.normalize(feats, dim=-1)
        T = fn @ fn.transpose(1, 2)
        # cross-check the VFM against timm's own forward (same weights, timm layout)
        dc = DINO_CFG
        vit = VisionTransformer(img_size=dc["image_size"], patch_size=dc["patch_size"], embed_dim=dc["width"],
                                depth=dc["depth"], num_heads=dc["heads"], mlp_ratio=4, init_values=1e-5,
                                reg_tokens=4, no_embed_class=True, dynamic_img_size=True, num_classes=0)
        vit.load_state_dict(load_file(os.path.join(REF, "dinov2_tiny.timm.safetensors")), strict=True)
        vit.eval()
        timm_feats = vit.forward_features(vfm_img)[:, 1 + dc["register_tokens"]:]
    e1, e2 = rel_err(crop_emb, timm_emb), rel_err(feats, timm_feats)
    report.append(f"crop teacher (plain forward) vs timm Eva rel err {e1:.3g}; "
                  f"VFM (plain Meta forward, 196) vs timm forward_features rel err {e2:.3g}")
    assert e1 < 1e-5 and e2 < 1e-5, (e1, e2)
    mf.check_not_degenerate("crop_embeddings", crop_emb)
    mf.check_not_degenerate("vfm features", feats)

    # ---- roi_align input format check: per-image lists == the stored [K,5] tensor ---------
    with torch.no_grad():
        cm0, _ = student_forward(P, student_img)
        per_image = [inp["boxes_grid"][inp["boxes_grid"][:, 0] == b, 1:] for b in range(2)]
        assert torch.equal(torchvision.ops._utils.convert_boxes_to_roi_format(per_image), inp["boxes_grid"])
        a = torchvision.ops.roi_align(cm0, per_image, 1, 1.0, -1, True)
        b_ = torchvision.ops.roi_align(cm0, inp["boxes_grid"], 1, 1.0, -1, True)
        assert torch.equal(a, b_)

    # ---- cross-check against the model fixtures (same weights, same 224 input) -----------
    io = load_file(os.path.join(REF, "eva_tiny.io.safetensors"))
    assert torch.equal(io["in.224.u8"], inp["student_u8"])
    with torch.no_grad():
        cm0, ctx0 = student_forward(P, student_img)
    assert torch.equal(cm0, io["224.content_map.qq"]) and torch.equal(ctx0, io["224.context.qq"])
    report.append("step0 content_map / context are bit-identical to eva_tiny.io 224.content_map.qq / 224.context.qq")

    # ---- optimizer --------------------------------------------------------------------------
    groups = [  # open_clip_train order: [no decay, decay]
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
        {"params": [params[n] for n in decay], "weight_decay": WD},
    ]
    opt = torch.optim.AdamW(groups, lr=BASE_LR, betas=BETAS, eps=EPS, foreach=False, fused=False)
    # the schedule as written equals open_clip_train's cosine_lr
    from open_clip_train.scheduler import cosine_lr
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    adj = cosine_lr(probe, BASE_LR, WARMUP, TOTAL_STEPS)
    for s in range(TOTAL_STEPS):
        assert adj(s) == lr_at(s), (s, adj(s), lr_at(s))

    out = {
        "in.student.u8": inp["student_u8"], "in.vfm.u8": inp["vfm_u8"], "in.crops.u8": inp["crops_u8"],
        "norm.clip.mean": torch.tensor(CLIP_MEAN), "norm.clip.std": torch.tensor(CLIP_STD),
        "norm.imagenet.mean": torch.tensor(IMAGENET_MEAN), "norm.imagenet.std": torch.tensor(IMAGENET_STD),
        "boxes.grid": inp["boxes_grid"], "boxes.pixels": inp["boxes_pixels"],
        "boxes.original": inp["boxes_original"],
    }
    lrs, losses = [], []
    for step in range(N_STEPS):
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss, lc, lx, aux = declip_loss(P, student_img, inp["boxes_grid"], crop_emb, T)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0 and lc.item() > 0 and lx.item() > 0, (loss, lc, lx)
        if step == 0:
            out["step0.loss_content"] = lc.detach()
            out["step0.loss_context"] = lx.detach()
            out["step0.loss_total"] = loss.detach()
            out["step0.content_map"] = aux["content_map"].detach()
            out["step0.context"] = aux["context"].detach()
            out["step0.roi_features"] = aux["roi_features"].detach()
            out["step0.crop_embeddings"] = crop_emb
            out["step0.affinity_teacher"] = T
            zero = []
            for n in trainable:
                gr = params[n].grad
                assert gr is not None and torch.isfinite(gr).all(), n
                if not (gr != 0).any():
                    zero.append(n)
                out[f"grad.{n}"] = gr.detach().clone()
            for n in frozen:
                assert params[n].grad is None, n
            report.append(f"trainable tensors with an all-zero gradient at step 0: {zero or 'none'}")
            assert not zero, zero
            report.append(f"step 0: loss_content {lc.item():.9g}, loss_context {lx.item():.9g}, "
                          f"loss_total {loss.item():.9g}")
            out_grad_f32 = {n: params[n].grad.detach().clone() for n in trainable}
        opt.step()
        lrs.append(lr)
        losses.append(loss.item())
        log(f"step {step}: lr {lr!r} loss {loss.item():.9g} (content {lc.item():.9g}, context {lx.item():.9g})")
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    out["loss_total.steps"] = torch.tensor(losses, dtype=torch.float32)
    report.append(f"lr per step {lrs}; loss_total per step {[f'{v:.9g}' for v in losses]}")
    assert losses[2] < losses[0], losses

    for n in trainable:
        assert not torch.equal(params[n].detach(), eva[n]), f"{n} did not change"
        out[f"after3.{n}"] = params[n].detach().clone()
    for n in frozen:
        assert torch.equal(params[n].detach(), frozen_before[n]) and torch.equal(params[n].detach(), eva[n]), n
    for k in teacher:
        assert torch.equal(teacher[k], teacher_before[k]), k
    for k in vfm:
        assert torch.equal(vfm[k], vfm_before[k]), k

    # ---- float64 check of the step-0 gradient (not stored): autograd in f64 vs f32 and a
    # central difference along a random direction ----------------------------------------
    P64 = {}
    for n in names:
        t = eva[n].double().clone()
        t.requires_grad_(n in trainable)
        P64[evaclip_to_timm_name(n)] = t
    args64 = (student_img.double(), inp["boxes_grid"].double(), crop_emb.double(), T.double())
    l64, lc64, lx64, _ = declip_loss(P64, *args64)
    l64.backward()
    report.append(f"step 0 losses in float64 (same f32 teacher targets): content {lc64.item():.12g}, "
                  f"context {lx64.item():.12g}, total {l64.item():.12g}; f32 total rel diff "
                  f"{abs(out['step0.loss_total'].item() - l64.item()) / l64.item():.3g}")
    worst = max((rel_err(out_grad_f32[n].double(), P64[evaclip_to_timm_name(n)].grad), n) for n in trainable)
    report.append(f"step 0 gradient f32 vs f64: worst per-tensor rel err (max|d|/max|g64|) {worst[0]:.3g} ({worst[1]})")
    g = torch.Generator().manual_seed(6006)
    dirs = {n: torch.randn(eva[n].shape, generator=g, dtype=torch.float64) for n in trainable}
    ddot = sum((P64[evaclip_to_timm_name(n)].grad * dirs[n]).sum() for n in trainable).item()
    eps_fd = 1e-6
    with torch.no_grad():
        def shifted(sign):
            Q = {k: v.detach().clone() for k, v in P64.items()}
            for n in trainable:
                Q[evaclip_to_timm_name(n)] += sign * eps_fd * dirs[n]
            return declip_loss(Q, *args64)[0].item()
        fd = (shifted(1) - shifted(-1)) / (2 * eps_fd)
    report.append(f"float64 directional derivative: autograd {ddot:.10g}, central difference {fd:.10g}, "
                  f"rel diff {abs(fd - ddot) / abs(ddot):.3g}")
    assert abs(fd - ddot) / abs(ddot) < 1e-6, (fd, ddot)
    assert worst[0] < 1e-3, worst

    # the same 3 steps in float64 (AdamW on float64 tensors): how far float32 rounding carries
    # through Adam (a guide for the tolerance of an independent implementation; not stored)
    for p in P64.values():
        p.grad = None
    groups64 = [{"params": [P64[evaclip_to_timm_name(n)] for n in no_decay], "weight_decay": 0.0},
                {"params": [P64[evaclip_to_timm_name(n)] for n in decay], "weight_decay": WD}]
    opt64 = torch.optim.AdamW(groups64, lr=BASE_LR, betas=BETAS, eps=EPS, foreach=False, fused=False)
    losses64 = []
    for step in range(N_STEPS):
        for gr in opt64.param_groups:
            gr["lr"] = lr_at(step)
        opt64.zero_grad()
        l = declip_loss(P64, *args64)[0]
        l.backward()
        opt64.step()
        losses64.append(l.item())
    worst3 = max((rel_err(out[f"after3.{n}"].double() - eva[n].double(),
                          P64[evaclip_to_timm_name(n)].detach() - eva[n].double()), n) for n in trainable)
    worst3_abs = max(((out[f"after3.{n}"].double() - P64[evaclip_to_timm_name(n)].detach()).abs().max().item(), n)
                     for n in trainable)
    gmin = min(out[f"grad.{n}"].abs().min().item() for n in trainable)
    report.append(f"float64 run of the 3 steps: losses {[f'{v:.12g}' for v in losses64]}; after3 f32 vs f64: "
                  f"worst per-tensor rel err of the update (after3 - initial) {worst3[0]:.3g} ({worst3[1]}), "
                  f"max abs diff {worst3_abs[0]:.3g} ({worst3_abs[1]}); smallest |grad| element at step 0 {gmin:.3g}")
    assert worst3[0] < 1e-2, worst3

    grid_report = []
    for k in range(K):
        grid_report.append(f"  crop {k}: image {int(inp['boxes_grid'][k, 0])} original "
                           f"{[round(v, 4) for v in inp['boxes_original'][k].tolist()]} pixels "
                           f"{inp['boxes_pixels'][k].tolist()} grid {[round(v, 5) for v in inp['boxes_grid'][k, 1:].tolist()]}")
    report.extend(grid_report)

    config = dict(
        what="one DeCLIP training step on the tiny models, repeated 3 times on the same batch",
        student=dict(weights="fixtures/reference/eva_tiny.evaclip.safetensors", model_config=EVA_CFG,
                     input_size=STUDENT_SIZE, grid=[GRID, GRID], pad="right/bottom", norm="clip",
                     decoupled=dict(mode="qq", scale=None, rope=False, residual=False, mlp=False)),
        crop_teacher=dict(weights="same original EVA weights, separate frozen copy", input_size=CROP_SIZE,
                          pad="centred", norm="clip", output="normalize(head(norm(x)[:, 0]))"),
        vfm=dict(weights="fixtures/reference/dinov2_tiny.meta.safetensors", model_config=DINO_CFG,
                 input_size=VFM_SIZE, grid=[GRID, GRID], pad="right/bottom", norm="imagenet",
                 pos_resize="F.interpolate(37x37 -> 14x14, mode=bicubic, align_corners=False, antialias=True)",
                 output="final norm, CLS + 4 registers dropped"),
        batch=BATCH,
        crops=dict(layouts=[dict(image=BATCH[i], rows=m, cols=n) for i, (m, n) in enumerate(LAYOUTS)],
                   cells="x edges w*j/n, y edges h*i/m (float64), row-major", dropped=[
                       dict(image=b, cell=c, note="last cell of image 1 (0-based row 2, col 1)") for b, c in DROP],
                   count=K, per_image=[int((inp["boxes_grid"][:, 0] == b).sum()) for b in range(2)],
                   teacher_box="python round() (half to even) of each coordinate, PIL Image.crop",
                   grid_box="float32((x * (224 / max(w, h))) * (14 / 224)) computed in float64",
                   roi_align=dict(output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                                  boxes="list of per-image [L,4] tensors (== boxes.grid as [K,5])")),
        loss=dict(content="1 - mean_k (normalize(roi_k) . crop_emb_k) over the 11 crops",
                  context="mean over (b, m) of ||T[b,m,:] - S[b,m,:]||_2, T = FnFn^T, S = QnQn^T, all 196 tokens",
                  w_content=W_CONTENT, w_context=W_CONTEXT),
        trainable=dict(count=n_train, tensors=len(trainable),
                       frozen=frozen, rule="method spec 1.3: all student params except patch_embed.*, cls_token, "
                       "pos_embed, norm.*, head.*, and in the last block attn.k_proj.weight, norm2.*, mlp.*"),
        optimizer=dict(cls="torch.optim.AdamW", foreach=False, fused=False, lr=BASE_LR, betas=list(BETAS),
                       eps=EPS, amsgrad=False, maximize=False,
                       groups=[dict(weight_decay=0.0, names=no_decay), dict(weight_decay=WD, names=decay)],
                       decay_rule="ndim >= 2 and name holds none of bn/ln/bias/logit_scale (EVA-CLIP names)"),
        schedule=dict(name="open_clip cosine_lr", base_lr=BASE_LR, warmup_length=WARMUP, steps=TOTAL_STEPS,
                      formula="step < warmup: base*(step+1)/warmup; else 0.5*(1+cos(pi*(step-warmup)/(steps-warmup)))*base",
                      set_before_each_step=True),
        steps=N_STEPS, step_order="set lr, zero_grad, forward, backward, step",
        dtype="float32", device="cpu", threads=2,
    )
    save(OUT, out, config)
    with open(OUT, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    rep = os.path.join(REF, "train_step.report.txt")
    with open(rep, "w") as f:
        f.write("\n".join(report) + "\n")
    log("\n".join(report))
    log(f"wrote {os.path.relpath(rep, REPO)}; train_step.safetensors sha256 {digest}")


if __name__ == "__main__":
    main()
