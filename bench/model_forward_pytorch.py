"""PyTorch baseline for worker/benches/model_forward.rs: the same towers in timm
(random init), the same inputs and thread count, each case in a fresh process so
its peak RSS is its own. Prints JSON lines like the Rust bench."""
import json
import resource
import subprocess
import sys
import time

CASES = {
    "eva02-b16.encode_dense": ("eva02_base_patch16_clip_224", 560),
    "dinov2-b14-reg.patch_features": ("vit_base_patch14_reg4_dinov2", 490),
}
RUNS = 5


def run_case(name):
    import timm
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_name, side = CASES[name]
    model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    images = torch.randn(1, 3, side, side)
    times = []
    with torch.no_grad():
        model.forward_features(images)  # warm-up
        for _ in range(RUNS):
            start = time.perf_counter()
            model.forward_features(images).sum().item()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "pytorch-timm", "case": name, "input": [1, 3, side, side],
                      "threads": torch.get_num_threads(), "median_ms": round(times[RUNS // 2], 1),
                      "min_ms": round(times[0], 1), "runs": RUNS, "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        run_case(sys.argv[2])
    else:
        for name in CASES:
            subprocess.run([sys.executable, __file__, "--case", name], check=True)
