import pytest
from ray.serve import Application

from ourvidz_serve.deployments.app import build_app


def test_the_tiny_default_prints_a_development_key(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("OURVIDZ_API_KEYS", raising=False)
    monkeypatch.setenv("OURVIDZ_DATA_DIR", str(tmp_path))
    assert isinstance(build_app({}), Application)
    printed = capsys.readouterr().err
    assert "development API key (tiny profile, no OURVIDZ_API_KEYS): dev-" in printed


def test_configured_keys_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("OURVIDZ_API_KEYS", "k1,k2")
    build_app({})
    assert "development API key" not in capsys.readouterr().err


def test_real_weights_without_keys_refuse_to_build(monkeypatch):
    monkeypatch.delenv("OURVIDZ_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="OURVIDZ_API_KEYS must be set"):
        build_app({"model_profile": "weights"})


def test_invalid_or_unknown_config_args_are_refused(monkeypatch):
    monkeypatch.setenv("OURVIDZ_API_KEYS", "k1")
    with pytest.raises(ValueError, match="model_profile"):
        build_app({"model_profile": "enormous"})
    with pytest.raises(ValueError, match="unknown settings in the config's args: model_profil"):
        build_app({"model_profil": "weights"})
