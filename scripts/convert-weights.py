#!/usr/bin/env python3
"""Convert a downloaded PyTorch checkpoint (.pt / .pth / .bin, pickled or
TorchScript) into the safetensors file the project loads.

The project itself reads safetensors only (no pickle, no Python at run time);
run this once, wherever you have PyTorch:

    python3 scripts/convert-weights.py EVA02_CLIP_B_psz16_s8B.pt eva02_clip_b16.safetensors
    python3 scripts/convert-weights.py dinov2_vitb14_reg4_pretrain.pth dinov2_vitb14_reg4.safetensors
    python3 scripts/convert-weights.py ViT-B-16.pt openai_vit_b16.safetensors     # OpenAI TorchScript

Key names are kept as they are (the loader knows the EVA-CLIP, open_clip, Meta and
timm layouts); only wrappers are removed: a nested `state_dict` / `model` / `module`
entry and a `module.` prefix left by DistributedDataParallel.
"""
import argparse
import sys


def load_state_dict(path):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as pickle_error:  # OpenAI's checkpoints are TorchScript archives
        try:
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise SystemExit(f"{path}: neither a state dict nor a TorchScript archive: {pickle_error}")
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {}
    for name, value in obj.items():
        if not hasattr(value, "detach"):
            continue  # counters, configs
        name = name[len("module."):] if name.startswith("module.") else name
        tensors[name] = value.detach().contiguous()
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the downloaded .pt/.pth/.bin file")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--float32", action="store_true", help="store every float tensor as float32")
    args = parser.parse_args()

    from safetensors.torch import save_file
    import torch

    tensors = load_state_dict(args.checkpoint)
    if args.float32:
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    # safetensors refuses tensors that share storage; clone them apart.
    tensors = {k: v.clone() for k, v in tensors.items()}
    save_file(tensors, args.output, metadata={"source": args.checkpoint})
    total = sum(v.numel() for v in tensors.values())
    print(f"wrote {args.output}: {len(tensors)} tensors, {total:,} values", file=sys.stderr)


if __name__ == "__main__":
    main()
