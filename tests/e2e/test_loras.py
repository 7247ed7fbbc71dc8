"""Per-request LoRAs through Ray Serve for real: upload, a 3-image job with the LoRA and one
without side by side, the SDXL replica's resident adapters in /readyz."""

from __future__ import annotations

import asyncio
import hashlib
from uuid import uuid4

import httpx
import numpy as np
import pytest

from ourvidz_serve.pipelines.lora import random_sdxl_lora
from tests.e2e.test_serve_lifecycle import finished, png_pixels, submit
from tests.inprocess import TinyRunners

pytestmark = pytest.mark.e2e


async def test_a_lora_uploaded_to_the_service_changes_its_jobs_images_and_no_other(
    http: httpx.AsyncClient, tiny_runners: TinyRunners
):
    # The service's tiny SDXL has the same architecture as the test's: the LoRA fits it.
    data = random_sdxl_lora(tiny_runners.sdxl.pipe, rank=4, seed=24, naming="kohya")
    name = f"e2e-{uuid4().hex[:8]}"
    uploaded = await http.post(
        "/v1/loras",
        data={"name": name},
        files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
    )
    assert uploaded.status_code == 201, uploaded.text
    digest = hashlib.sha256(data).hexdigest()
    assert uploaded.json()["digest"] == digest

    seed = 24_000
    with_lora, without = await asyncio.gather(
        submit(
            http,
            job_type="sdxl_image_fast",
            num_images=3,
            seed=seed,
            loras=[{"name": name, "scale": 1.0}],
        ),
        submit(http, job_type="sdxl_image_fast", num_images=3, seed=seed),
    )
    with_lora, without = await asyncio.gather(
        finished(http, with_lora["id"]), finished(http, without["id"])
    )
    assert (with_lora["status"], without["status"]) == ("completed", "completed"), with_lora
    assert with_lora["metadata"]["loras"] == [{"name": name, "scale": 1.0, "digest": digest}]
    assert "loras" not in without["metadata"]
    # Different adapters never share a call: each job ran its own.
    assert with_lora["metadata"]["pipeline_batch_images"] == 3
    for lora_asset, plain_asset in zip(with_lora["assets"], without["assets"], strict=True):
        assert lora_asset["seed"] == plain_asset["seed"]
        lora_image = png_pixels((await http.get(lora_asset["url"])).content)
        plain_image = png_pixels((await http.get(plain_asset["url"])).content)
        assert int(np.abs(lora_image - plain_image).max()) > 2

    # /readyz asks one SDXL replica; the session's service may have scaled to two, and only the
    # one that ran the job holds the LoRA: ask until an answer comes from that one.
    answers = []
    for _ in range(40):
        ready = (await http.get("/readyz")).json()
        answers.append(ready["checks"]["models"]["sdxl"]["loras"])
        if {"digest": digest, "name": name} in answers[-1]["resident"]:
            break
        await asyncio.sleep(0.25)
    else:
        raise AssertionError(f"no SDXL replica's /readyz answer lists the LoRA: {answers[-3:]}")
    assert answers[-1]["loads"] >= 1 and answers[-1]["activations"] >= 1
