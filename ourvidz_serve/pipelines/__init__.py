"""Model pipelines: SDXL images, WAN images and videos, Qwen prompt enhancement.

Plain Python around diffusers / transformers, with no Ray or HTTP. Import the runner
modules (``sdxl``, ``wan``, ``qwen``) directly; this package stays light on purpose.
"""
