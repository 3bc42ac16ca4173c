"""PyTorch's side of bench/gpu.sh: the cloud model's architecture on the GPU, fp32, timed per call
(inputs to the GPU, the model, outputs back). Prints one JSON object."""

import argparse
import json
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    # models/digits-cloud.onnx: pixels [N, 64] -> 1x8x8 -> conv 32 -> conv 64 -> maxpool -> dense.
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(1024, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
        torch.nn.Softmax(dim=-1),
    ).to(device).eval()
    pixels = torch.rand(args.batch, 64).pin_memory()

    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iterations):
            start = time.perf_counter()
            model(pixels.to(device, non_blocking=True)).cpu()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({
        "runtime": f"pytorch {torch.__version__}",
        "device": torch.cuda.get_device_name(device),
        "batch": args.batch,
        "p50_us": times[len(times) // 2] * 1e6,
    }))


if __name__ == "__main__":
    main()
