import os

import pytest

# Tests never reach a hub: loaders must fail fast or use local files.
os.environ.setdefault("CLINADAPT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CLINADAPT_QUIET", "1")


@pytest.fixture(scope="session")
def small_shift():
    """A small built-in clinical-shift dataset shared by tests (deterministic)."""
    from clinadapt.data.synthetic import make_clinical_shift

    return make_clinical_shift(seed=0, patients_per_site=40)
