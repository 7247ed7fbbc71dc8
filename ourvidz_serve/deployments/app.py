"""The application builder that ``serve_config.yaml`` and ``deployments/*.yaml`` name.

``args`` of the config are settings overrides (same names as the ``OURVIDZ_`` variables,
lower case, without the prefix); everything else comes from the environment, read once here.
"""

from __future__ import annotations

import sys
from typing import Any

from ray.serve import Application

from ourvidz_serve.deployments.ingress import IngressDeployment
from ourvidz_serve.deployments.models import EnhancerDeployment, SDXLDeployment, WanDeployment
from ourvidz_serve.settings import Settings


def build_app(args: dict[str, Any]) -> Application:
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown settings in the config's args: {', '.join(unknown)}")
    settings, dev_key = Settings(**args).with_generated_dev_key()
    if dev_key is not None:
        print(
            f"ourvidz-serve development API key (tiny profile, no OURVIDZ_API_KEYS): {dev_key}",
            file=sys.stderr,
            flush=True,
        )
    # The @serve.deployment decorator turns each class into a Deployment with .bind().
    enhancer = EnhancerDeployment.bind(settings)  # type: ignore[attr-defined]
    return IngressDeployment.bind(  # type: ignore[attr-defined]
        settings,
        SDXLDeployment.bind(settings),  # type: ignore[attr-defined]
        WanDeployment.bind(settings, enhancer),  # type: ignore[attr-defined]
        enhancer,
    )
