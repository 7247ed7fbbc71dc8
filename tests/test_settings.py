import pytest

from ourvidz_serve.settings import ModelProfile, Settings, StorageBackend


def test_settings_come_from_ourvidz_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("OURVIDZ_MODEL_PROFILE", "full-random")
    monkeypatch.setenv("OURVIDZ_API_KEYS", " key-a, key-b ,,")
    monkeypatch.setenv("OURVIDZ_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("OURVIDZ_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.model_profile is ModelProfile.FULL_RANDOM
    assert settings.api_keys == ["key-a", "key-b"]
    assert settings.storage_backend is StorageBackend.S3
    assert settings.embedded_database_dir == tmp_path.resolve() / "postgres"


def test_config_args_override_the_environment(monkeypatch):
    monkeypatch.setenv("OURVIDZ_MODEL_PROFILE", "weights")
    assert Settings(model_profile="tiny").model_profile is ModelProfile.TINY


def test_an_unknown_profile_is_refused(monkeypatch):
    monkeypatch.setenv("OURVIDZ_MODEL_PROFILE", "huge")
    with pytest.raises(ValueError, match="model_profile"):
        Settings()


def test_tiny_profile_without_keys_makes_one_development_key_and_keeps_it(tmp_path):
    settings, key = Settings(api_keys=[], data_dir=tmp_path).with_generated_dev_key()
    assert key is not None and key.startswith("dev-") and len(key) > 20
    assert settings.api_keys == [key]
    assert (settings.dev_key_path.stat().st_mode & 0o777) == 0o600
    _, again = Settings(api_keys=[], data_dir=tmp_path).with_generated_dev_key()
    assert again == key
    _, elsewhere = Settings(api_keys=[], data_dir=tmp_path / "other").with_generated_dev_key()
    assert elsewhere != key


def test_configured_keys_are_kept_and_no_key_is_generated(tmp_path):
    settings, key = Settings(api_keys=["real"], data_dir=tmp_path).with_generated_dev_key()
    assert (settings.api_keys, key) == (["real"], None)
    assert not settings.dev_key_path.exists()


@pytest.mark.parametrize("profile", ["full-random", "weights"])
def test_other_profiles_refuse_to_start_without_keys(profile):
    with pytest.raises(ValueError, match="OURVIDZ_API_KEYS must be set"):
        Settings(model_profile=profile, api_keys=[]).with_generated_dev_key()


def test_a_jwt_secret_shorter_than_32_bytes_is_refused_at_start_up():
    with pytest.raises(ValueError, match="at least 32"):
        Settings(jwt_secret="short-secret")
    assert Settings(jwt_secret="s" * 32).jwt_secret is not None


def test_the_url_signing_key_does_not_depend_on_the_order_of_the_api_keys():
    forward = Settings(api_keys=["key-one", "key-two"]).signing_key()
    backward = Settings(api_keys=["key-two", "key-one"]).signing_key()
    assert forward == backward
    assert Settings(api_keys=["key-one"]).signing_key() != forward
    assert b"key-one" not in forward
    assert Settings(api_keys=["k"], url_signing_secret="explicit").signing_key() == b"explicit"


def test_extra_prompt_deny_patterns_are_a_json_list(monkeypatch):
    monkeypatch.setenv("OURVIDZ_PROMPT_DENY_PATTERNS", '["gore{2,}", "a,b"]')
    assert Settings().prompt_deny_patterns == ["gore{2,}", "a,b"]


def test_every_configured_secret_is_listed_for_redaction():
    settings = Settings(
        api_keys=["service-key-1"],
        jwt_secret="j" * 32,
        callback_secret="callback-secret,rotated-secret",
        database_url="postgresql://ourvidz:db-password-9@127.0.0.1:5432/ourvidz",
    )
    assert set(settings.secrets()) == {
        "service-key-1",
        "j" * 32,
        "callback-secret",
        "rotated-secret",
        "db-password-9",
    }


def test_a_callback_url_without_a_signing_secret_is_refused_at_start_up():
    with pytest.raises(ValueError, match="OURVIDZ_CALLBACK_SECRET"):
        Settings(callback_url="https://platform.example/hooks")
    assert Settings(callback_url="https://platform.example/hooks", callback_secret="s").callback_url


def test_a_direct_database_url_without_the_pooled_one_is_refused_at_start_up():
    with pytest.raises(ValueError, match="OURVIDZ_DATABASE_DIRECT_URL needs OURVIDZ_DATABASE_URL"):
        Settings(database_direct_url="postgresql://db.example:5432/app")
    both = Settings(
        database_url="postgresql://u:pooled@pooler.example:6543/app",
        database_direct_url="postgresql://u:direct@db.example:5432/app",
    )
    assert {"pooled", "direct"} <= set(both.secrets()), "both passwords are redacted from logs"


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({}, ["embedded PostgreSQL", "local storage"]),
        ({"database_url": "postgresql://db.internal/ourvidz"}, ["local storage"]),
        ({"storage_backend": "s3"}, ["embedded PostgreSQL"]),
    ],
)
def test_node_local_state_is_refused_on_a_cluster_of_several_nodes(changes, refused):
    settings = Settings(**changes)
    settings.check_cluster_size(1)  # one node: the embedded defaults are the point
    with pytest.raises(ValueError, match="2 nodes") as error:
        settings.check_cluster_size(2)
    for what in refused:
        assert what in str(error.value)


def test_an_external_database_and_s3_run_on_any_cluster():
    settings = Settings(database_url="postgresql://db.internal/ourvidz", storage_backend="s3")
    settings.check_cluster_size(12)
