"""SAE kernels on this CPU against the dense matmul limit and against the peers, in one run.

Shapes d=384/d_sae=6144 and d=768/d_sae=12288, ``--tokens`` tokens per call (default 2048). Figures:

- fp32 ReLU + L1 training step (``Trainer.step``: forward, backward, parallel-gradient removal, Adam, decoder
  renormalisation, dead-latent counters) against the dense limit, 12·d·d_sae FLOPs per token at the fp32 matmul
  rate timed beside it, and against saev 0.1.0's ``SparseAutoencoder`` and overcomplete 0.3.0's ``SAE``;
- fp32 TopK (k=32) training step against eai-sparsify 1.3.3's ``SparseCoder`` (Adam) and overcomplete's
  ``TopKSAE``;
- fp32 encode against its limit (2·d·d_sae FLOPs per token) and the peers' encoders;
- the same steps and encodes under bf16 autocast against the peers under bf16 autocast;
- sparse decode (k=32, ``SparseCodes``) against dense decode of the same codes.

Every peer runs its own training loop's step (saev: its forward/loss, ``remove_parallel_grads``, fused Adam,
``normalize_w_dec``; sparsify: ``forward``, ``fvu`` loss, ``remove_gradient_parallel_to_decoder_directions``, Adam,
``set_decoder_norm_to_unit_norm``, fired-latent counters; overcomplete: its ``train_sae`` loop body, with ``mse_l1``
for ``SAE`` and plain MSE for ``TopKSAE``, clip 1.0, its dead-code tracker).

The peers live in their own venv (``bench/envs/peers.txt``); run this file with that venv's python. Without them it
still reports our figures against the limits and says why each peer is missing.

This machine's matmul rate swings within seconds, so every repetition times each case right after a matmul of the
case's own shape, the cases run in a fresh random order in each repetition, and the table gives medians of
per-repetition ratios (ours against the limit timed beside it; peer time over ours measured in the same
repetition).

    .venv/bin/python -m venv /tmp/bench-peers-venv   # the project venv's Python (3.11): the .pth below adds its packages
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/bench-peers-venv/lib/python3.11/site-packages/zz-project.pth
    /tmp/bench-peers-venv/bin/pip install --no-deps -r bench/envs/peers.txt
    /tmp/bench-peers-venv/bin/python bench/sae.py [--reps 5] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import random
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU run: its eager embedding_bag decoder

import torch  # noqa: E402

K = 32
PEER_ERRORS: dict[str, str] = {}


def _bare_package(name: str) -> None:
    """Make ``name`` importable as an empty package, so its SAE module loads without its ``__init__`` (sparsify's
    imports its trainer, which needs ``datasets``; overcomplete's imports its vision models and plots)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not installed")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules[name] = pkg


def load_peers() -> dict[str, object]:
    peers: dict[str, object] = {}
    for name, load in (
        ("saev", lambda: importlib.import_module("saev.nn")),
        ("sparsify", lambda: (_bare_package("sparsify"), importlib.import_module("sparsify.sparse_coder"))[1]),
        ("overcomplete", lambda: (_bare_package("overcomplete"), importlib.import_module("overcomplete.sae"))[1]),
    ):
        try:
            peers[name] = load()
        except Exception as exc:  # noqa: BLE001 - report exactly why a peer is missing
            PEER_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    return peers


# --------------------------------------------------------------------------------------------------------------
# Cases: a step closure (state built once), what it is compared with
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    group: str  # cases of a group are compared with each other (ours first)
    ours: bool
    limit_flops_per_token: float = 0.0  # 0: no limit row
    bf16: bool = False
    times: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def our_cases(d: int, s: int, n: int, x: torch.Tensor) -> list[Case]:
    from sae_shared.sae import Relu, SAEConfig, SparseCodes, TopK, TrainConfig, Trainer

    cases = []
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        for variant, group in ((Relu(), "relu step"), (TopK(k=K), "topk step")):
            cfg = TrainConfig(members=SAEConfig(d, s, variant), batch_size=n, warmup_steps=10, log_every=10**9,
                              autocast=tag)
            trainer = Trainer(cfg, total_steps=10**9, init_sample_nd=x)
            cases.append(Case(f"ours {group} {tag}", lambda t=trainer: t.step(x), f"{group} {tag}", True,
                              12 * d * s if not bf16 else 0.0, bf16))
        sae = trainer.saes[0]  # the TopK one: its encoder is the same matmul as ReLU's
        relu = Trainer(TrainConfig(members=SAEConfig(d, s, Relu()), batch_size=n), total_steps=1,
                       init_sample_nd=x).saes[0].eval()

        def enc_relu(m=relu, b=bf16):
            with torch.no_grad(), _autocast(b):
                return m.encode(x)

        def enc_topk(m=sae.eval(), b=bf16):
            with torch.no_grad(), _autocast(b):
                return m.encode_sparse(x)

        cases.append(Case(f"ours encode relu {tag}", enc_relu, f"encode {tag}", True, 2 * d * s if not bf16 else 0, bf16))
        cases.append(Case(f"ours encode topk {tag}", enc_topk, f"encode topk {tag}", True,
                          2 * d * s if not bf16 else 0, bf16))
    with torch.no_grad():
        codes = sae.encode_sparse(x)
        dense = torch.zeros(n, s).scatter_(1, codes.indices, codes.values)
    cases.append(Case("ours decode dense", lambda: sae.decode(dense), "decode", True, 2 * d * s))
    cases.append(Case(f"ours decode sparse k={K}", lambda: sae.decode(SparseCodes(codes.indices, codes.values)),
                      "decode", True))
    return cases


def peer_cases(peers: dict[str, object], d: int, s: int, n: int, x: torch.Tensor) -> list[Case]:
    cases: list[Case] = []
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        if "saev" in peers:
            nn_mod = peers["saev"]
            cfg = nn_mod.config.SparseAutoencoder(d_vit=d, exp_factor=s // d, sparsity_coeff=4e-4, n_reinit_samples=0)
            sae = nn_mod.SparseAutoencoder(cfg)
            opt = torch.optim.Adam(sae.parameters(), lr=4e-4, fused=True)

            def saev_step(sae=sae, opt=opt, b=bf16):
                with _autocast(b):
                    _, _, loss = sae(x)
                loss.loss.backward()
                sae.remove_parallel_grads()
                opt.step()
                opt.zero_grad()
                sae.normalize_w_dec()

            def saev_encode(sae=sae, b=bf16):  # the encoder half of its forward (it has no encode method)
                with torch.no_grad(), _autocast(b):
                    return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)

            cases.append(Case(f"saev relu step {tag}", saev_step, f"relu step {tag}", False, bf16=bf16))
            cases.append(Case(f"saev encode {tag}", saev_encode, f"encode {tag}", False, bf16=bf16))
        if "sparsify" in peers:
            sp = peers["sparsify"]
            coder = sp.SparseCoder(d, sp.SparseCoderConfig(num_latents=s, k=K), device="cpu", dtype=torch.float32)
            opt = torch.optim.Adam(coder.parameters(), lr=4e-4)
            since_fired = torch.zeros(s, dtype=torch.long)

            def sparsify_step(c=coder, opt=opt, since=since_fired, b=bf16):
                c.set_decoder_norm_to_unit_norm()
                with _autocast(b):
                    out = c(x)
                out.fvu.backward()
                c.remove_gradient_parallel_to_decoder_directions()
                opt.step()
                opt.zero_grad()
                did_fire = torch.zeros(s, dtype=torch.bool)
                did_fire[out.latent_indices.flatten()] = True
                since.add_(n)
                since[did_fire] = 0

            def sparsify_encode(c=coder, b=bf16):
                with torch.no_grad(), _autocast(b):
                    return c.encode(x)

            cases.append(Case(f"sparsify topk step {tag}", sparsify_step, f"topk step {tag}", False, bf16=bf16))
            cases.append(Case(f"sparsify encode {tag}", sparsify_encode, f"encode topk {tag}", False, bf16=bf16))
        if "overcomplete" in peers:
            oc = peers["overcomplete"]
            from overcomplete.sae.losses import mse_l1  # noqa: PLC0415 - only with the peers installed
            from overcomplete.sae.trackers import DeadCodeTracker  # noqa: PLC0415

            def plain_mse(x_, x_hat, pre, z, dictionary):
                return (x_ - x_hat).square().mean()

            for cls, group, criterion in ((oc.SAE, "relu step", mse_l1), (oc.TopKSAE, "topk step", plain_mse)):
                kwargs = {"top_k": K} if cls is oc.TopKSAE else {}
                model = cls(d, s, device="cpu", **kwargs)
                opt = torch.optim.Adam(model.parameters(), lr=4e-4)
                tracker = DeadCodeTracker(s, "cpu")

                def oc_step(m=model, opt=opt, crit=criterion, tr=tracker, b=bf16):
                    opt.zero_grad()
                    with _autocast(b):
                        z_pre, z, x_hat = m(x)
                        loss = crit(x, x_hat, z_pre, z, m.get_dictionary())
                    tr.update(z)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                    opt.step()

                def oc_encode(m=model, b=bf16):
                    with torch.no_grad(), _autocast(b):
                        return m.encode(x)

                kind = "topk" if cls is oc.TopKSAE else "sae"
                cases.append(Case(f"overcomplete {kind} step {tag}", oc_step, f"{group} {tag}", False, bf16=bf16))
                cases.append(Case(f"overcomplete {kind} encode {tag}", oc_encode,
                                  f"encode{' topk' if kind == 'topk' else ''} {tag}", False, bf16=bf16))
    return cases


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def run_shape(d: int, s: int, n: int, reps: int, peers: dict[str, object]) -> list[Case]:
    torch.manual_seed(0)
    x = torch.randn(n, d) * 1.5 + 0.3
    cases = our_cases(d, s, n, x) + peer_cases(peers, d, s, n, x)
    a32, b32 = torch.randn(n, d), torch.randn(d, s)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    for c in cases:  # warm up: first calls allocate, import and initialise optimiser states
        c.fn()
        c.fn()
    for rep in range(reps):
        order = cases[:]
        random.Random(rep).shuffle(order)
        for c in order:
            a, b = (a16, b16) if c.bf16 else (a32, b32)
            t0 = time.perf_counter()
            a @ b
            rate = 2 * n * d * s / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.fn()
            c.times.append(time.perf_counter() - t0)
            c.rates.append(rate)
        print(f"  d={d} s={s}: repetition {rep + 1}/{reps} done", flush=True)
    return cases


def report(d: int, s: int, n: int, cases: list[Case]) -> None:
    print(f"\n### d={d}, d_sae={s}, {n} tokens per call\n")
    print("| case | median ms | M tok/s | vs limit (median) | vs ours (median peer/ours) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    for group, members in groups.items():
        ours = [c for c in members if c.ours]
        for c in members:
            med = statistics.median(c.times)
            vs_limit = "-"
            if c.limit_flops_per_token:
                vs_limit = f"{statistics.median(c.limit_flops_per_token * n / r / t for r, t in zip(c.rates, c.times)):.2f}"
            vs_ours = "-"
            if not c.ours and ours:
                ref = ours[0]
                vs_ours = f"{statistics.median(t / o for t, o in zip(c.times, ref.times)):.2f}x ({ref.name})"
            print(f"| {c.name} | {med * 1e3:.1f} | {n / med / 1e6:.3f} | {vs_limit} | {vs_ours} |")
    dense = next(c for c in cases if c.name == "ours decode dense")
    sparse = next(c for c in cases if c.name.startswith("ours decode sparse"))
    speed = statistics.median(a / b for a, b in zip(dense.times, sparse.times))
    print(f"\nsparse decode k={K} vs dense decode: {speed:.1f}x faster (median of per-repetition ratios)")
    rates = [r for c in cases if not c.bf16 for r in c.rates]
    rates16 = [r for c in cases if c.bf16 for r in c.rates]
    print(f"fp32 matmul rate beside the cases: median {statistics.median(rates) / 1e9:.0f} GFLOP/s "
          f"(min {min(rates) / 1e9:.0f}, max {max(rates) / 1e9:.0f}); bf16: median "
          f"{statistics.median(rates16) / 1e9:.0f} GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (default 2048)")
    p.add_argument("--shapes", default="384x6144,768x12288", help="d x d_sae pairs, comma-separated")
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    peers = load_peers()
    versions = {}
    for dist in ("saev", "eai-sparsify", "overcomplete"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = "not installed"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peers: {versions}")
    for name, err in PEER_ERRORS.items():
        print(f"peer {name} unavailable: {err}")
    for shape in args.shapes.split(","):
        d, s = (int(v) for v in shape.lower().split("x"))
        cases = run_shape(d, s, args.tokens, args.reps, peers)
        report(d, s, args.tokens, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
