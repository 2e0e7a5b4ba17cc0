"""Plugin loading: provenance, broken plugins, misspelled hooks, duplicates, selection."""

from __future__ import annotations

import json
import types
from importlib.metadata import EntryPoint

import pytest

from stxcli import plugins as P
from stxcli.errors import PluginError
from stxcli.hookspecs import hookimpl
from stxcli.registry import Registry

from conftest import run_cli

BUILTIN_READERS = {"lamost", "desi", "fits1d"}


def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


class _Reader:
    priority = 10
    extensions = (".fits",)
    description = "test reader"
    version = "1.0"

    def __init__(self, name: str) -> None:
        self.name = name

    def identify(self, probe):
        return False

    def read(self, path, **kw):
        return iter(())


def _info(name: str, dist: str = "thirdparty") -> P.PluginInfo:
    return P.PluginInfo(name=name, module=name, distribution=dist, version="9.9")


def test_builtins_are_entry_points_of_the_stx_distribution(fresh_registry):
    ps = P.load_plugins()
    ours = {i.name: i for i in ps.infos.values() if i.distribution == "stx"}
    assert {"reader-lamost", "reader-desi", "reader-fits1d", "featurizer-raw"} <= set(ours)
    reg = Registry(ps)
    assert BUILTIN_READERS <= set(reg.names("reader"))
    assert reg.items["reader"]["desi"].plugin.distribution == "stx"


def test_duplicate_name_is_an_error_naming_both(fresh_registry):
    a = _module("a", register_readers=lambda register: register(_Reader("dup")))
    b = _module("b", register_readers=lambda register: register(_Reader("dup")))
    ps = P.load_plugins(extra=[(_info("plug-a", "dist-a"), a), (_info("plug-b", "dist-b"), b)])
    with pytest.raises(PluginError) as exc:
        Registry(ps)
    msg = str(exc.value)
    assert "dup" in msg and "dist-a" in msg and "dist-b" in msg


def test_misspelled_hook_marks_plugin_broken(fresh_registry):
    bad = _module("bad", register_reader=lambda register: None)  # missing 's'
    ps = P.load_plugins(extra=[(_info("typo"), bad)])
    assert ps.infos["typo"].status == "broken"
    assert "register_reader" in ps.infos["typo"].error
    # the rest still works
    assert "desi" in Registry(ps).names("reader")


def test_import_failure_is_broken_not_fatal(monkeypatch, fresh_registry, capsys):
    real = P.entry_points

    def fake(group):
        return list(real(group=group)) + [EntryPoint("broken-one", "no_such_module_xyz", "stx")]

    monkeypatch.setattr(P, "entry_points", fake)
    monkeypatch.setenv("STX_LOAD_PLUGINS", "stx,broken-one")
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    broken = [r for r in rows if r["plugin"] == "broken-one"]
    assert broken and broken[0]["status"] == "broken"
    assert "no_such_module_xyz" in broken[0]["error"]


def test_disable_and_load_selection(monkeypatch, fresh_registry):
    monkeypatch.setenv("STX_DISABLE_PLUGINS", "reader-desi")
    ps = P.load_plugins()
    assert ps.infos["reader-desi"].status == "disabled"
    assert "desi" not in Registry(ps).names("reader")
    monkeypatch.delenv("STX_DISABLE_PLUGINS")
    monkeypatch.setenv("STX_LOAD_PLUGINS", "reader-lamost")
    ps = P.load_plugins()
    assert Registry(ps).names("reader") == ["lamost"]


def test_hook_that_raises_marks_plugin_broken(fresh_registry):
    def boom(register):
        raise RuntimeError("kaput")

    ps = P.load_plugins(extra=[(_info("boom"), _module("boom", register_heads=boom))])
    Registry(ps)
    assert ps.infos["boom"].status == "broken" and "kaput" in ps.infos["boom"].error


def test_plugins_json_lists_builtins(capsys, fresh_registry):
    code, out, err = run_cli(["plugins", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    ok = {(r["kind"], r["name"]) for r in rows if r["status"] == "ok"}
    assert {("reader", n) for n in BUILTIN_READERS} <= ok
    assert ("featurizer", "raw") in ok
    for r in rows:
        assert set(r) >= {"kind", "name", "distribution", "version", "status"}


def test_help_and_plugins_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from stxcli.cli.main import main; "
            "rc = main(['plugins', '--json']); main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")
