"""The GPU memory plan: weights counted on the meta device, activation formulas, placement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from ourvidz_serve.pipelines import memory_plan as mp
from ourvidz_serve.pipelines import qwen, sdxl, wan
from ourvidz_serve.settings import Settings

REPO = Path(__file__).resolve().parents[2]
META = torch.device("meta")
GIB = mp.GIB


def components(deployment: str, tiny: bool = False) -> dict[str, mp.ComponentWeights]:
    return {c.name: c for c in mp.model_weights(deployment, tiny)}


# --- Weights ---------------------------------------------------------------------------------


def test_sdxl_weights_are_the_published_parameter_counts_in_float16():
    parts = components(mp.SDXL)
    assert parts["unet"].parameters == pytest.approx(2.567e9, rel=1e-3)
    assert parts["vae"].parameters == pytest.approx(83.65e6, rel=1e-3)
    assert parts["text_encoder"].parameters == pytest.approx(123.06e6, rel=1e-3)  # CLIP ViT-L
    assert parts["text_encoder_2"].parameters == pytest.approx(694.66e6, rel=1e-3)  # bigG
    for part in parts.values():
        assert part.dtypes[0] == "float16"
        assert part.nbytes == pytest.approx(2 * part.parameters, rel=1e-5)  # + position ids
    assert sum(p.nbytes for p in parts.values()) == pytest.approx(6.94e9, rel=2e-3)


def test_wan_weights_keep_the_vae_and_the_fp32_modules_in_float32():
    parts = components(mp.WAN)
    transformer = parts["transformer"]
    # Everything in the 1.3B transformer: blocks, embedders, head, modulation tables.
    assert transformer.parameters == pytest.approx(1.419e9, rel=1e-3)
    assert transformer.dtypes[0] == "bfloat16" and "float32" in transformer.dtypes
    assert 2 * transformer.parameters < transformer.nbytes < 2.02 * transformer.parameters
    assert parts["text_encoder"].parameters == pytest.approx(5.681e9, rel=1e-3)  # UMT5-XXL enc.
    assert parts["text_encoder"].nbytes == 2 * parts["text_encoder"].parameters
    assert parts["vae"].dtypes == ("float32",)
    assert parts["vae"].nbytes == pytest.approx(4 * 126.9e6, rel=1e-3)


def test_qwen_weights_are_15_2_gb_in_bfloat16():
    [model] = mp.model_weights(mp.ENHANCER)
    assert model.parameters == pytest.approx(7.616e9, rel=1e-3)  # Qwen's card: 7.61 B
    assert model.nbytes == pytest.approx(15.23e9, rel=1e-3)


def test_tiny_models_weigh_almost_nothing():
    for deployment in mp.MODEL_DEPLOYMENTS:
        assert 0 < sum(c.nbytes for c in mp.model_weights(deployment, True)) < 64 << 20


# --- Activation formulas ----------------------------------------------------------------------


def sdxl_act(batch: int, size: int, **kwargs) -> mp.Activations:
    return mp.sdxl_activation_bytes(
        sdxl.SDXL_UNET_CONFIG, sdxl.SDXL_VAE_CONFIG, batch, size, size, **kwargs
    )


def wan_act(width: int, height: int, frames: int, **kwargs) -> mp.Activations:
    return mp.wan_activation_bytes(
        wan.WAN_TRANSFORMER_CONFIG, wan.WAN_VAE_CONFIG, width, height, frames, **kwargs
    )


def test_activations_grow_with_batch_resolution_frames_and_tokens():
    assert sdxl_act(6, 1024).phases["UNet step"] > sdxl_act(1, 1024).phases["UNet step"]
    assert sdxl_act(1, 1024).peak_bytes > sdxl_act(1, 512).peak_bytes
    assert sdxl_act(6, 1024, vae_slicing=False).peak_bytes > sdxl_act(6, 1024).peak_bytes
    assert wan_act(832, 480, 121).peak_bytes > wan_act(832, 480, 81).peak_bytes
    assert wan_act(832, 480, 81).peak_bytes > wan_act(416, 240, 81).peak_bytes
    assert wan_act(832, 480, 81, vae_tiling=True).peak_bytes < wan_act(832, 480, 81).peak_bytes
    assert wan_act(832, 480, 81, step_cache=True).peak_bytes > wan_act(832, 480, 81).peak_bytes
    small = mp.qwen_activation_bytes(qwen.QWEN25_7B_CONFIG, 1, 256, 256)
    big = mp.qwen_activation_bytes(qwen.QWEN25_7B_CONFIG, 8, 256, 256)
    longer = mp.qwen_activation_bytes(qwen.QWEN25_7B_CONFIG, 8, 1024, 256)
    assert small.peak_bytes < big.peak_bytes < longer.peak_bytes


def test_the_documented_figures_of_the_full_size_plan():
    # SDXL, 6 images at 1024²: the float32 VAE decode (one image at a time) is the peak.
    six = sdxl_act(6, 1024, vae_parameters=components(mp.SDXL)["vae"].parameters)
    assert six.peak_phase == "VAE decode"
    assert six.phases["UNet step"] == pytest.approx(1.64 * GIB, rel=0.01)
    assert six.peak_bytes == pytest.approx(3.38 * GIB, rel=0.01)
    # WAN, 81 frames at 832x480: 32,760 tokens; the untiled VAE decode dominates.
    video = wan_act(832, 480, 81)
    assert "32760 tokens" in video.assumptions
    assert video.phases["transformer step"] == pytest.approx(1.66 * GIB, rel=0.01)
    assert video.peak_bytes == pytest.approx(7.79 * GIB, rel=0.01)  # traced: 7.61
    assert wan_act(832, 480, 81, vae_tiling=True).peak_bytes == pytest.approx(2.22 * GIB, rel=0.01)
    # Qwen, 8 x (1024 + 256) tokens: 56 KiB of KV cache per token.
    enhance = mp.qwen_activation_bytes(qwen.QWEN25_7B_CONFIG, 8, 1024, 256)
    assert enhance.peak_phase == "prefill"
    assert enhance.phases["KV cache at the last token"] > 8 * 1280 * 57344
    assert enhance.peak_bytes == pytest.approx(1.53 * GIB, rel=0.01)


def within(formula: int, traced: int) -> bool:
    """The formula never under-plans by more than 5 % and over-plans by at most 30 %."""
    return 0.95 * traced <= formula <= 1.3 * traced


@pytest.fixture(scope="module")
def sdxl_meta():
    return sdxl.build_random_sdxl_pipeline(sdxl.SDXL_BASE_CONFIGS, META, torch.float16)


def test_sdxl_formulas_match_a_meta_trace_of_the_real_modules(sdxl_meta):
    batch, size = 2, 512  # one image with CFG, at a quarter of the pixels
    latent = size // 8
    with mp.traced_peak() as unet:
        sdxl_meta.unet(
            torch.empty(batch, 4, latent, latent, device=META, dtype=torch.float16),
            torch.tensor(500.0, device=META),
            encoder_hidden_states=torch.empty(batch, 77, 2048, device=META, dtype=torch.float16),
            added_cond_kwargs={
                "text_embeds": torch.empty(batch, 1280, device=META, dtype=torch.float16),
                "time_ids": torch.empty(batch, 6, device=META, dtype=torch.float16),
            },
        )
    vae = sdxl_meta.vae.to(torch.float32)
    with mp.traced_peak() as decode:
        vae.decode(torch.empty(1, 4, latent, latent, device=META))
    formula = sdxl_act(1, size)
    assert within(formula.phases["UNet step"], unet.peak_bytes)
    assert within(formula.phases["VAE decode"], decode.peak_bytes)


@pytest.fixture(scope="module")
def wan_meta():
    return wan.build_random_wan_pipeline(wan.WAN_1_3B_CONFIGS, META, torch.bfloat16, torch.float32)


def test_wan_formulas_match_a_meta_trace_of_the_real_modules(wan_meta):
    width, height, frames = 416, 240, 21
    latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    with mp.traced_peak() as step:
        wan_meta.transformer(
            hidden_states=torch.empty(latent, device=META, dtype=torch.bfloat16),
            timestep=torch.tensor([500], device=META),
            encoder_hidden_states=torch.empty(1, 512, 4096, device=META, dtype=torch.bfloat16),
            return_dict=False,
        )
    with mp.traced_peak() as decode:
        wan_meta.vae.decode(torch.empty(latent, device=META), return_dict=False)
    formula = wan_act(width, height, frames)
    assert within(formula.phases["transformer step"], step.peak_bytes)
    assert within(formula.phases["VAE decode"], decode.peak_bytes)


def test_qwen_formula_matches_a_meta_trace_of_the_real_model():
    model, _ = qwen.build_random_qwen(qwen.QWEN25_7B_CONFIG, META, torch.bfloat16)
    batch, tokens = 4, 256
    with mp.traced_peak() as prefill:
        model(
            input_ids=torch.zeros(batch, tokens, dtype=torch.long, device=META),
            use_cache=True,
            logits_to_keep=1,
        )
    formula = mp.qwen_activation_bytes(qwen.QWEN25_7B_CONFIG, batch, tokens, 0)
    assert within(formula.phases["prefill"], prefill.peak_bytes)


def test_the_enhancer_batch_is_the_deployments_batch():
    source = (REPO / "ourvidz_serve" / "deployments" / "models.py").read_text()
    assert re.findall(r"max_batch_size=(\d+)", source) == [str(mp.ENHANCER_BATCH)]


# --- Profiles and placement -----------------------------------------------------------------


def profile_yaml(fractions: dict[str, float], **args) -> dict:
    deployments = [
        {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
        {
            "name": "SDXL",
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
            "ray_actor_options": {"num_gpus": fractions["SDXL"]},
        },
        {"name": "WAN", "num_replicas": 1, "ray_actor_options": {"num_gpus": fractions["WAN"]}},
        {
            "name": "Enhancer",
            "num_replicas": 1,
            "ray_actor_options": {"num_gpus": fractions["Enhancer"]},
        },
    ]
    return {
        "applications": [
            {
                "name": "ourvidz",
                "import_path": "ourvidz_serve.deployments.app:build_app",
                "args": {"model_profile": "weights", **args},
                "deployments": deployments,
            }
        ]
    }


ONE_GPU = {"SDXL": 0.26, "WAN": 0.37, "Enhancer": 0.37}
ADA_LORAS = {"sdxl_lora_max_rank": 64, "sdxl_max_loras_per_job": 2}


def test_a_profile_that_fits_one_gpu_is_planned_on_one_gpu():
    spec = mp.parse_profile(
        profile_yaml(ONE_GPU, gpu_memory_gib=47.5, vae_tiling=True, **ADA_LORAS)
    )
    plan = mp.plan_profile(spec)
    assert plan.fits, plan.problems
    [gpu] = plan.gpus
    assert gpu.replicas == ["SDXL#1", "WAN#1", "Enhancer#1"]
    assert gpu.fraction == pytest.approx(1.0)
    needs = {d.spec.name: d.need for d in plan.deployments if d.need is not None}
    assert gpu.used_bytes == sum(n.total_bytes for n in needs.values())
    assert {d.spec.name: d.on_gpu for d in plan.deployments} == {
        "Ingress": False,
        "SDXL": True,
        "WAN": True,
        "Enhancer": True,
    }
    # Scaled to 3 SDXL replicas, the two extra ones share a second GPU.
    assert [g.replicas for g in plan.gpus_at_max] == [
        ["SDXL#1", "WAN#1", "Enhancer#1"],
        ["SDXL#2", "SDXL#3"],
    ]


def test_an_over_full_profile_names_each_problem():
    spec = mp.parse_profile(profile_yaml(ONE_GPU, gpu_memory_gib=40))  # and WAN untiled
    plan = mp.plan_profile(spec)
    assert not plan.fits
    text = "\n".join(plan.problems)
    assert "WAN: a replica needs 23.2 GiB, its share is 0.37 x GPU = 14.8 GiB" in text
    assert "GPU 0: " in text and "> 40.0 GiB" in text
    # The option overrides the profile's figure.
    assert mp.plan_profile(spec, gpu_memory_gib=200).fits


def test_replica_needs_are_context_weights_activations_and_margin():
    need = mp.replica_need(mp.WAN, Settings(model_profile="weights"))
    assert need.total_bytes == (
        mp.CUDA_CONTEXT_BYTES + need.weight_bytes + need.activation_bytes + need.margin_bytes
    )
    assert need.margin_bytes == pytest.approx(0.1 * need.activation_bytes, abs=1)
    assert need.weight_bytes == sum(c.nbytes for c in mp.model_weights(mp.WAN))
    tiny = mp.replica_need(mp.WAN, Settings(model_profile="tiny"))
    assert tiny.total_bytes < mp.CUDA_CONTEXT_BYTES + (64 << 20)
    # full-random and weights are the same architectures.
    random = mp.replica_need(mp.SDXL, Settings(model_profile="full-random"))
    assert (
        random.total_bytes
        == mp.replica_need(mp.SDXL, Settings(model_profile="weights")).total_bytes
    )


def test_an_sdxl_ip_adapter_adds_its_files():
    base = mp.replica_need(mp.SDXL, Settings(model_profile="weights"))
    with_adapter = mp.replica_need(
        mp.SDXL, Settings(model_profile="weights", sdxl_ip_adapter="/nonexistent/ip-adapter")
    )
    assert with_adapter.weight_bytes - base.weight_bytes == mp.IP_ADAPTER_SDXL_BYTES


def test_whole_and_fractional_replicas_are_placed_like_ray_places_them():
    gib = mp.GIB
    gpus = mp.pack_replicas(
        [("A#1", 0.5, gib), ("B#1", 2, 3 * gib), ("C#1", 0.6, gib), ("A#2", 0.5, gib)], 10 * gib
    )
    assert [g.replicas for g in gpus] == [["A#1", "A#2"], ["B#1"], ["B#1 (idle)"], ["C#1"]]
    assert [g.used_bytes for g in gpus] == [2 * gib, 3 * gib, 0, gib]


def test_replica_counts_come_from_num_replicas_or_autoscaling():
    document = profile_yaml(ONE_GPU)
    deployments = document["applications"][0]["deployments"]
    deployments[2]["num_replicas"] = "auto"
    deployments.pop(3)  # the Enhancer: Serve's defaults, one replica without a GPU
    spec = mp.parse_profile(document)
    by_name = {d.name: d for d in spec.deployments}
    assert (by_name["SDXL"].replicas, by_name["SDXL"].max_replicas) == (1, 3)
    assert (by_name["WAN"].replicas, by_name["WAN"].max_replicas) == (1, 100)
    assert not by_name["Enhancer"].listed and by_name["Enhancer"].num_gpus == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["applications"][0]["deployments"].append({"name": "Upscaler"}),
            "unknown deployment 'Upscaler'",
        ),
        (lambda d: d["applications"][0]["args"].update(gpu_memory=48), "unknown settings"),
        (lambda d: d["applications"][0]["args"].update(sdxl_batch_images=0), "invalid settings"),
        (
            lambda d: d["applications"][0]["deployments"][1]["ray_actor_options"].update(
                num_gpus="half"
            ),
            "num_gpus must be a number",
        ),
        (lambda d: d.pop("applications"), "no applications"),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(change, message):
    document = profile_yaml(ONE_GPU, gpu_memory_gib=48)
    change(document)
    with pytest.raises(mp.ProfileError, match=message):
        mp.plan_profile(mp.parse_profile(document, "x.yaml"))


def test_a_gpu_profile_without_gpu_memory_asks_for_it(monkeypatch):
    monkeypatch.delenv("OURVIDZ_GPU_MEMORY_GIB", raising=False)
    with pytest.raises(mp.ProfileError, match="--gpu-memory-gib"):
        mp.plan_profile(mp.parse_profile(profile_yaml(ONE_GPU)))


def test_missing_and_broken_files_are_profile_errors(tmp_path):
    with pytest.raises(mp.ProfileError, match="no such file"):
        mp.read_profile(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    with pytest.raises(mp.ProfileError, match="not valid YAML"):
        mp.read_profile(broken)


@pytest.mark.parametrize("name", ["ada-48gb", "h100-80gb", "split-gpus"])
def test_every_hardware_profile_fits(name):
    plan = mp.plan_profile(mp.read_profile(REPO / "deployments" / f"{name}.yaml"))
    assert plan.fits, plan.problems


def test_ada_48gb_fits_only_with_the_wan_vae_tiled():
    document = yaml.safe_load((REPO / "deployments" / "ada-48gb.yaml").read_text())
    document["applications"][0]["args"]["vae_tiling"] = False
    assert not mp.plan_profile(mp.parse_profile(document)).fits


# --- Start-up check and report ---------------------------------------------------------------


def fake_cuda(monkeypatch, total_gib: float, free_gib: float | None = None) -> None:
    total = int(total_gib * GIB)
    free = total if free_gib is None else int(free_gib * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def test_the_start_up_check_does_nothing_off_cuda():
    result = mp.check_replica_share(mp.SDXL, Settings(device="cpu"), 0.25)
    assert result["checked"] is False and result["fits"] is None


def test_a_share_too_small_for_the_weights_fails_the_replica(monkeypatch):
    fake_cuda(monkeypatch, 48)
    settings = Settings(model_profile="weights", device="cuda")
    with pytest.raises(mp.GpuShareTooSmall, match=r"Enhancer: num_gpus=0.3 gives 14.4 GiB") as e:
        mp.check_replica_share(mp.ENHANCER, settings, 0.3)
    assert e.value.details["planned_weight_bytes"] == pytest.approx(15.23e9, rel=1e-3)


def test_a_share_that_holds_the_weights_but_not_the_peak_warns(monkeypatch, caplog):
    fake_cuda(monkeypatch, 48, free_gib=10)
    settings = Settings(model_profile="weights", device="cuda")
    result = mp.check_replica_share(mp.WAN, settings, 0.35)  # 16.8 GiB: weights 13.7, need 23.2
    assert result["checked"] is True and result["fits"] is False
    assert result["share_bytes"] == int(0.35 * 48 * GIB)
    assert "may run out of memory" in caplog.text
    assert "only 10.0 GiB of the GPU is free" in caplog.text


def test_a_share_that_holds_the_plan_passes(monkeypatch, caplog):
    fake_cuda(monkeypatch, 80)
    settings = Settings(model_profile="weights", device="cuda")
    result = mp.check_replica_share(mp.SDXL, settings, 2)  # one device: the share is one GPU
    assert result["fits"] is True and result["share_bytes"] == 80 * GIB
    assert caplog.text == ""


def test_the_memory_report_on_cpu_has_no_gpu_figures():
    report = mp.gpu_memory_report("cpu")
    assert report["device"] == "cpu"
    assert report["used_bytes"] is None and report["total_bytes"] is None
    assert report["process_rss_bytes"] > 0


def test_the_memory_report_on_cuda_reads_the_allocator_and_the_device(monkeypatch):
    fake_cuda(monkeypatch, 80, free_gib=60)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 12 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: 11 * GIB)
    report = mp.gpu_memory_report()
    assert report == {
        "device": "cuda:0",
        "name": "NVIDIA H100",
        "used_bytes": 12 * GIB,
        "total_bytes": 80 * GIB,
        "device_used_bytes": 20 * GIB,
        "allocated_bytes": 11 * GIB,
    }
