"""Environment flags: one reading, so every part of clinadapt agrees on what a value means."""

import pytest

from clinadapt.data import medmnist
from clinadapt.env import env_flag
from clinadapt.errors import ConfigError
from clinadapt.models import _weights


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_env_flag_values(monkeypatch, value, expected):
    monkeypatch.setenv("CLINADAPT_TEST_FLAG", value)
    assert env_flag("CLINADAPT_TEST_FLAG") is expected


def test_env_flag_unset_and_unclear(monkeypatch):
    monkeypatch.delenv("CLINADAPT_TEST_FLAG", raising=False)
    assert env_flag("CLINADAPT_TEST_FLAG") is False
    assert env_flag("CLINADAPT_TEST_FLAG", default=True) is True
    monkeypatch.setenv("CLINADAPT_TEST_FLAG", "offline")
    with pytest.raises(ConfigError, match="CLINADAPT_TEST_FLAG='offline'"):
        env_flag("CLINADAPT_TEST_FLAG")


@pytest.mark.parametrize(("value", "offline"), [("false", False), ("0", False), ("true", True)])
def test_offline_flag_means_the_same_to_data_and_weights(monkeypatch, value, offline):
    """CLINADAPT_OFFLINE=false is online for the MedMNIST reader and the weights loader alike."""
    for var in _weights.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CLINADAPT_OFFLINE", value)
    probes = []

    def reachable(*args, **kwargs):  # stands in for the network: every probe succeeds
        probes.append(args)

        class Conn:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return Conn()

    monkeypatch.setattr(medmnist.socket, "create_connection", reachable)
    monkeypatch.setattr(_weights, "_probe", lambda host, port, timeout: True)
    _weights.reset_online_cache()
    assert medmnist.is_online() is (not offline)
    assert (_weights.offline_reason() is not None) is offline
    assert bool(probes) is (not offline)
