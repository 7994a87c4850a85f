"""Shared test set-up: offline, deterministic, small; a temporary HF_HOME so nothing touches a user cache."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:
    # removed when the session ends: every run made one more folder in the system's temporary directory
    _hf_home = tempfile.mkdtemp(prefix="medvlm-test-hf-")
    atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)
    os.environ["HF_HOME"] = _hf_home
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from medvlm.config import PhantomDataConfig  # noqa: E402
from medvlm.data.phantom import HNCPhantom, PhantomConfig  # noqa: E402
from medvlm.data.writer import write_phantom_dataset  # noqa: E402


@pytest.fixture(scope="session")
def phantom() -> HNCPhantom:
    """The demo grid (64^3 at 3 mm) with seed 0."""
    return HNCPhantom(PhantomConfig(), seed=0)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A written 10-case dataset on a small grid (shared, read-only for tests)."""
    out = tmp_path_factory.mktemp("phantom") / "ds"
    config = PhantomDataConfig(n_cases=10, seed=3, shape=(32, 32, 32), spacing_mm=(6.0, 6.0, 6.0),
                               validation_fraction=0.2, test_fraction=0.2, previews=1)
    write_phantom_dataset(out, config)
    return out
