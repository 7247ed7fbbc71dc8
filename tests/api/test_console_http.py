"""The console's files over HTTP, in-process: served from the package under a strict CSP,
only shipped files by name, and the links of the queue panel from the settings."""

from __future__ import annotations

import re

import pytest

from ourvidz_serve.api.console import STATIC_DIR, content_security_policy
from ourvidz_serve.settings import StorageBackend
from tests.api.test_security_http import serving


@pytest.fixture
async def http(secure_settings, tiny_models, repository):
    settings = secure_settings.model_copy(
        update={"ray_dashboard_url": "http://127.0.0.1:8265", "grafana_url": None}
    )
    async with serving(settings, tiny_models) as client:
        yield client


async def test_the_page_and_its_files_carry_a_csp_without_inline_scripts_or_other_origins(http):
    page = await http.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe" not in policy and "http" not in policy
    # Every asset the page names is a file of /console/static/, and each is served.
    assets = re.findall(r'(?:src="|<link[^>]*href=")([^"]+)"', page.text)
    assets = [asset for asset in assets if not asset.startswith("data:")]
    assert assets and all(asset.startswith("/console/static/") for asset in assets)
    for asset in assets:
        response = await http.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["content-security-policy"] == policy
    assert not re.search(r"<script>|\son[a-z]+=|style=", page.text)


@pytest.mark.parametrize(
    "name", ["..%2Fconsole.py", "missing.js", ".hidden.js", "__init__.py", "%2Fetc%2Fpasswd"]
)
async def test_only_shipped_files_are_served_by_name(http, name):
    response = await http.get(f"/console/static/{name}")
    assert response.status_code == 404
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


async def test_the_config_names_the_links_that_are_set(http):
    response = await http.get("/console/config.json")
    assert response.json() == {"ray_dashboard_url": "http://127.0.0.1:8265", "grafana_url": None}


def test_every_script_is_an_es_module_with_no_other_origin():
    for path in STATIC_DIR.glob("*.js"):
        text = path.read_text()
        assert not re.search(r"https?://", text), path.name
        assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML", text), path.name


def test_with_object_storage_images_and_videos_may_come_from_its_origin(settings):
    local = content_security_policy(settings)
    assert "img-src 'self' blob: data:;" in local
    s3 = settings.model_copy(
        update={
            "storage_backend": StorageBackend.S3,
            "s3_endpoint_url": "http://127.0.0.1:9000/some/path",
        }
    )
    policy = content_security_policy(s3)
    assert "img-src 'self' blob: data: http://127.0.0.1:9000;" in policy
    assert "media-src 'self' blob: data: http://127.0.0.1:9000;" in policy
    assert "connect-src 'self';" in policy  # the page's own requests stay on this origin
