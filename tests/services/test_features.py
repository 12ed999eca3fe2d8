"""The Features API over a committed analysis (the ``analysis`` fixture: a real analysis of the test SAE over the
stack's photos): exemplars, tiles, the analysed images, their pixels and strongest latents, a latent's histogram,
over gRPC and HTTP, against the library read in process; and the errors (not analysed, bad latent, no key)."""

from __future__ import annotations

import base64
import io
import json

import grpc
import numpy as np
import pytest

from sae_shared.proto.saev.v1 import features_pb2 as fpb

PNG = b"\x89PNG\r\n\x1a\n"


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    assert data[:8] == PNG
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def reader(analysis):
    from sae_shared.analysis import open_analysis

    return open_analysis(analysis.store, analysis.sae_id)


@pytest.fixture(scope="module")
def latent(reader) -> int:
    """A latent with several exemplars."""
    fired = (reader._table("patch")["rows"] >= 0).sum(1)
    candidates = [i for i in range(reader.d_sae) if fired[i] >= 3]
    assert candidates, "the test SAE should have latents firing on several views"
    return candidates[0]


def _exemplar_fields(e) -> dict:
    return {"image_id": e.image_id, "rank": e.rank, "value": pytest.approx(e.value, rel=1e-6),
            "image_index": e.image_index, "label": e.label,
            "augmentation": json.loads(json.dumps(e.view.to_json())) if e.view is not None else None}


def _grpc_fields(x: fpb.Exemplar) -> dict:
    return {"image_id": x.image_id, "rank": x.rank, "value": x.max_activation, "image_index": x.image_index,
            "label": x.label if x.HasField("label") else None,
            "augmentation": json.loads(x.augmentation_json) if x.augmentation_json else None}


def test_exemplars_over_grpc_equal_the_library_with_tile_keys_and_bytes(running, stubs, analysis, reader, latent):
    from sae_shared.codec import proto_to_tensor
    from sae_shared.tiles import get_tile, tile_cache_key

    md = running.metadata("gateway")
    kinds = reader.kinds
    assert "patch" in kinds
    for kind in kinds:
        if kind != "patch":  # a latent firing on the CLS token of several views
            fired = (reader._table(kind)["rows"] >= 0).sum(1)
            latent = int(fired.argmax())
        expected = reader.exemplars(latent, kind)
        assert len(expected) >= 2
        out = stubs.features.GetLatentExemplars(fpb.GetLatentExemplarsRequest(
            sae_id=analysis.sae_id, latent=latent, kind=kind if kind == "cls" else "", include_heatmaps=True),
            metadata=md, timeout=120)
        assert out.kind == kind and out.latent == latent and out.analysis_id == reader.analysis_id
        assert out.scale == pytest.approx(reader.scale(latent)) and not out.tiles_unavailable
        assert (out.layout.grid_height, out.layout.grid_width) == reader.grid
        assert [_grpc_fields(x) for x in out.exemplars] == [_exemplar_fields(e) for e in expected]
        for x, e in zip(out.exemplars, expected):
            np.testing.assert_array_equal(proto_to_tensor(x.heatmap).numpy(), e.heatmap)
            # default: the tile's own object in the store (rendered on the way), the bytes get_tile serves
            assert x.image.object_key == tile_cache_key(analysis.sae_id, reader.analysis_id, kind, latent, e.rank)
            assert analysis.store.get_bytes(x.image.object_key) == get_tile(analysis.store, analysis.sae_id, latent,
                                                                             e.rank, kind)
    inline = stubs.features.GetLatentExemplars(fpb.GetLatentExemplarsRequest(
        sae_id=analysis.sae_id, latent=latent, limit=2, include_images=True), metadata=md, timeout=120)
    assert [x.rank for x in inline.exemplars] == [0, 1]
    for x in inline.exemplars:
        assert not x.HasField("heatmap")
        assert x.image.encoded == get_tile(analysis.store, analysis.sae_id, latent, x.rank, "patch")


def test_exemplars_and_tiles_over_http(running, http, analysis, reader, latent):
    import httpx

    from sae_shared.tiles import get_tile

    base = f"/v1/saes/{analysis.sae_id}/latents/{latent}/exemplars"
    body = http.get(base, params={"include_heatmaps": "true", "limit": 3}).json()
    expected = reader.exemplars(latent, "patch", limit=3)
    assert body["kind"] == "patch" and len(body["exemplars"]) == len(expected) == 3
    for x, e in zip(body["exemplars"], expected):
        assert (x["image_id"], x["rank"], x["image_index"]) == (e.image_id, e.rank, e.image_index)
        assert x["max_activation"] == pytest.approx(e.value, rel=1e-6)
        heat = np.frombuffer(base64.b64decode(x["heatmap"]["data"]), dtype="<f4").reshape(x["heatmap"]["shape"])
        np.testing.assert_array_equal(heat, e.heatmap)
        assert x["image"]["object_key"].endswith(f"/tiles/patch/{latent}/{e.rank}.png")

    # The tile route: image/png, the bytes of get_tile, with the header or the ?key= of an <img> tag.
    tile = http.get(f"{base}/1/tile.png")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    png = get_tile(analysis.store, analysis.sae_id, latent, 1, "patch")
    assert tile.content == png and _pixels(png).ndim == 3
    url = running.http_url + f"{base}/1/tile.png"
    assert httpx.get(url, params={"key": running.api_key}, timeout=60).content == png
    for params, headers in (({}, {}), ({"key": "wrong"}, {}), ({}, {"authorization": "Bearer wrong"})):
        denied = httpx.get(url, params=params, headers=headers, timeout=60)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "UNAUTHENTICATED"
    # an exemplar the latent does not have
    missing = http.get(f"{base}/{reader.top_k - 1}/tile.png")
    fired = int((reader._table("patch")["rows"][latent] >= 0).sum())
    assert missing.status_code == (200 if fired == reader.top_k else 404)


def test_analysed_images_their_pixels_and_reverse_index(running, stubs, http, analysis, reader):
    from sae_shared.datasets import open_dataset

    images = reader.images()
    listed = http.get(f"/v1/saes/{analysis.sae_id}/images", params={"offset": 1, "limit": 5}).json()
    assert listed["total"] == len(images["image_id"]) == len(running.images)
    assert [(i["image_index"], i["image_id"], i.get("label")) for i in listed["images"]] == list(
        zip(images["image_index"], images["image_id"], images["label"]))[1:6]

    ds = open_dataset(analysis.dataset)
    for index in images["image_index"]:
        png = http.get(f"/v1/saes/{analysis.sae_id}/images/{index}.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(_pixels(png.content), np.asarray(ds.load_image(index).convert("RGB")))
        expected = reader.image_latents(image_index=index)
        body = http.get(f"/v1/saes/{analysis.sae_id}/images/{index}/latents", params={"k": 5}).json()
        assert body["image"]["image_id"] == images["image_id"][images["image_index"].index(index)]
        assert [(x["latent"], pytest.approx(x["value"], rel=1e-3)) for x in body["latents"]] == expected[:5]
        over_grpc = stubs.features.GetAnalysedImageLatents(fpb.GetAnalysedImageLatentsRequest(
            sae_id=analysis.sae_id, image_index=index), metadata=running.metadata("gateway"), timeout=60)
        assert [(x.latent, x.value) for x in over_grpc.latents] == [(i, pytest.approx(v)) for i, v in expected]
    assert http.get(f"/v1/saes/{analysis.sae_id}/images/987654.png").status_code == 404
    assert http.get(f"/v1/saes/{analysis.sae_id}/images/987654/latents").status_code == 404
    assert http.get(running.http_url + f"/v1/saes/{analysis.sae_id}/images/0.png",
                    headers={"authorization": ""}).status_code == 401


def test_latent_histogram(running, http, analysis, reader, latent):
    body = http.get(f"/v1/saes/{analysis.sae_id}/latents/{latent}/histogram", params={"bins": 8}).json()
    maps = np.stack([e.heatmap for e in reader.exemplars(latent)]).ravel()
    assert body["source"] == "exemplar_patches" and len(body["edges"]) == 9 and len(body["counts"]) == 8
    assert int(body["n_values"]) == maps.size and int(body["zeros"]) == int((maps == 0).sum())
    assert sum(int(c) for c in body["counts"]) == int((maps > 0).sum())
    assert body["edges"][-1] == pytest.approx(float(maps.max()), rel=1e-6)
    assert body["max_activation"] == pytest.approx(reader.exemplars(latent, limit=1)[0].value, rel=1e-6)
    assert 0 < body["view_frequency"] <= 1 and body["frequency"] > 0


def test_not_analysed_bad_latent_and_bad_kind(running, stubs, http, analysis, reader):
    md = running.metadata("gateway")
    with pytest.raises(grpc.RpcError) as err:
        stubs.features.GetLatentExemplars(fpb.GetLatentExemplarsRequest(sae_id="never-analysed", latent=0),
                                          metadata=md, timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "saevctl analyze" in err.value.details()
    for path in ("/latents/0/exemplars", "/latents/0/exemplars/0/tile.png", "/images", "/images/0.png",
                 "/images/0/latents", "/latents/0/histogram"):
        r = http.get("/v1/saes/never-analysed" + path)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/json"), path
        assert r.json()["error"]["code"] == "NOT_FOUND" and "saevctl analyze" in r.json()["error"]["message"]

    for request in (fpb.GetLatentExemplarsRequest(sae_id=analysis.sae_id, latent=reader.d_sae),
                    fpb.GetLatentExemplarsRequest(sae_id=analysis.sae_id, latent=-1),
                    fpb.GetLatentExemplarsRequest(sae_id=analysis.sae_id, latent=0, kind="tokens"),
                    # inline tiles are rendered on the spot: a bounded number per request
                    fpb.GetLatentExemplarsRequest(sae_id=analysis.sae_id, latent=0, include_images=True),
                    fpb.GetLatentExemplarsRequest(sae_id=analysis.sae_id, latent=0, include_images=True, limit=65)):
        with pytest.raises(grpc.RpcError) as err:
            stubs.features.GetLatentExemplars(request, metadata=md, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    for path in (f"/latents/{reader.d_sae}/exemplars", f"/latents/{reader.d_sae}/exemplars/0/tile.png",
                 "/latents/-1/exemplars", "/latents/0/exemplars?kind=tokens", f"/latents/{reader.d_sae}/histogram"):
        r = http.get(f"/v1/saes/{analysis.sae_id}{path}")
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT", path
    if "cls" not in reader.kinds:  # the backbone has no CLS token: cls exemplars are refused
        r = http.get(f"/v1/saes/{analysis.sae_id}/latents/0/exemplars", params={"kind": "cls"})
        assert r.status_code == 400 and "CLS" in r.json()["error"]["message"]


def test_new_routes_need_a_key(running, analysis):
    import httpx

    for path in ("/latents/0/exemplars", "/latents/0/histogram", "/images", "/images/0/latents"):
        url = running.http_url + f"/v1/saes/{analysis.sae_id}{path}"
        assert httpx.get(url, timeout=60).status_code == 401
        assert httpx.get(url, params={"key": running.api_key}, timeout=60).status_code == 401  # only the .png routes


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_feature_methods(running, analysis, reader, latent, protocol):
    from sae_shared.client import ClientError, connect
    from sae_shared.tiles import get_tile

    url = f"grpc://{running.grpc_address}" if protocol == "grpc" else running.http_url
    with connect(url, api_key=running.api_key, timeout=120, settings=running.settings) as c:
        out = c.latent_exemplars(analysis.sae_id, latent, limit=2)
        assert [(x.image_id, x.rank) for x in out.exemplars] == [
            (e.image_id, e.rank) for e in reader.exemplars(latent, limit=2)]
        assert c.tile(analysis.sae_id, latent, 1) == get_tile(analysis.store, analysis.sae_id, latent, 1, "patch")
        index = reader.images()["image_index"][0]
        assert c.analysed_image_latents(analysis.sae_id, index, k=3) == [
            (i, pytest.approx(v)) for i, v in reader.image_latents(image_index=index)[:3]]
        assert c.analysed_images(analysis.sae_id).total == len(running.images)
        assert len(c.latent_histogram(analysis.sae_id, latent, bins=4).counts) == 4
        with pytest.raises(ClientError) as err:
            c.latent_exemplars("never-analysed", 0)
        assert err.value.code == "NOT_FOUND"
