"""Shared test set-up: built-in plugins only, paths to the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run with the built-ins only, whatever else is installed (read when plugins load).
os.environ["STX_LOAD_PLUGINS"] = "stx"
os.environ.pop("STX_DISABLE_PLUGINS", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.fail(f"real data folder {SHARED} is missing: tests expect ../shared beside the repo")
    return SHARED


@pytest.fixture
def fresh_registry():
    """Forget the cached registry before and after a test that changes plugin selection."""
    from stxcli.registry import get_registry

    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


def interrupt_input_digest(monkeypatch, at: int) -> dict:
    """Make ``stx featurize`` stop with Ctrl-C at the ``at``-th file handed over (the pipeline
    digests each input as its results are handed over). Returns the counter: set ``calls["n"]``
    past ``at`` to let later runs through, and read it to count the files they digest."""
    from stxcli import pipeline

    real = pipeline.input_digest
    calls = {"n": 0}

    def flaky(path, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(pipeline, "input_digest", flaky)
    return calls


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch at one thread for a module's tests (restored after): small models, exact numbers."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``stx ARGS`` in-process through the real error boundary; return (code, out, err)."""
    from stxcli.cli.main import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err
