"""Per-request SDXL LoRAs on diffusers' LoRA API (PEFT underneath).

- :func:`parse_sdxl_lora` reads a ``.safetensors`` LoRA (kohya or diffusers/PEFT naming) with
  diffusers' own conversion into one canonical CPU state dict per pipeline component, checked
  against the pipeline's layers, every LoRA scale (``alpha / rank``) folded into ``lora_B``:
  any two adapters then differ by their tensors only, which is what hot-swapping needs.
- :class:`LoraCache` keeps parsed adapters in CPU memory, least recently used evicted first.
- :class:`PipelineAdapters` puts a group's adapters into an uncompiled pipeline (load, set
  weights, delete what is no longer needed, disable when a group has none);
  :class:`HotswapAdapters` does it for a compiled UNet without recompiling: a fixed set of
  slots, loaded and padded to the highest allowed rank before compiling, into which later
  adapters are hot-swapped in place.
- :func:`random_sdxl_lora` makes a random LoRA for a pipeline (tests, benchmarks).

Nothing here knows of Ray, HTTP or the database.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import re
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.utils.peft_utils import delete_adapter_layers
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers.utils import logging as transformers_logging

from ourvidz_serve.errors import InvalidRequest, LoraRejected

logger = logging.getLogger(__name__)

UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (UNET, *TEXT_ENCODERS)

TEXT_ENCODER_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
"""The CLIP layers a text-encoder LoRA may target: diffusers derives a text-encoder adapter's
rank from these only (``_load_lora_into_text_encoder``)."""

UNET_RANDOM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_RANDOM_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
RANDOM_LORA_INIT_SCALE = 0.5
"""Magnitude of a random LoRA's update relative to the layer's own output (about)."""

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_ALPHA_PAIRS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


class LoraNotLoaded(InvalidRequest):
    """A request names a LoRA that is not in this runner's CPU cache (``add_lora`` it first)."""

    code = "lora_not_loaded"


def adapter_name(digest: str) -> str:
    """The PEFT adapter name of the LoRA with content digest ``digest``."""
    return f"lora_{digest}"


# --- Layers a LoRA may target ------------------------------------------------------------


@dataclass(frozen=True)
class TargetLayer:
    """Shape of one layer a LoRA can adapt (a Linear, or a Conv2d with its kernel)."""

    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] | None = None
    """None for a Linear layer."""

    def expected_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(lora_A, lora_B) weight shapes at ``rank``."""
        if self.kernel_size is None:
            return (rank, self.in_features), (self.out_features, rank)
        ones = (1,) * len(self.kernel_size)
        return (rank, self.in_features, *self.kernel_size), (self.out_features, rank, *ones)


LayerMap = Mapping[str, Mapping[str, TargetLayer]]
"""component -> module name -> layer."""


def _adaptable_layers(model: torch.nn.Module) -> dict[str, TargetLayer]:
    """Every Linear and Conv2d of ``model`` by module name, looking through PEFT wrappers."""
    layers: dict[str, TargetLayer] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue  # a PEFT wrapper's base_layer and lora_A/lora_B
        if isinstance(module, BaseTunerLayer):
            wrapped.append(f"{name}.")
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear):
            layers[name] = TargetLayer(module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kernel = tuple(module.kernel_size)
            layers[name] = TargetLayer(module.in_channels, module.out_channels, kernel)
    return layers


def sdxl_lora_layers(pipe: StableDiffusionXLPipeline) -> dict[str, dict[str, TargetLayer]]:
    """The layers of ``pipe`` a LoRA may adapt, per component.

    UNet: every Linear and Conv2d except an IP-Adapter's (its attention processors and image
    projection are not the model's). Text encoders: CLIP's attention and MLP projections.
    """
    unet = {
        name: layer
        for name, layer in _adaptable_layers(pipe.unet).items()
        if ".processor." not in f".{name}." and not name.startswith("encoder_hid_proj")
    }
    result = {UNET: unet}
    for component in TEXT_ENCODERS:
        layers = _adaptable_layers(getattr(pipe, component))
        result[component] = {n: t for n, t in layers.items() if n.endswith(TEXT_ENCODER_LAYERS)}
    return result


# --- Parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParsedLora:
    """One LoRA in canonical form: per component, PEFT-named ``{module}.lora_A.weight`` and
    ``{module}.lora_B.weight`` on the CPU, with ``alpha / rank`` folded into ``lora_B``."""

    digest: str
    layers: Mapping[str, Mapping[str, torch.Tensor]]
    """component -> PEFT state dict; only components the LoRA adapts."""
    rank: int
    """The highest rank of any layer."""
    nbytes: int

    def targets(self, component: str) -> set[str]:
        """Module names of ``component`` this LoRA adapts."""
        return {key.rsplit(".lora_", 1)[0] for key in self.layers.get(component, {})}

    def state_dict(self, component: str) -> dict[str, torch.Tensor]:
        """``component``'s tensors with the component prefix, as diffusers' loaders take them."""
        return {
            f"{component}.{key}": value for key, value in self.layers.get(component, {}).items()
        }

    def pinned(self) -> ParsedLora:
        """A copy in page-locked memory (faster host-to-device copies); self if that fails."""
        try:
            layers = {
                component: {key: tensor.pin_memory() for key, tensor in tensors.items()}
                for component, tensors in self.layers.items()
            }
        except RuntimeError as exc:
            logger.warning("LoRA %s stays in pageable memory: %s", self.digest[:12], exc)
            return self
        return ParsedLora(self.digest, layers, self.rank, self.nbytes)


def _reject(digest: str, problem: str) -> LoraRejected:
    return LoraRejected(f"LoRA {digest[:12]}: {problem}", param="loras")


def _header_metadata(data: bytes) -> dict[str, Any]:
    """diffusers' LoRA adapter metadata from a safetensors header (``{}`` when absent)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    raw = (header.get("__metadata__") or {}).get(_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    metadata = json.loads(raw)
    if not isinstance(metadata, dict):
        raise ValueError(f"{_ADAPTER_METADATA_KEY} is not a JSON object")
    return metadata


def _fold_alphas(tensors: dict[str, torch.Tensor], digest: str) -> dict[str, torch.Tensor]:
    """Multiply each ``.alpha``'s up/B matrix by ``alpha / rank`` and drop the alpha.

    kohya files carry one alpha per layer (diffusers would turn them into per-layer PEFT
    alphas); folded, every adapter has scale 1 on every layer.
    """
    result = dict(tensors)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        base = key.removesuffix(".alpha")
        alpha = result.pop(key)
        for down_suffix, up_suffix in _ALPHA_PAIRS:
            down, up = base + down_suffix, base + up_suffix
            if down in result and up in result:
                break
        else:
            raise _reject(digest, f"{key} has no lora_down/lora_up (or lora_A/lora_B) pair")
        if alpha.numel() != 1:
            raise _reject(digest, f"{key} is not a scalar")
        rank = result[down].shape[0]
        factor = float(alpha.float().item()) / rank
        result[up] = (result[up].float() * factor).to(result[up].dtype)
    return result


def _metadata_scale(metadata: Mapping[str, Any], component: str, module: str, rank: int) -> float:
    """``lora_alpha / r`` of ``module`` from diffusers' adapter metadata (1.0 without any)."""
    alpha = metadata.get(f"{component}.lora_alpha")
    if alpha is None:
        return 1.0
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    key = get_pattern_key(list(patterns), module) if patterns else None
    alpha = float(patterns.get(key, alpha)) if key is not None else float(alpha)
    if metadata.get(f"{component}.use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _to_peft(component: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own renaming to PEFT keys, as its loaders apply it per component."""
    if all(".lora_A." in k or ".lora_B." in k for k in state_dict):
        return state_dict
    if component == UNET:
        return dict(convert_unet_state_dict_to_peft(state_dict))
    return dict(convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict)))


def parse_sdxl_lora(
    data: bytes,
    *,
    digest: str,
    layers: LayerMap,
    unet_config: Any,
    dtype: torch.dtype,
    max_rank: int,
    unet_layers: Collection[str] | None = None,
    unet_layers_reason: str = "",
) -> ParsedLora:
    """Parse a ``.safetensors`` SDXL LoRA into a :class:`ParsedLora` or raise LoraRejected.

    ``layers`` are the pipeline's adaptable layers (:func:`sdxl_lora_layers`): every tensor
    must fit one. ``unet_layers``, when given, narrows the UNet layers allowed further
    (``unet_layers_reason`` says why).
    """
    try:
        tensors = load_safetensors(data)
        metadata = _header_metadata(data)
    except Exception as exc:
        raise _reject(digest, f"not a readable .safetensors file ({exc})") from exc
    if not tensors:
        raise _reject(digest, "the file holds no tensors")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise _reject(digest, "DoRA LoRAs are not supported (dora_scale/magnitude tensors)")
    if metadata.get("unet.use_dora") or metadata.get("text_encoder.use_dora"):
        raise _reject(digest, "DoRA LoRAs are not supported")
    tensors = _fold_alphas(tensors, digest)
    try:
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(
            tensors, unet_config=unet_config
        )
    except Exception as exc:
        raise _reject(digest, f"not an SDXL LoRA diffusers can convert ({exc})") from exc
    if alphas:
        raise _reject(digest, "alphas left after folding")  # _fold_alphas took them all

    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            raise _reject(digest, f"tensor {key!r} is for none of the SDXL UNet and text encoders")
        by_component.setdefault(component, {})[rest] = tensor

    result: dict[str, dict[str, torch.Tensor]] = {}
    highest, nbytes = 0, 0
    for component, state_dict in by_component.items():
        known = layers[component]
        try:
            peft_dict = _to_peft(component, state_dict)
        except Exception as exc:
            raise _reject(digest, f"{component} tensors cannot be renamed: {exc}") from exc
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in peft_dict.items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise _reject(digest, f"unsupported {component} tensor {key!r}")
            module = match["module"]
            if module not in known and module.startswith("text_model."):
                module = module.removeprefix("text_model.")  # CLIPTextModel in transformers 5
            pairs.setdefault(module, {})[match["half"]] = tensor
        canonical: dict[str, torch.Tensor] = {}
        for module, pair in sorted(pairs.items()):
            layer = known.get(module)
            if layer is None:
                raise _reject(digest, f"{component} has no adaptable layer {module!r}")
            if component == UNET and unet_layers is not None and module not in unet_layers:
                raise _reject(digest, f"UNet layer {module!r}: {unet_layers_reason}")
            if set(pair) != {"A", "B"}:
                raise _reject(digest, f"{component}.{module} lacks its lora_A or lora_B")
            down, up = pair["A"], pair["B"]
            rank = down.shape[0] if down.ndim else 0
            if down.ndim == 0 or not 1 <= rank <= max_rank:
                raise _reject(
                    digest, f"{component}.{module} has rank {rank}; the limit is {max_rank}"
                )
            if (tuple(down.shape), tuple(up.shape)) != layer.expected_shapes(rank):
                raise _reject(
                    digest,
                    f"{component}.{module}: lora_A {tuple(down.shape)} / lora_B "
                    f"{tuple(up.shape)} do not fit the layer ({layer.in_features} -> "
                    f"{layer.out_features}); is it an SDXL LoRA?",
                )
            if not (down.is_floating_point() and up.is_floating_point()):
                raise _reject(digest, f"{component}.{module} is not floating point")
            scale = _metadata_scale(metadata, component, module, rank)
            up32 = up.float() * scale if scale != 1.0 else up
            down_t, up_t = down.to(dtype).contiguous(), up32.to(dtype).contiguous()
            if not (torch.isfinite(down_t).all() and torch.isfinite(up_t).all()):
                raise _reject(digest, f"{component}.{module} holds NaN or infinite values")
            canonical[f"{module}.lora_A.weight"] = down_t
            canonical[f"{module}.lora_B.weight"] = up_t
            highest = max(highest, rank)
            nbytes += down_t.nbytes + up_t.nbytes
        if canonical:
            result[component] = canonical
    if not result:
        raise _reject(digest, "no UNet or text-encoder LoRA layers")
    return ParsedLora(digest, result, highest, nbytes)


# --- CPU cache -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraStats:
    """Counters of a runner's LoRA handling since it was built."""

    loads: int = 0
    """``add_lora`` calls that parsed a file (a cached digest is not parsed again)."""
    evictions: int = 0
    """Parsed adapters dropped from the CPU cache, least recently used first."""
    activations: int = 0
    """Adapters put into the model: loaded into it, or hot-swapped into a slot."""
    switches: int = 0
    """Pipeline calls whose active adapters (and scales) differed from the previous call's."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class LoraCache:
    """Parsed LoRAs by digest in CPU memory, at most ``capacity``; thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the LoRA cache must hold at least one LoRA, not {capacity}")
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, ParsedLora] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def add(self, digest: str, parse: Callable[[], ParsedLora]) -> None:
        """Cache ``parse()`` under ``digest`` unless cached; either way it is now most recent."""
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return
        parsed = parse()  # outside the lock: parsing a large file takes a while
        with self._lock:
            if digest in self._entries:  # another thread parsed it meanwhile
                self._entries.move_to_end(digest)
                return
            self._entries[digest] = parsed
            self.loads += 1
            while len(self._entries) > self.capacity:
                evicted, _ = self._entries.popitem(last=False)
                self.evictions += 1
                logger.info("LoRA %s evicted from the CPU cache", evicted[:12])

    def missing(self, digests: Iterable[str]) -> list[str]:
        with self._lock:
            return [d for d in digests if d not in self._entries]

    def take(self, digests: Iterable[str]) -> dict[str, ParsedLora]:
        """The parsed LoRAs of ``digests``, each marked used; KeyError names any missing.

        The caller keeps references, so an eviction meanwhile cannot take them from a call
        that is running.
        """
        with self._lock:
            wanted = list(dict.fromkeys(digests))
            absent = [d for d in wanted if d not in self._entries]
            if absent:
                raise KeyError(absent)
            for digest in wanted:
                self._entries.move_to_end(digest)
            return {d: self._entries[d] for d in wanted}

    def resident(self) -> list[str]:
        """Cached digests, least recently used first."""
        with self._lock:
            return list(self._entries)


# --- Activation ----------------------------------------------------------------------------

_LOADING_LOGGERS = (
    "transformers.modeling_utils",
    "transformers.integrations.peft",
    "transformers.distributed.tensor_parallel",
)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence what loading an adapter prints on every activation, not only the first.

    transformers 5 reports the model's other adapters as "MISSING ... newly initialized"
    when a text encoder gets one more (they are not touched), lists every adapter weight as
    "not sharded" (CLIP has a tensor-parallel plan), shows a "Loading weights" progress bar,
    and PEFT warns that a second adapter joins a model with a ``peft_config``.
    Process-wide settings, changed only while the runner's lock is held.
    """
    loggers = [logging.getLogger(name) for name in _LOADING_LOGGERS]
    levels = [lg.level for lg in loggers]
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            transformers_logging.disable_progress_bar()
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if bars_were_on:
                transformers_logging.enable_progress_bar()


Adapters = Sequence[tuple[ParsedLora, float]]
"""A pipeline call's adapters with their scales, in the request's order."""


class _TextEncoderAdapters:
    """Per-digest adapters of one text encoder: loaded, weighted, deleted, disabled."""

    def __init__(self, pipe: StableDiffusionXLPipeline, component: str) -> None:
        self.pipe, self.component = pipe, component
        self.model = getattr(pipe, component)
        self.loaded: set[str] = set()
        self.ever_loaded = False

    def activate(self, adapters: Adapters) -> int:
        wanted = [(p, s) for p, s in adapters if self.component in p.layers]
        names = [adapter_name(p.digest) for p, _ in wanted]
        for name in sorted(self.loaded - set(names)):
            delete_adapter_layers(self.model, name)
            self.loaded.discard(name)
        loads = 0
        for (parsed, _), name in zip(wanted, names, strict=True):
            if name in self.loaded:
                continue
            try:
                with _quiet_loading():
                    self.pipe.load_lora_into_text_encoder(
                        parsed.state_dict(self.component),
                        network_alphas=None,
                        text_encoder=self.model,
                        prefix=self.component,
                        adapter_name=name,
                        _pipeline=self.pipe,
                    )
            except Exception:
                delete_adapter_layers(self.model, name)
                raise
            self.loaded.add(name)
            self.ever_loaded = True
            loads += 1
        if names:
            enable_lora_for_text_encoder(self.model)
            set_adapters_for_text_encoder(names, self.model, [s for _, s in wanted])
        elif self.ever_loaded:
            disable_lora_for_text_encoder(self.model)
        return loads


class PipelineAdapters:
    """An uncompiled pipeline's adapters: the active set only, named by digest.

    A group's missing adapters are loaded (a host-to-device copy of the parsed tensors), those
    it does not use are deleted, its scales set; a group without LoRAs disables them. Both
    SDXL pipelines of a runner share these modules.
    """

    def __init__(self, pipe: StableDiffusionXLPipeline) -> None:
        self.pipe = pipe
        self.loaded: dict[str, str] = {}
        """adapter name -> component names it was loaded into."""
        self.ever_loaded = False

    def activate(self, adapters: Adapters) -> int:
        """Make ``adapters`` the pipeline's active LoRAs; return how many were loaded."""
        pipe = self.pipe
        names = [adapter_name(p.digest) for p, _ in adapters]
        stale = [name for name in self.loaded if name not in names]
        if stale:
            pipe.delete_adapters(stale)
            for name in stale:
                del self.loaded[name]
        loads = 0
        for (parsed, _), name in zip(adapters, names, strict=True):
            if name in self.loaded:
                continue
            try:
                with _quiet_loading():
                    self._load(parsed, name)
            except Exception:
                pipe.delete_adapters([name])
                raise
            self.loaded[name] = parsed.digest
            self.ever_loaded = True
            loads += 1
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=[s for _, s in adapters])
        elif self.ever_loaded:
            pipe.disable_lora()
        return loads

    def _load(self, parsed: ParsedLora, name: str) -> None:
        # load_lora_weights runs these three; called directly, a component the LoRA does not
        # adapt logs no "No LoRA keys associated to ..." warning on every load.
        pipe = self.pipe
        if UNET in parsed.layers:
            pipe.load_lora_into_unet(
                parsed.state_dict(UNET),
                network_alphas=None,
                unet=pipe.unet,
                adapter_name=name,
                _pipeline=pipe,
            )
        for component in TEXT_ENCODERS:
            if component in parsed.layers:
                pipe.load_lora_into_text_encoder(
                    parsed.state_dict(component),
                    network_alphas=None,
                    text_encoder=getattr(pipe, component),
                    prefix=component,
                    adapter_name=name,
                    _pipeline=pipe,
                )


def hotswap_unet_layers(layers: LayerMap) -> set[str]:
    """The UNet layers a compiled runner's slots cover: every Linear.

    That is every layer of kohya's default SDXL LoRA and of diffusers' trainers (attention,
    feed-forward, projections) plus the time and class embeddings. Convolutions (LoCon) are
    left out: a slot costs compute on every layer it covers, convolutions the most.
    """
    return {name for name, layer in layers[UNET].items() if layer.kernel_size is None}


class HotswapAdapters:
    """A compiled UNet's adapters: ``slots`` adapters hot-swapped in place, never recompiling.

    At construction, before the UNet is compiled: ``enable_lora_hotswap(target_rank)``, then
    one zero adapter per slot over ``layers`` (every slot padded to ``target_rank`` and its
    scales turned into tensors by PEFT's ``prepare_model_for_compiled_hotswap``), all slots
    active at weight 0 and the LoRA layers disabled. A group's UNet adapters are then
    hot-swapped into slots (``load_lora_adapter(..., hotswap=True)``: an in-place copy into
    the padded weights; layers an adapter lacks are zeroed) and its scales written into the
    scale tensors in place; unused slots keep weight 0. A group without UNet LoRAs runs with
    the LoRA layers disabled, the second compiled variant (both are compiled by the warm-up).
    Text encoders are not compiled (and diffusers 0.42 cannot hot-swap them): their adapters
    are loaded and deleted per digest as in :class:`PipelineAdapters`.
    """

    def __init__(
        self,
        pipe: StableDiffusionXLPipeline,
        *,
        slots: int,
        target_rank: int,
        layers: Collection[str],
    ) -> None:
        if slots < 1:
            raise ValueError(f"a compiled runner needs at least one LoRA slot, not {slots}")
        self.pipe = pipe
        self.unet = pipe.unet
        self.layers = frozenset(layers)
        self.target_rank = target_rank
        self.slots = [f"slot{i}" for i in range(slots)]
        self.slot_digests: list[str | None] = [None] * slots
        self._slot_used = [0] * slots
        self._calls = 0
        self.text_encoders = [_TextEncoderAdapters(pipe, c) for c in TEXT_ENCODERS]
        self._metadata = {"r": 1, "lora_alpha": 1, "target_modules": sorted(self.layers)}
        self._shapes: dict[str, tuple[int, int]] = {}
        for name in self.layers:
            layer = self.unet.get_submodule(name)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"LoRA slot layer {name!r} is not a Linear layer")
            self._shapes[name] = (layer.in_features, layer.out_features)
        placeholder = self._placeholder(self.unet.device)
        for index, slot in enumerate(self.slots):
            # diffusers pads and converts the adapters present at the first load after this
            # call, then forgets it: once per slot so that every slot gets both.
            pipe.enable_lora_hotswap(
                target_rank=target_rank, check_compiled="error" if index == 0 else "ignore"
            )
            with _quiet_loading():
                self.unet.load_lora_adapter(
                    placeholder, prefix=None, adapter_name=slot, metadata=dict(self._metadata)
                )
        self._lora_layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
        for module in self._lora_layers:
            module.set_adapter(self.slots)  # all active for good; a weight 0 turns one off
        self._set_scales({})
        self.unet.disable_lora()
        self.unet_enabled = False

    def _placeholder(self, device: torch.device) -> dict[str, torch.Tensor]:
        """A rank-1 zero adapter over every slot layer."""
        dtype = self.unet.dtype
        state_dict = {}
        for name, (in_features, out_features) in sorted(self._shapes.items()):
            state_dict[f"{name}.lora_A.weight"] = torch.zeros(
                1, in_features, dtype=dtype, device=device
            )
            state_dict[f"{name}.lora_B.weight"] = torch.zeros(
                out_features, 1, dtype=dtype, device=device
            )
        return state_dict

    def _set_scales(self, scales: Mapping[str, float]) -> None:
        """Write each slot's weight into its scale tensors in place (no new guard for Dynamo)."""
        for module in self._lora_layers:
            for slot in self.slots:
                scaling = module.scaling[slot]
                assert isinstance(scaling, torch.Tensor), "prepared for hotswap"
                scaling.fill_(scales.get(slot, 0.0))

    def activate(self, adapters: Adapters) -> int:
        """Make ``adapters`` the pipeline's active LoRAs; return how many were put in."""
        loads = sum(te.activate(adapters) for te in self.text_encoders)
        unet_adapters = [(p, s) for p, s in adapters if UNET in p.layers]
        if len(unet_adapters) > len(self.slots):
            raise InvalidRequest(
                f"{len(unet_adapters)} LoRAs in one call; this runner has {len(self.slots)} slots"
            )
        wanted = {p.digest for p, _ in unet_adapters}
        # Empty slots first, then the least recently used: a later call may want them back.
        free = sorted(
            (i for i, d in enumerate(self.slot_digests) if d not in wanted),
            key=lambda i: (self.slot_digests[i] is not None, self._slot_used[i]),
        )
        self._calls += 1
        scales: dict[str, float] = {}
        for parsed, scale in unet_adapters:
            if parsed.digest in self.slot_digests:
                index = self.slot_digests.index(parsed.digest)
            else:
                index = free.pop(0)
                self._swap_in(index, parsed)
                loads += 1
            scales[self.slots[index]] = scale
            self._slot_used[index] = self._calls
        self._set_scales(scales)
        if unet_adapters and not self.unet_enabled:
            self.unet.enable_lora()
        elif not unet_adapters and self.unet_enabled:
            self.unet.disable_lora()
        self.unet_enabled = bool(unet_adapters)
        return loads

    def _swap_in(self, index: int, parsed: ParsedLora) -> None:
        slot = self.slots[index]
        self.slot_digests[index] = None  # unknown contents until the swap completes
        # alpha == r: the canonical adapters have scale 1 on every layer; the slot's
        # config (alpha_pattern, rslora, dropout) matches, which hot-swapping checks.
        metadata = {
            "r": parsed.rank,
            "lora_alpha": parsed.rank,
            "target_modules": sorted(parsed.targets(UNET)),
        }
        with _quiet_loading():
            self.unet.load_lora_adapter(
                dict(parsed.layers[UNET]),
                prefix=None,
                adapter_name=slot,
                hotswap=True,
                metadata=metadata,
            )
        self.slot_digests[index] = parsed.digest

    def warm_up_lora(self) -> ParsedLora:
        """A zero LoRA over every slot layer: activating it runs the LoRA-enabled variant."""
        zeros = self._placeholder(torch.device("cpu"))
        nbytes = sum(t.nbytes for t in zeros.values())
        return ParsedLora("0" * 64, {UNET: zeros}, 1, nbytes)


# --- Random LoRAs --------------------------------------------------------------------------


def _sgm_module(name: str, layers_per_block: int) -> str:
    """The SGM (original Stability) name kohya uses for a diffusers UNet attention module.

    The inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` for attention blocks:
    ``down_blocks.b.attentions.j`` is ``input_blocks.{1 + b (L + 1) + j}.1``,
    ``up_blocks.b.attentions.j`` is ``output_blocks.{b (L + 1) + j}.1`` (L layers per block)
    and ``mid_block.attentions.0`` is ``middle_block.1``.
    """
    parts = name.split(".")
    stride = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        return ".".join(["input_blocks", str(1 + block * stride + layer), "1", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        block, layer = int(parts[1]), int(parts[3])
        return ".".join(["output_blocks", str(block * stride + layer), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    raise ValueError(f"no SGM name for UNet module {name!r}")


def random_sdxl_lora(
    pipe: StableDiffusionXLPipeline,
    *,
    rank: int = 4,
    seed: int = 0,
    naming: Literal["diffusers", "kohya"] = "diffusers",
    text_encoders: bool = True,
    init_scale: float = RANDOM_LORA_INIT_SCALE,
    dtype: torch.dtype | None = None,
) -> bytes:
    """A random LoRA for ``pipe`` as ``.safetensors`` bytes; ``pipe`` is only read.

    Targets the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and
    feed-forward layers and, with ``text_encoders``, both CLIP encoders' ``q/k/v/out_proj``,
    at ``rank``. ``lora_A`` is Gaussian over ``sqrt(in)``, ``lora_B`` Gaussian times
    ``init_scale / sqrt(rank)`` (not PEFT's zeros, which would change nothing), so each layer's
    update is about ``init_scale`` times the size of its own output.

    ``naming``: ``"diffusers"`` writes ``unet.{module}.lora_A.weight`` and
    ``text_encoder(_2).text_model.{module}.lora_A.weight`` (scale 1, no alphas), as diffusers'
    trainers save; ``"kohya"`` writes ``lora_unet_{sgm_module}.lora_down.weight``,
    ``lora_up.weight`` and ``.alpha = rank / 2`` (UNet modules in SGM block names,
    ``lora_te1_``/``lora_te2_`` text encoders), as kohya's sd-scripts save, with ``lora_up``
    scaled by ``rank / alpha`` so that both namings of one seed are the same LoRA. Tensors
    are ``dtype`` (default: the UNet's).
    """
    if rank < 1:
        raise ValueError(f"rank must be positive, not {rank}")
    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or pipe.unet.dtype
    layers = sdxl_lora_layers(pipe)
    components = [UNET, *(TEXT_ENCODERS if text_encoders else ())]
    targets = {
        UNET: UNET_RANDOM_TARGETS,
        "text_encoder": TEXT_ENCODER_RANDOM_TARGETS,
        "text_encoder_2": TEXT_ENCODER_RANDOM_TARGETS,
    }
    alpha = rank / 2
    layers_per_block = pipe.unet.config["layers_per_block"]
    tensors: dict[str, torch.Tensor] = {}
    for component in components:
        for module, layer in sorted(layers[component].items()):
            suffixes = tuple(f".{t}" for t in targets[component])
            if layer.kernel_size is not None or not module.endswith(suffixes):
                continue
            if component == UNET and ".attentions." not in f".{module}":
                continue
            down = torch.randn(rank, layer.in_features, generator=generator)
            down /= math.sqrt(layer.in_features)
            up = torch.randn(layer.out_features, rank, generator=generator)
            up *= init_scale / math.sqrt(rank)
            if component != UNET and not module.startswith("text_model."):
                module = f"text_model.{module}"  # files name CLIP's modules as transformers 4 did
            if naming == "diffusers":
                tensors[f"{component}.{module}.lora_A.weight"] = down.to(dtype)
                tensors[f"{component}.{module}.lora_B.weight"] = up.to(dtype)
                continue
            if component == UNET:
                prefix = "lora_unet_" + _sgm_module(module, layers_per_block).replace(".", "_")
            else:
                te = "te1" if component == "text_encoder" else "te2"
                prefix = f"lora_{te}_" + module.replace(".", "_")
            tensors[f"{prefix}.lora_down.weight"] = down.to(dtype)
            tensors[f"{prefix}.lora_up.weight"] = (up * (rank / alpha)).to(dtype)
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if not tensors:
        raise ValueError("the pipeline has no layers a random LoRA could target")
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def sha256_digest(data: bytes) -> str:
    """A LoRA's identity: the sha256 hex of its file."""
    return hashlib.sha256(data).hexdigest()
