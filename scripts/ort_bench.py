#!/usr/bin/env python3
"""ONNX Runtime side of the Burn-vs-ONNX-Runtime CNN benchmark.

Times `InferenceSession.run` on the exact input tensor the Rust side prepared; it does no image preprocessing
of its own, so both sides see bit-identical inputs.

    PYTHONPATH=.tools/ort python3 scripts/ort_bench.py \
        --model /work/shared/data/model_plant_mobilenetv3lite/ModifiedV3_converted.onnx \
        --input target/bench/plants_input.f32 --batches 1,32 --threads 2 [--logits-out FILE]

--input is raw little-endian f32 of shape [N,3,224,224] (N is inferred from the file size). For each batch size,
batches are built by cycling through the N images, a few warm-up runs are made, then `session.run` alone is
timed. The last line on stdout is one JSON object:

    {"onnxruntime": "1.x", "threads": 2, "n_images": N,
     "results": [{"batch": 1, "iterations": 50, "p50_ms": .., "p99_ms": .., "mean_ms": .., "images_per_s": ..}, ...]}

images_per_s = batch / mean latency. Percentiles use numpy's linear interpolation, so with few iterations
p99 is close to the slowest run. --logits-out writes the logits of the N images, in input order, as raw
little-endian f32 [N,38]. Install the dependencies with
    python3 -m pip install --target .tools/ort onnxruntime numpy
"""

import argparse
import json
import math
import os
import sys
import time

C, H, W = 3, 224, 224
IMAGE_FLOATS = C * H * W
IMAGE_BYTES = IMAGE_FLOATS * 4


def fail(message):
    print(f"ort_bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def positive_int_list(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ONNX file (input [batch,3,224,224] f32)")
    p.add_argument("--input", required=True, help="raw little-endian f32 [N,3,224,224]")
    p.add_argument("--batches", type=positive_int_list, default=[1, 32], help="e.g. 1,32 (default 1,32)")
    p.add_argument("--iterations", type=int, default=None,
                   help="timed runs per batch size (default max(10, 50 // batch): 50 for batch 1, 10 for 32)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs per batch size before timing (default max(3, iterations // 10))")
    p.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    p.add_argument("--logits-out", default=None, help="write the logits of the N input images here (raw LE f32)")
    p.add_argument("--logits-chunk", type=int, default=32, help="batch size used for --logits-out (default 32)")
    args = p.parse_args()
    if args.iterations is not None and args.iterations <= 0:
        p.error("--iterations must be positive")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads <= 0:
        p.error("--threads must be positive")
    if args.logits_chunk <= 0:
        p.error("--logits-chunk must be positive")
    return args


def load_input(path, np):
    if not os.path.isfile(path):
        fail(f"input file {path!r} does not exist (or is not a file)")
    size = os.path.getsize(path)
    if size == 0 or size % IMAGE_BYTES != 0:
        fail(f"input file {path!r} has {size} bytes, which is not a positive multiple of "
             f"3*224*224*4 = {IMAGE_BYTES} bytes (raw little-endian f32 [N,3,224,224])")
    data = np.fromfile(path, dtype="<f4")
    n = size // IMAGE_BYTES
    data = data.reshape(n, C, H, W).astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        fail(f"input file {path!r} contains NaN or infinite values")
    return data


def make_session(ort, model, threads):
    if not os.path.isfile(model):
        fail(f"model file {model!r} does not exist (or is not a file)")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        fail(f"cannot load model {model!r}: {e}")


def build_batches(images, batch, count, np):
    """Distinct batches obtained by cycling through the images; at most `count` (enough for one full cycle)."""
    n = images.shape[0]
    period = n // math.gcd(n, batch)  # after this many batches the cycle repeats
    batches = []
    for i in range(min(count, period)):
        idx = (i * batch + np.arange(batch)) % n
        batches.append(np.ascontiguousarray(images[idx]))
    return batches


def main():
    args = parse_args()
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        fail(f"{e}; install with `python3 -m pip install --target .tools/ort onnxruntime numpy` "
             f"and run with PYTHONPATH=.tools/ort")

    images = load_input(args.input, np)
    n = images.shape[0]
    session = make_session(ort, args.model, args.threads)
    in_name = session.get_inputs()[0].name
    out_name = session.get_outputs()[0].name

    if args.logits_out:
        chunks = []
        for start in range(0, n, args.logits_chunk):
            chunks.append(session.run([out_name], {in_name: images[start:start + args.logits_chunk]})[0])
        logits = np.concatenate(chunks).astype("<f4")
        logits.tofile(args.logits_out)
        print(f"ort_bench: wrote logits {list(logits.shape)} to {args.logits_out}", file=sys.stderr)

    results = []
    for batch in args.batches:
        iterations = args.iterations if args.iterations is not None else max(10, 50 // batch)
        warmup = args.warmup if args.warmup is not None else max(3, iterations // 10)
        batches = build_batches(images, batch, warmup + iterations, np)
        for i in range(warmup):
            session.run([out_name], {in_name: batches[i % len(batches)]})
        lat_ms = []
        for i in range(iterations):
            x = batches[(warmup + i) % len(batches)]
            t0 = time.perf_counter_ns()
            session.run([out_name], {in_name: x})
            lat_ms.append((time.perf_counter_ns() - t0) / 1e6)
        lat = np.array(lat_ms)
        mean = float(lat.mean())
        r = {
            "batch": batch,
            "iterations": iterations,
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "mean_ms": round(mean, 3),
            "images_per_s": round(batch / (mean / 1000.0), 1),
        }
        print(f"ort_bench: {r}", file=sys.stderr)
        results.append(r)

    print(json.dumps({"onnxruntime": ort.__version__, "threads": args.threads, "n_images": n, "results": results}))


if __name__ == "__main__":
    main()
