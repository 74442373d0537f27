"""Fetching members of a registry package (a small real wheel) into the cache."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from jax_ensemble.errors import DataError
from jax_ensemble.storage.packages import fetch_package_members

SIX_WHEEL_SHA256 = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"  # six==1.16.0, py2.py3 wheel


def fetch_six(tmp_path, **kwargs):
    members = {"six.py": tmp_path / "six" / "six.py", "six-1.16.0.dist-info/LICENSE": tmp_path / "six" / "LICENSE"}
    return fetch_package_members("six", "1.16.0", members, error=DataError, purpose="a test", size_mb=0, **kwargs)


def test_members_are_fetched_verified_and_reused_without_the_index(tmp_path, monkeypatch):
    files = fetch_six(tmp_path, archive_sha256=SIX_WHEEL_SHA256)
    source = files["six.py"].read_bytes()
    assert b"Utilities for writing code that runs on Python 2 and 3" in source
    assert files["six.py"].with_name("six.py.sha256").read_text() == hashlib.sha256(source).hexdigest()
    assert files["six-1.16.0.dist-info/LICENSE"].read_text().startswith("Copyright (c)")

    def no_network(*args, **kwargs):
        raise AssertionError("a cached member must not call pip")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_six(tmp_path, member_sha256={"six.py": hashlib.sha256(source).hexdigest()}) == files


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"archive_sha256": "0" * 64}, "six-1.16.0-py2.py3-none-any.whl has sha256"),
     ({"member_sha256": {"six.py": "0" * 64}}, "six.py from six==1.16.0 has sha256")],
)
def test_a_digest_mismatch_is_refused_and_nothing_is_left(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        fetch_six(tmp_path, **kwargs)
    assert not (tmp_path / "six" / "six.py").exists() and not (tmp_path / "six" / "LICENSE").exists()


def test_a_missing_member_is_one_clear_line(tmp_path):
    with pytest.raises(DataError, match="has no member 'six/nothing.py'"):
        fetch_package_members("six", "1.16.0", {"six/nothing.py": tmp_path / "x.py"}, error=DataError,
                              purpose="a test", size_mb=0)
