"""Configuration: every bad input gives exit 3 and a message naming the file, the key and why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statements import config
from statements.errors import ConfigError, ExitCode
from statements.passphrase import PassphraseSource, read_passphrase
from tests.clitools import Project

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "ibkr-statements.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    assert caught.value.exit_code == ExitCode.CONFIG
    message = str(caught.value)
    assert str(tmp_path / "config" / "ibkr-statements.toml") in message
    return message


def test_shipped_example_is_the_packaged_one() -> None:
    assert (REPO / "config" / "example.toml").read_text() == config.example_text()


def test_example_loads_with_every_documented_default(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, config.example_text()))
    assert cfg.home == tmp_path
    assert cfg.sftp.host == "xfer.interactivebrokers.com"
    assert cfg.sftp.port == 32
    assert cfg.sftp.patterns == ("*.pgp", "*.gpg", "*.asc")
    assert (cfg.sftp.timeout_s, cfg.sftp.retries, cfg.sftp.workers) == (30, 3, 4)
    assert cfg.sftp.delete_after_archive is False
    assert cfg.archive.keep_encrypted is True
    assert cfg.schedule.days == ("tue", "wed", "thu", "fri", "sat")
    assert cfg.request.to == "filedelivery@interactivebrokers.com"
    # The example states every default the models have: loading an empty file is the same.
    assert config.load(write(tmp_path, "")).model_dump() == cfg.model_dump()


def test_relative_paths_resolve_against_home_even_for_absent_sections(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""))
    assert cfg.sftp.key_file == tmp_path / "keys" / "ibkr_rsa"
    assert cfg.sftp.known_hosts == tmp_path / "keys" / "known_hosts"
    assert cfg.pgp.gnupg_home == tmp_path / "keys" / "gnupg"
    assert cfg.archive.root == tmp_path / "archive"


def test_home_is_relative_to_the_config_folder_and_absolute_paths_stay(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    cfg = config.load(
        write(tmp_path, 'home = "../elsewhere"\n[archive]\nroot = "/srv/statements"\n')
    )
    assert cfg.home == tmp_path / "elsewhere"
    assert cfg.sftp.key_file == tmp_path / "elsewhere" / "keys" / "ibkr_rsa"
    assert cfg.archive.root == Path("/srv/statements")


@pytest.mark.parametrize(
    ("toml", "where", "expected"),
    [
        ('[sftp]\nport = "32"\n', "[sftp] port", "valid integer"),
        ("[sftp]\nport = 0\n", "[sftp] port", "greater than or equal to 1"),
        ("[sftp]\nport = 70000\n", "[sftp] port", "less than or equal to 65535"),
        ('[sftp]\nretries = "three"\n', "[sftp] retries", "valid integer"),
        ("[sftp]\nworkers = 0\n", "[sftp] workers", "greater than or equal to 1"),
        ('[sftp]\ntimeout_s = "30s"\n', "[sftp] timeout_s", "valid number"),
        ('[sftp]\ndelete_after_archive = "yes"\n', "[sftp] delete_after_archive", "boolean"),
        ('[sftp]\npatterns = "*.pgp"\n', "[sftp] patterns", "valid array"),
        ("[sftp]\npatterns = []\n", "[sftp] patterns", "at least one"),
        ("[sftp]\nkey_file = 5\n", "[sftp] key_file", "path"),
        ('[sftp]\nhots = "x"\n', "[sftp] hots", "unknown key"),
        ('[pgp]\nsigner_fingerprints = ["ABC"]\n', "[pgp] signer_fingerprints", "40-hex"),
        ("[archive]\nmax_ratio = 1\n", "[archive] max_ratio", "greater than 1"),
        ('[schedule]\nat = "6:30pm"\n', "[schedule] at", "HH:MM"),
        ('[schedule]\ntimezone = "Mars/Olympus"\n', "[schedule] timezone", "IANA"),
        ('[schedule]\ndays = ["funday"]\n', "[schedule] days", "mon, tue"),
        ('[notify.email]\nsmtp_host = "x"\n', "[notify.email] from_address", "missing"),
        ('[notify.webhook]\nurl = "ftp://x"\n', "[notify.webhook] url", "http"),
        ('[request]\naccount_last4 = "12345"\n', "[request] account_last4", "last four"),
        ('[request]\negress_ip = "not-an-ip"\n', "[request] egress_ip", "IPv4"),
        ("[bogus]\nx = 1\n", "[bogus]", "unknown section"),
        ("nonsense = 1\n", "nonsense", "unknown key"),
    ],
)
def test_each_bad_value_names_file_key_and_expectation(
    tmp_path: Path, toml: str, where: str, expected: str
) -> None:
    message = problem(tmp_path, toml)
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(where)), None)
    assert line is not None, message
    assert expected in line, message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = problem(tmp_path, '[sftp]\nport = "x"\nworkers = 0\n[pgp]\nnope = 1\n')
    assert "3 problem(s)" in message


@pytest.mark.parametrize(
    "toml",
    [
        '[sftp]\nkey_passphrase = "hunter2"\n',
        '[pgp]\npassphrase = "hunter2"\n',
        '[notify.email]\npassword = "hunter2"\n',
    ],
)
def test_a_secret_in_the_file_is_refused_and_never_echoed(tmp_path: Path, toml: str) -> None:
    message = problem(tmp_path, toml)
    assert "secrets never go into the configuration file" in message
    assert "environment variable" in message
    assert "hunter2" not in message


def test_invalid_toml_and_missing_file_and_missing_home(tmp_path: Path) -> None:
    assert "not valid TOML" in problem(tmp_path, "[sftp\n")
    with pytest.raises(ConfigError, match="ibkr-statements init"):
        config.load(tmp_path / "nope.toml")
    assert "does not exist" in problem(tmp_path, 'home = "../missing"\n')


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert config.config_path(None) == Path("config/ibkr-statements.toml")
    monkeypatch.setenv(config.CONFIG_ENV, "/etc/x.toml")
    assert config.config_path(None) == Path("/etc/x.toml")
    assert config.config_path(Path("a.toml")) == Path("a.toml")


def test_passphrase_env_wins_then_file_which_must_be_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "pass"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    source = PassphraseSource("SSH key", "TEST_PASS_ENV", secret_file)
    monkeypatch.delenv("TEST_PASS_ENV", raising=False)
    assert read_passphrase(source) == "from-file"
    monkeypatch.setenv("TEST_PASS_ENV", "from-env")
    assert read_passphrase(source) == "from-env"
    monkeypatch.delenv("TEST_PASS_ENV")
    os.chmod(secret_file, 0o644)
    with pytest.raises(ConfigError.__mro__[1], match="chmod 600"):
        read_passphrase(source)


@pytest.mark.integration
def test_cli_bad_config_exits_3_with_message(empty_project: Project) -> None:
    empty_project.config.write_text('[sftp]\nport = "thirty-two"\n')
    result = empty_project.run("keys", "show")
    assert result.returncode == 3
    assert "[sftp] port" in result.stderr
    assert str(empty_project.config) in result.stderr


@pytest.mark.integration
def test_cli_init_refuses_to_overwrite(empty_project: Project) -> None:
    before = empty_project.config.read_text()
    result = empty_project.run("init")
    assert result.returncode == 2
    assert "never overwrites" in result.stderr
    assert empty_project.config.read_text() == before
    assert oct(empty_project.keys.stat().st_mode & 0o777) == "0o700"


@pytest.mark.integration
def test_cli_prints_a_folder_name_as_it_is(tmp_path: Path) -> None:
    # rich would turn ":smile:" into an emoji: the user must see the real path to find it.
    project = Project(tmp_path / "reports:smile:2026")
    project.root.mkdir()
    result = project.run("init")
    assert result.returncode == 0, result.stderr
    assert f"Project folder: {project.root};" in result.stdout
    assert "\N{SMILING FACE WITH OPEN MOUTH AND SMILING EYES}" not in result.stdout
