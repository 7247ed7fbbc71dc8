"""The application builder that ``serve_config.yaml`` and ``deployments/*.yaml`` name.

``args`` of the config are settings overrides (same names as the ``OURVIDZ_`` variables,
lower case, without the prefix); everything else comes from the environment, read once here.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ray.serve import Application

from ourvidz_serve.deployments.ingress import IngressDeployment
from ourvidz_serve.deployments.models import EnhancerDeployment, SDXLDeployment, WanDeployment
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)


def build_app(args: dict[str, Any]) -> Application:
    settings, dev_key = Settings(**args).with_generated_dev_key()
    if dev_key is not None:
        banner = f"ourvidz-serve development API key (tiny profile, no OURVIDZ_API_KEYS): {dev_key}"
        print(banner, file=sys.stderr, flush=True)
        logger.warning(banner)
    # The @serve.deployment decorator turns each class into a Deployment with .bind().
    return IngressDeployment.bind(  # type: ignore[attr-defined]
        settings,
        SDXLDeployment.bind(settings),  # type: ignore[attr-defined]
        WanDeployment.bind(settings),  # type: ignore[attr-defined]
        EnhancerDeployment.bind(settings),  # type: ignore[attr-defined]
    )
