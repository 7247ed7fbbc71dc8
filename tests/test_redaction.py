import logging

from ourvidz_serve.redaction import REDACTED, install_log_redaction, redact


def test_known_secrets_and_credential_shapes_are_redacted():
    text = (
        "key=service-key-123 auth='Bearer abc.def' dsn=postgresql://u:hunter22@db:5432/x "
        "jwt=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl "
        "url=/v1/files/b/k.png?expires=1&signature=deadbeef"
    )
    cleaned = redact(text, ["service-key-123"])
    for secret in ("service-key-123", "abc.def", "hunter22", "eyJhbGciOiJIUzI1NiJ9", "deadbeef"):
        assert secret not in cleaned
    assert cleaned.count(REDACTED) == 5
    assert "postgresql://u:" in cleaned and "@db:5432/x" in cleaned


def test_short_strings_are_not_treated_as_secrets():
    assert redact("a normal sentence", ["a"]) == "a normal sentence"


def test_every_log_record_is_redacted_once_installed(caplog):
    install_log_redaction(["service-key-for-logs"])
    logger = logging.getLogger("ourvidz_serve.test")
    with caplog.at_level(logging.INFO):
        logger.info("request with %s and Bearer %s", "service-key-for-logs", "tok.en.value")
        try:
            raise RuntimeError("failed with service-key-for-logs")
        except RuntimeError:
            logger.exception("boom")
    output = caplog.text + "".join(record.exc_text or "" for record in caplog.records)
    assert "service-key-for-logs" not in output
    assert "tok.en.value" not in output
    assert REDACTED in output
