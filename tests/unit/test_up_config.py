"""The laptop config `relais up` writes: kept across runs, with the demo password beside it."""

from __future__ import annotations

from pathlib import Path

from services.core.accounts import verify_password
from services.core.config import load_config
from services.up import DEMO_ACCOUNT, write_default_config


def test_the_config_and_its_demo_password_are_kept_across_runs(tmp_path: Path) -> None:
    path, password = write_default_config(tmp_path, 2600)
    account = load_config(str(path), env={}).accounts[DEMO_ACCOUNT]
    assert verify_password(password, account.password_hash)
    assert write_default_config(tmp_path, 2600) == (path, password)


def test_a_lost_password_file_does_not_replace_the_demo_password(tmp_path: Path) -> None:
    # NATS keeps the account with the first password's hash: a new password written into the
    # config would be printed, and refused.
    path, _ = write_default_config(tmp_path, 2600)
    text = path.read_text()
    (tmp_path / "demo-password.txt").unlink()
    assert write_default_config(tmp_path, 2600) == (path, "")
    assert path.read_text() == text
