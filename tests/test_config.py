from pathlib import Path

import pytest

from smartpush.config import load_config
from smartpush.errors import ConfigError
from smartpush.provider import SmsProviderOptions


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_defaults_when_there_is_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.source == "(embedded defaults)"
    assert list(config.accounts) == ["outbox"]
    assert config.settings.broker is None and config.settings.database is None
    assert config.project_dir == tmp_path


def test_env_expansion_and_secret_never_printed(tmp_path: Path) -> None:
    path = write(tmp_path, "secret_key: ${SP_KEY}\nbroker: ${BROKER:-redis://localhost:6379/0}\n")
    config = load_config(path, env={"SP_KEY": "s3cr3t-value"})
    assert config.settings.broker == "redis://localhost:6379/0"
    assert config.secret_key() == b"s3cr3t-value"
    assert "s3cr3t-value" not in repr(config.settings)
    assert "s3cr3t-value" not in str(config.settings.model_dump())
    assert config.warnings == []


def test_missing_env_var_names_it_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  out:\n    type: outbox\n    sender: ${SMS_SENDER}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    (problem,) = exc.value.problems
    assert "SMS_SENDER" in problem.message
    assert problem.line == 4
    assert problem.field == "providers.out.sender"


def test_literal_secret_gets_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "secret_key: hunter2hunter2\n")
    config = load_config(path, env={})
    assert any("secret_key" in w.message for w in config.warnings)
    assert all("hunter2" not in str(w) for w in config.warnings)


def test_env_overrides_broker_and_database(tmp_path: Path) -> None:
    path = write(tmp_path, "broker: redis://a\n")
    config = load_config(
        path, env={"SMARTPUSH_BROKER_URL": "redis://b", "SMARTPUSH_DATABASE_URL": "postgresql://x"}
    )
    assert config.settings.broker == "redis://b"
    assert config.settings.database == "postgresql://x"


def test_provider_options_validated_against_the_driver(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "providers:\n  out:\n    type: outbox\n    rate: 100/s\n    pth: ./x\n    sender: 'A B'\n"
        "  other:\n    type: twillio\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    messages = {p.field: (p.line, p.message) for p in exc.value.problems}
    assert messages["providers.out.pth"][0] == 5
    assert "did you mean 'path'" in messages["providers.out.pth"][1]
    assert messages["providers.out.sender"][0] == 6
    assert "3 to 11" in messages["providers.out.sender"][1]
    assert "unknown provider type 'twillio'" in messages["providers.other.type"][1]


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "brokr: redis://x\ntimezone: Europe/Pariss\nregion: XX\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    text = str(exc.value)
    assert "did you mean 'broker'" in text
    assert "Europe/Pariss' is not a time zone" in text
    assert "'XX' is not a region code" in text
    assert [p.line for p in exc.value.problems] == [1, 2, 3]


def test_sms_account_options_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "providers:\n  out:\n    type: outbox\n    rate: 6000/min\n    daily_quota: 250000\n"
        "    price_per_part: 0.045\n    rate_unit: parts\n    sender: '36111'\n",
    )
    options = load_config(path, env={}).accounts["out"]
    assert isinstance(options, SmsProviderOptions)
    assert options.messages_per_second == 100
    assert options.rate_unit == "parts"
    assert str(options.price_per_part) == "0.045"


@pytest.mark.parametrize("sender", ["12345678", "AMELI 2", "Sécu", "AB", "ABCDEFGHIJKL"])
def test_bad_senders(tmp_path: Path, sender: str) -> None:
    path = write(tmp_path, f"providers:\n  out:\n    type: outbox\n    sender: '{sender}'\n")
    with pytest.raises(ConfigError, match="sender"):
        load_config(path, env={})


def test_secret_key_is_made_once_and_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "region: FR\n")
    config = load_config(path, env={})
    first = config.secret_key()
    assert len(first) >= 32
    assert load_config(path, env={}).secret_key() == first
    assert (tmp_path / ".smartpush" / "secret_key").stat().st_mode & 0o077 == 0
