"""Load test of the demo's API: start the app in-process on 127.0.0.1, fire N concurrent requests with
gradio_client, print cold start, single-request latency, errors and latency percentiles.

    OMP_NUM_THREADS=1 python bench/demo_load.py [PIPELINE_DIR] --requests 50 --images 8

Latency is what a client sees: from sending the request to holding the answer (queue wait included): the gallery
as URLs of the PNGs, as a browser gets it before fetching them in parallel. `--download` also fetches every PNG
through gradio_client (one after another: on a small CPU that, not the model, then dominates). With
`--concurrency 2` (the app's default) two requests generate at a time and the rest wait in the queue.
"""
from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import app as demo_app  # noqa: E402  (sets GRADIO_ANALYTICS_ENABLED=False, HF_HUB_OFFLINE=1)
import numpy as np  # noqa: E402
from gradio_client import Client  # noqa: E402

IMPORTED = time.perf_counter()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", help="exported pipeline folder (default: the demo's default)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--images", type=int, default=8, help="images per request")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2, help="the app's concurrency limit")
    parser.add_argument("--download", action="store_true", help="also download every image with gradio_client")
    args = parser.parse_args(argv)

    demo = demo_app.Demo(args.pipeline)
    blocks = demo_app.create_demo(demo, concurrency=args.concurrency, max_queue=max(128, 2 * args.requests))
    _, url, _ = demo_app.launch(blocks, port=None, prevent_thread_lock=True, quiet=True)
    ready = time.perf_counter()
    client = Client(url, verbose=False, download_files=args.download)
    label = ["all"] if demo.caps.num_classes else []

    def request(seed: int):
        start = time.perf_counter()
        try:
            gallery, latency, *_ = client.predict(*label, seed, args.images, args.steps,
                                                  *([False] if demo.caps.hal_filter else []),
                                                  *([False] if demo.caps.teacher else []), api_name="/generate")
            ok = len(gallery) == args.images
        except Exception as err:  # counted and shown, the bench goes on
            print(f"request {seed}: {type(err).__name__}: {err}", file=sys.stderr)
            ok, latency = False, ""
        return ok, time.perf_counter() - start, latency

    warm = [request(seed) for seed in range(5)]
    with ThreadPoolExecutor(args.requests) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(request, range(100, 100 + args.requests)))
        wall = time.perf_counter() - t0
    client.close()
    blocks.close()

    seconds = np.array([s for ok, s, _ in results if ok])
    errors = sum(not ok for ok, _, _ in results)
    p50, p90, p99 = (np.percentile(seconds, q) if len(seconds) else float("nan") for q in (50, 90, 99))
    print(f"pipeline {demo.pipeline_dir} ({args.images} image(s)/request, {args.steps} step(s), "
          f"concurrency limit {args.concurrency}, images {'downloaded' if args.download else 'as URLs'})")
    print(f"cold start: {ready - START:.1f} s to serving (imports {IMPORTED - START:.1f} s, load + launch "
          f"{ready - IMPORTED:.1f} s)")
    print(f"one request at a time: {1000 * np.median([s for _, s, _ in warm[1:]]):.0f} ms median round trip; "
          f"server: {warm[-1][2].split('**')[1] if '**' in warm[-1][2] else '?'}")
    print(f"{args.requests} concurrent requests: {errors} errors, latency p50 {p50:.2f} s, p90 {p90:.2f} s, "
          f"p99 {p99:.2f} s, max {seconds.max():.2f} s; {args.requests / wall:.1f} requests/s "
          f"({args.requests * args.images / wall:.0f} images/s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
