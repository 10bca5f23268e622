"""`doctor`'s checks against a real OpenSSH sshd, the in-process sandbox and the real gpg."""

from __future__ import annotations

import shutil
import socket
import stat
from pathlib import Path

import pytest

from statements import doctor
from statements.doctor import CHECK_NAMES, Check, exit_code, run_checks
from statements.hostkeys import KnownHosts
from statements.keys.pgp import export_public_key, generate_pgp_key
from statements.keys.ssh import fingerprint_of_line
from statements.ledger import Ledger
from statements.remote import SftpSettings, alternative_advice
from statements.sandbox import Faults, SandboxServer, generate_ed25519_key
from tests.clitools import PGP_PASSPHRASE, SSH_PASSPHRASE, Project
from tests.sshd import SshdServer

pytestmark = pytest.mark.integration

REPORT = "U1234567.Trade_History.20260901.20260901.xml.pgp"


def write_config(
    project: Project,
    *,
    host: str,
    port: int,
    username: str,
    remote_dir: str,
    sftp_extra: str = "",
    extra: str = "",
) -> None:
    """Replace the project's config with one pointing at a test server (timeout 3 s)."""
    project.config.write_text(
        f'[sftp]\nhost = "{host}"\nport = {port}\nusername = "{username}"\n'
        f'remote_dir = "{remote_dir}"\ntimeout_s = 3\nretries = 0\n{sftp_extra}{extra}'
    )


def use_sshd(project: Project, sshd: SshdServer, remote_dir: Path | str, **kwargs: str) -> None:
    """Log in with the sshd's client key (authorized there) and pin its host keys."""
    key = project.keys / "ibkr_rsa"
    shutil.copy(sshd.client_key_path, key)
    key.chmod(0o600)
    (project.keys / "ibkr_rsa.pub").write_text(sshd.client_public_line + "\n")
    shutil.copy(sshd.known_hosts_path, project.keys / "known_hosts")
    write_config(
        project,
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        remote_dir=str(remote_dir),
        **kwargs,
    )


@pytest.fixture
def sshd_env(monkeypatch: pytest.MonkeyPatch, sshd: SshdServer) -> None:
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", sshd.client_key_passphrase)
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)


def by_name(checks: list[Check]) -> dict[str, Check]:
    assert [c.name for c in checks] == list(CHECK_NAMES)
    return {c.name: c for c in checks}


def assert_skipped(checks: dict[str, Check], names: tuple[str, ...]) -> None:
    for name in names:
        assert checks[name].state == "skipped", checks[name]
        assert checks[name].detail.startswith("needs ")
        assert checks[name].exit_code == 0


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- everything fine ---------------------------------------------------------------------------


@pytest.mark.usefixtures("sshd_env")
def test_all_ok_against_real_sshd(project: Project, sshd: SshdServer, sftp_dir: Path) -> None:
    (sftp_dir / REPORT).write_bytes(b"ciphertext")
    (sftp_dir / "notes.txt").write_text("not a report")
    Ledger.open(project.root / "archive").close()
    streamed: list[Check] = []
    use_sshd(project, sshd, sftp_dir)

    checks = run_checks(project.config, on_check=streamed.append)

    assert streamed == checks
    found = by_name(checks)
    assert {c.name: c.state for c in checks} == dict.fromkeys(CHECK_NAMES, "ok")
    assert exit_code(checks) == 0
    assert all(c.fix is None and c.exit_code == 0 for c in checks)
    assert "127.0.0.1" in found["dns"].detail
    assert f"127.0.0.1:{sshd.port}" in found["tcp"].detail
    assert "this machine's view" in found["tcp"].detail
    assert any(fp in found["host key"].detail for fp in sshd.host_key_fingerprints)
    assert fingerprint_of_line(sshd.client_public_line) in found["login"].detail
    assert "lists 1 file matching" in found["remote folder"].detail
    assert "IBKR_SSH_PASSPHRASE" in found["ssh key"].detail
    assert "round trip" in found["pgp passphrase"].detail
    assert "schema" in found["ledger"].detail


# --- the network path, step by step ------------------------------------------------------------


@pytest.mark.usefixtures("sshd_env")
def test_closed_port_fails_tcp_with_ibkrs_causes_and_skips_the_rest(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir)
    write_config(
        project, host="127.0.0.1", port=closed_port(), username="u", remote_dir=str(sftp_dir)
    )

    checks = run_checks(project.config)

    found = by_name(checks)
    assert found["dns"].state == "ok"
    tcp = found["tcp"]
    assert tcp.state == "failed" and tcp.exit_code == 4
    assert "refused" in tcp.detail
    assert tcp.fix is not None
    for cause in ("firewall", "antivirus", "TCP port", "public IP", "whitelisted"):
        assert cause in tcp.fix
    assert "ftp2.interactivebrokers.com:22" in tcp.fix and '"outgoing"' in tcp.fix
    assert_skipped(found, ("ssh handshake", "host key", "login", "remote folder"))
    assert found["archive"].state == "ok"  # local checks after the network still run
    assert exit_code(checks) == 4


def test_the_alternative_endpoint_is_not_suggested_to_those_who_use_it() -> None:
    def settings(host: str, port: int) -> SftpSettings:
        return SftpSettings(host, port, "u", KnownHosts(Path("known_hosts"), ()))

    assert "ftp2.interactivebrokers.com:22" in alternative_advice(
        settings("xfer.interactivebrokers.com", 32)
    )
    assert alternative_advice(settings("ftp2.interactivebrokers.com", 22)) == ""


@pytest.mark.usefixtures("sshd_env")
def test_dns_failure_fails_dns_and_skips_the_connection(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir)
    write_config(project, host="nonexistent.invalid", port=32, username="u", remote_dir=".")

    checks = run_checks(project.config)

    found = by_name(checks)
    assert found["dns"].state == "failed" and found["dns"].exit_code == 4
    assert "nonexistent.invalid" in found["dns"].detail
    assert found["dns"].fix is not None and "getent hosts nonexistent.invalid" in found["dns"].fix
    assert_skipped(found, ("tcp", "ssh handshake", "host key", "login", "remote folder"))
    assert exit_code(checks) == 4


@pytest.mark.usefixtures("sshd_env")
def test_changed_host_key_fails_with_both_fingerprints(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir)
    impostor = generate_ed25519_key()
    (project.keys / "known_hosts").write_text(
        f"[{sshd.host}]:{sshd.port} ssh-ed25519 {impostor.get_base64()}\n"
    )
    pinned = fingerprint_of_line(f"ssh-ed25519 {impostor.get_base64()}")

    checks = run_checks(project.config)

    found = by_name(checks)
    assert found["ssh handshake"].state == "ok"
    host_key = found["host key"]
    assert host_key.state == "failed" and host_key.exit_code == 4
    assert "HOST KEY CHANGED" in host_key.detail
    assert pinned in host_key.detail
    assert any(fp in host_key.detail for fp in sshd.host_key_fingerprints)
    assert_skipped(found, ("login", "remote folder"))
    assert exit_code(checks) == 4


@pytest.mark.usefixtures("sshd_env")
def test_unknown_host_key_fails_with_the_trust_host_command(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir)
    (project.keys / "known_hosts").write_text("")

    found = by_name(run_checks(project.config))

    host_key = found["host key"]
    assert host_key.state == "failed" and host_key.exit_code == 4
    assert host_key.fix is not None
    offered = host_key.fix.split("ibkr-statements trust-host --fingerprint ")[1].split()[0]
    assert offered in sshd.host_key_fingerprints
    assert_skipped(found, ("login", "remote folder"))


@pytest.mark.usefixtures("sshd_env")
def test_unauthorized_key_fails_login_with_our_fingerprint(
    project: Project, sshd: SshdServer, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = fingerprint_of_line((project.keys / "ibkr_rsa.pub").read_text())
    key, public = (project.keys / "ibkr_rsa").read_bytes(), (project.keys / "ibkr_rsa.pub")
    public_line = public.read_text()
    use_sshd(project, sshd, sftp_dir)
    # Back to the project's own pair, which sshd's authorized_keys does not hold.
    (project.keys / "ibkr_rsa").write_bytes(key)
    public.write_text(public_line)
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", SSH_PASSPHRASE)

    checks = run_checks(project.config)

    found = by_name(checks)
    assert found["ssh key"].state == "ok" and found["host key"].state == "ok"
    login = found["login"]
    assert login.state == "failed" and login.exit_code == 4
    assert "refused our key" in login.detail and ours in login.detail
    assert login.fix is not None
    assert "username" in login.fix and "make and send a new pair" in login.fix
    assert_skipped(found, ("remote folder",))
    assert exit_code(checks) == 4


@pytest.mark.usefixtures("sshd_env")
def test_missing_remote_folder_fails_and_shows_the_login_folder(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir / "outgoing")

    checks = run_checks(project.config)

    folder = by_name(checks)["remote folder"]
    assert folder.state == "failed" and folder.exit_code == 4
    assert "outgoing" in folder.detail
    assert folder.fix is not None and "remote_dir" in folder.fix and "'outgoing'" in folder.fix
    assert exit_code(checks) == 4


@pytest.mark.usefixtures("sshd_env")
def test_files_that_match_no_pattern_give_a_warning_naming_them(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    (sftp_dir / "x.pgp").write_bytes(b"ciphertext")
    (sftp_dir / "y.pgp").write_bytes(b"ciphertext")
    use_sshd(project, sshd, sftp_dir, sftp_extra='patterns = ["*.gpg"]\n')

    checks = run_checks(project.config)

    folder = by_name(checks)["remote folder"]
    assert folder.state == "warning"
    assert "none match *.gpg" in folder.detail
    assert "x.pgp" in folder.detail and "y.pgp" in folder.detail
    assert folder.fix is not None and "[sftp] patterns" in folder.fix
    assert exit_code(checks) == 0


@pytest.mark.usefixtures("sshd_env")
def test_an_empty_folder_is_ok(project: Project, sshd: SshdServer, sftp_dir: Path) -> None:
    use_sshd(project, sshd, sftp_dir)

    folder = by_name(run_checks(project.config))["remote folder"]

    assert folder.state == "ok" and "is empty" in folder.detail


def test_a_stalled_server_fails_the_handshake_within_the_timeout(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", SSH_PASSPHRASE)
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)
    root = tmp_path / "served"
    root.mkdir()
    public = (project.keys / "ibkr_rsa.pub").read_text()
    with SandboxServer(
        root, authorized_keys=[public], username="demo", faults=Faults(half_banner=True)
    ) as server:
        (project.keys / "known_hosts").write_text(server.host_key_line() + "\n")
        write_config(project, host=server.host, port=server.port, username="demo", remote_dir=".")
        checks = run_checks(project.config)

    found = by_name(checks)
    assert found["tcp"].state == "ok"
    handshake = found["ssh handshake"]
    assert handshake.state == "failed" and handshake.exit_code == 4
    assert "no SSH handshake" in handshake.detail
    assert handshake.fix is not None and "port" in handshake.fix
    assert_skipped(found, ("host key", "login", "remote folder"))


# --- keys and passphrases ----------------------------------------------------------------------


@pytest.mark.usefixtures("sshd_env")
def test_a_key_readable_by_others_fails_with_the_chmod_fix(
    project: Project, sshd: SshdServer, sftp_dir: Path
) -> None:
    use_sshd(project, sshd, sftp_dir)
    key = project.keys / "ibkr_rsa"
    key.chmod(0o644)

    checks = run_checks(project.config)

    found = by_name(checks)
    ssh_key = found["ssh key"]
    assert ssh_key.state == "failed" and ssh_key.exit_code == 3
    assert "0644" in ssh_key.detail and "readable by other users" in ssh_key.detail
    assert ssh_key.fix == f"Run: chmod 600 {key}"
    assert found["host key"].state == "ok"  # the server side is still checked
    assert_skipped(found, ("login", "remote folder"))
    assert exit_code(checks) == 3
    assert stat.S_IMODE(key.stat().st_mode) == 0o644  # doctor explains, it does not change


@pytest.mark.usefixtures("sshd_env")
def test_wrong_ssh_passphrase_fails(
    project: Project, sshd: SshdServer, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sshd(project, sshd, sftp_dir)
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", "not the passphrase")

    checks = run_checks(project.config)

    ssh_key = by_name(checks)["ssh key"]
    assert ssh_key.state == "failed" and ssh_key.exit_code == 3
    assert "Wrong passphrase" in ssh_key.detail
    assert "not the passphrase" not in f"{ssh_key.detail} {ssh_key.fix}"
    assert exit_code(checks) == 3


@pytest.mark.usefixtures("sshd_env")
def test_missing_ssh_passphrase_names_the_configured_variable(
    project: Project, sshd: SshdServer, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sshd(project, sshd, sftp_dir, sftp_extra='key_passphrase_env = "OUR_SSH_PASS"\n')
    monkeypatch.delenv("OUR_SSH_PASS", raising=False)

    ssh_key = by_name(run_checks(project.config))["ssh key"]

    assert ssh_key.state == "failed" and ssh_key.exit_code == 3
    assert "protected by a passphrase" in ssh_key.detail
    assert ssh_key.fix is not None and "OUR_SSH_PASS" in ssh_key.fix


@pytest.mark.usefixtures("sshd_env")
def test_wrong_pgp_passphrase_fails_and_a_missing_one_warns(
    project: Project, sshd: SshdServer, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_sshd(project, sshd, sftp_dir)
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", "not the pgp passphrase")

    wrong = run_checks(project.config)

    check = by_name(wrong)["pgp passphrase"]
    assert check.state == "failed" and check.exit_code == 3
    assert "IBKR_PGP_PASSPHRASE" in check.detail
    assert "not the pgp passphrase" not in f"{check.detail} {check.fix}"
    assert exit_code(wrong) == 3

    monkeypatch.delenv("IBKR_PGP_PASSPHRASE")
    missing = run_checks(project.config)

    check = by_name(missing)["pgp passphrase"]
    assert check.state == "warning" and "Fetching works" in check.detail
    assert check.fix is not None and "IBKR_PGP_PASSPHRASE" in check.fix
    assert exit_code(missing) == 0


@pytest.mark.usefixtures("sshd_env")
def test_a_pgp_key_expiring_soon_warns(project: Project, sshd: SshdServer, sftp_dir: Path) -> None:
    use_sshd(project, sshd, sftp_dir)
    home = project.keys / "gnupg"
    soon = generate_pgp_key(
        home,
        name="Test User",
        email="soon@example.com",
        bits=2048,
        expire_days=10,
        passphrase=PGP_PASSPHRASE,
    )
    export_public_key(home, soon.fingerprint, project.keys / "pgp-public.asc")

    checks = run_checks(project.config)

    check = by_name(checks)["pgp secret key"]
    assert check.state == "warning", check
    assert soon.fingerprint in check.detail and "expires" in check.detail
    assert check.fix is not None and "--quick-set-expire" in check.fix
    assert by_name(checks)["pgp passphrase"].state == "ok"
    assert exit_code(checks) == 0


def test_no_gnupg_home_fails_and_skips_the_pgp_checks(project: Project) -> None:
    shutil.rmtree(project.keys / "gnupg")
    write_config(project, host="nonexistent.invalid", port=32, username="u", remote_dir=".")

    found = by_name(run_checks(project.config))

    assert found["gnupg home"].state == "failed" and found["gnupg home"].exit_code == 3
    assert found["gnupg home"].fix is not None and "keys pgp" in found["gnupg home"].fix
    assert_skipped(found, ("pgp secret key", "pgp passphrase"))


# --- configuration -----------------------------------------------------------------------------


def test_broken_config_fails_and_skips_everything_else(project: Project) -> None:
    project.config.write_text('[sftp]\nhost = "h"\nportt = 22\n')
    streamed: list[Check] = []

    checks = run_checks(project.config, on_check=streamed.append)

    assert streamed == checks
    found = by_name(checks)
    assert found["config"].state == "failed" and found["config"].exit_code == 3
    assert "portt" in found["config"].detail and "unknown key" in found["config"].detail
    assert found["config"].fix is not None
    for name in CHECK_NAMES[1:]:
        assert found[name].state == "skipped"
        assert found[name].detail == "needs a valid configuration"
    assert exit_code(checks) == 3


def test_empty_username_fails_config_but_local_checks_run(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IBKR_SSH_PASSPHRASE", SSH_PASSPHRASE)
    monkeypatch.setenv("IBKR_PGP_PASSPHRASE", PGP_PASSPHRASE)
    write_config(project, host="127.0.0.1", port=22, username="", remote_dir=".")

    checks = run_checks(project.config)

    found = by_name(checks)
    assert found["config"].state == "failed" and "username" in found["config"].detail
    assert found["ssh key"].state == "ok" and found["pgp passphrase"].state == "ok"
    assert_skipped(found, ("dns", "tcp", "ssh handshake", "host key", "login", "remote folder"))
    assert exit_code(checks) == 3


def test_exit_code_is_the_first_failures() -> None:
    def check(state: str, code: int) -> Check:
        return Check("x", state, "", None, code)

    assert exit_code([]) == 0
    assert exit_code([check(doctor.OK, 0), check(doctor.WARNING, 0)]) == 0
    assert exit_code([check(doctor.SKIPPED, 0), check(doctor.FAILED, 4), check("failed", 3)]) == 4
