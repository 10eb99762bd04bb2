import logging
import pickle

import numpy as np
import pytest

from pipeline.core import errors
from pipeline.service.auth import KeyRing, key_id
from pipeline.core.settings import Settings


@pytest.mark.parametrize(
    "err, status, body",
    [
        (errors.MissingParameter(), 400, {"code": "MISSING_PARAMETER", "error": "Missing required parameter: url or audio file"}),
        (errors.InvalidParameter("bad", param="language"), 400, {"code": "INVALID_PARAMETER", "param": "language"}),
        (errors.UnsupportedFormat(), 400, {"code": "UNSUPPORTED_FORMAT", "supported_formats": ["wav", "mp3", "flac", "ogg", "m4a"]}),
        (errors.InvalidAudio("x"), 400, {"code": "INVALID_AUDIO"}),
        (errors.Unauthorized(), 401, {"code": "UNAUTHORIZED"}),
        (errors.ForbiddenUrl("x"), 403, {"code": "FORBIDDEN_URL"}),
        (errors.NotFound("x"), 404, {"code": "NOT_FOUND"}),
        (errors.FileTooLarge(100), 422, {"code": "FILE_TOO_LARGE", "max_size_mb": 100}),
        (errors.AudioTooLong(7200), 422, {"code": "AUDIO_TOO_LONG", "max_duration_s": 7200}),
        (errors.FetchFailed("x", status=404), 422, {"code": "FETCH_FAILED", "status": 404}),
        (errors.RateLimited("x", retry_after=5), 429, {"code": "RATE_LIMITED", "retry_after": 5}),
        (errors.ServiceUnavailable(), 503, {"code": "SERVICE_UNAVAILABLE", "retry_after": 30, "error": "No ASR workers available"}),
    ],
)
def test_error_bodies_and_pickling(err, status, body):
    assert err.status == status
    assert body.items() <= err.to_body().items()
    assert isinstance(err.to_body()["error"], str)
    # Errors cross Ray handles by pickle: type, message and extra fields must survive.
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and copy.to_body() == err.to_body()


def test_retry_after_header():
    assert errors.ServiceUnavailable(retry_after=17).headers() == {"Retry-After": "17"}
    assert errors.RateLimited("x", retry_after=3).headers() == {"Retry-After": "3"}


def test_settings_from_environment(monkeypatch, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \nenv-key-a\n")
    monkeypatch.setenv("HARK_LICENSE_KEYS", "env-key-a, env-key-b")
    monkeypatch.setenv("HARK_LICENSE_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("HARK_ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("HARK_MAX_FILE_MB", "50")
    monkeypatch.setenv("HARK_MAX_DURATION_S", "600")
    monkeypatch.setenv("HARK_ASR__MODEL", "whisper-tiny.en")
    monkeypatch.setenv("HARK_ASR__COMPUTE_TYPE", "float32")
    monkeypatch.setenv("HARK_ASR__DEVICE", "cpu")
    monkeypatch.setenv("HARK_URL_ALLOWLIST", "10.1.0.0/16,127.0.0.1")
    monkeypatch.setenv("HARK_S3_ALLOW", "hark-audio, team.recordings/calls/2024/")
    s = Settings()
    assert [k.get_secret_value() for k in s.license_keys] == ["env-key-a", "env-key-b", "file-key-1", "file-key-2"]
    assert s.allow_private_urls is True
    assert s.max_file_mb == 50 and s.max_file_bytes == 50_000_000
    assert s.max_duration_s == 600
    assert (s.asr.model, s.asr.compute_type, s.asr.device) == ("whisper-tiny.en", "float32", "cpu")
    assert s.url_allowlist == ["10.1.0.0/16", "127.0.0.1"]
    assert s.s3_allow == ["hark-audio", "team.recordings/calls/2024/"]
    assert "env-key-a" not in repr(s) and "file-key-1" not in str(s)  # keys stay out of logs


def test_settings_defaults_and_overrides(monkeypatch):
    for name in ("HARK_LICENSE_KEYS", "HARK_ASR__MODEL", "HARK_MAX_FILE_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HARK_ASR__BEAM_SIZE", "2")
    s = Settings(max_file_mb=7, asr={"compute_type": "float32"})
    assert s.allow_private_urls is False and s.max_duration_s == 7200 and s.license_keys == []
    assert s.webhook_secret is None and s.webhook_secrets == {}
    assert s.s3_allow == []  # s3:// URLs from API callers are refused unless allowed
    assert s.max_file_mb == 7
    # Overrides merge with the environment, field by field, also in nested settings.
    assert s.asr.compute_type == "float32" and s.asr.beam_size == 2 and s.asr.model == "whisper-base"
    assert pickle.loads(pickle.dumps(s)) == s


def test_home_defaults_resolve_where_the_settings_are_used_not_where_the_app_was_built(monkeypatch, tmp_path):
    # Regression: `serve run` on a workstation baked the workstation's $HOME into data_dir and
    # model_cache_dir of every replica on the cluster.
    for name in ("HARK_DATA_DIR", "HARK_ASR__MODEL_CACHE_DIR", "HARK_DATABASE_URL", "HARK_BLOB_URL"):
        monkeypatch.delenv(name, raising=False)
    builder, node = tmp_path / "workstation", tmp_path / "node"
    monkeypatch.setenv("HOME", str(builder))
    shipped = pickle.dumps(Settings())  # built by the app builder, shipped to a replica (as Ray does)
    explicit = pickle.dumps(Settings(data_dir=tmp_path / "data", asr={"model_cache_dir": tmp_path / "models"}))
    monkeypatch.setenv("HOME", str(node))  # the replica's node
    there = pickle.loads(shipped)
    assert there.resolved_data_dir == node / ".local" / "share" / "hark"
    assert there.asr.resolved_model_cache_dir == node / ".cache" / "hark" / "models"
    assert there.job_database_url == f"sqlite:///{node}/.local/share/hark/jobs.sqlite3"
    assert there.job_blob_url == f"{node}/.local/share/hark/audio"
    # Set paths are kept as they were given.
    given = pickle.loads(explicit)
    assert given.resolved_data_dir == tmp_path / "data" and given.asr.resolved_model_cache_dir == tmp_path / "models"


def test_settings_reject_bad_values(monkeypatch):
    monkeypatch.setenv("HARK_URL_ALLOWLIST", "not-a-network")
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.delenv("HARK_URL_ALLOWLIST")
    for entry in ("s3://hark-audio", "Hark-Audio", "hark-audio/calls/../private", "hark-audio/a//b", "/calls"):
        with pytest.raises(ValueError):
            Settings(s3_allow=entry)


def test_keyring_schemes_and_refusals():
    ring = KeyRing(["alpha", "beta"])
    assert ring.authenticate("Token alpha") == key_id("alpha")
    assert ring.authenticate("Bearer beta") == key_id("beta")
    assert ring.authenticate("token  alpha ") == key_id("alpha")
    assert "alpha" not in key_id("alpha")
    for header in (None, "", "Token", "Basic alpha", "Token gamma", "Token alph", "alpha"):
        with pytest.raises(errors.Unauthorized):
            ring.authenticate(header)
    with pytest.raises(errors.Unauthorized):
        KeyRing([]).authenticate("Token anything")


def test_replica_logs_user_errors_in_one_line_and_faults_with_their_traceback(caplog):
    # Regression (review finding 17): Serve logs a replica's exceptions with their traceback.
    from deployments import BriefUserErrors

    logger = logging.getLogger("test.replica")
    logger.addFilter(BriefUserErrors())
    for exc in (errors.ForbiddenUrl("URL host '10.0.0.1' is not allowed"), errors.InvalidAudio("bad\nframe"),
                RuntimeError("a real fault"), errors.ServiceUnavailable()):
        try:
            raise exc
        except Exception:
            logger.exception("Request failed.")
    text = [caplog.handler.format(r) for r in caplog.records]
    assert "\n" not in text[0] and "FORBIDDEN_URL (403)" in text[0] and "10.0.0.1" in text[0]
    assert "\n" not in text[1] and "INVALID_AUDIO (400) bad frame" in text[1]
    assert [r.levelname for r in caplog.records[:2]] == ["WARNING", "WARNING"]
    assert "Traceback" in text[2] and "RuntimeError: a real fault" in text[2] and caplog.records[2].levelname == "ERROR"
    assert "Traceback" in text[3]  # 503: the service's fault, not the caller's


def test_a_replaced_interim_crosses_the_handle_as_an_answer_and_is_the_error_again_on_the_other_side():
    # Regression (#15): InterimSkipped is a 503 HarkError, so raised in the ASR replica it was
    # logged with its traceback for every interim that newer audio replaced.
    import asyncio

    from deployments.handles import HandleRecognizer
    from pipeline.asr.scheduler import InterimSkipped, Replaced
    from pipeline.core.types import AsrOptions, Audio

    class Method:
        def remote(self, audio, options):
            async def answer():
                return Replaced()
            return answer()

    class Handle:
        transcribe = Method()

    recognizer = HandleRecognizer(Handle(), retry_after_s=1)
    with pytest.raises(InterimSkipped):
        asyncio.run(recognizer.transcribe(Audio(np.zeros(160, np.float32)), AsrOptions(stream="s", interim=True)))


def test_per_key_webhook_secrets_from_the_keys_file_and_json(monkeypatch, tmp_path):
    from pipeline.service.auth import key_id

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# acme signs with its own secret\nacme-key webhook_secret=whsec_QUNNRQ==\nplain-key\n")
    monkeypatch.setenv("HARK_LICENSE_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("HARK_WEBHOOK_SECRET", "global-secret")
    monkeypatch.setenv("HARK_WEBHOOK_SECRETS", '{"json-key": "json-secret"}')
    s = Settings()
    assert [k.get_secret_value() for k in s.license_keys][-2:] == ["acme-key", "plain-key"]
    assert s.webhook_secret_for(key_id("acme-key")).get_secret_value() == "whsec_QUNNRQ=="
    assert s.webhook_secret_for(key_id("json-key")).get_secret_value() == "json-secret"
    assert s.webhook_secret_for(key_id("plain-key")).get_secret_value() == "global-secret"
    for secret in ("whsec_QUNNRQ==", "json-secret", "global-secret", "acme-key"):
        assert secret not in repr(s) and secret not in str(s) and secret not in s.model_dump_json()
    keys_file.write_text("acme-key webhook-secret=oops\n")
    with pytest.raises(ValueError, match="line 1: expected 'KEY' or 'KEY webhook_secret=SECRET'"):
        Settings()


def test_option_errors_do_not_echo_a_huge_value():
    """Regression (bad-input corpus): a 1 MB `language` form field came back whole in the error."""
    from pipeline.core.errors import InvalidParameter
    from pipeline.transcription.schemas import ListenParams

    with pytest.raises(InvalidParameter) as info:
        ListenParams.parse({"language": "e" * 1_000_000})
    assert info.value.extra == {"param": "language"} and len(info.value.message) < 200
