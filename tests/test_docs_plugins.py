"""docs/plugins.md cannot drift from the contract: its hook signatures, spec field tables,
Processor methods, contract version, switches and example plugin are checked against the
code. No Ray is started."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types

import pytest
import yaml
from trainyard import hookspecs, plugins
from trainyard.config import load_config, resolve
from trainyard.conformance import assert_conforms

from tests.conftest import ROOT

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib
from tests.helpers_plugins import plugin_registered, unique

DOC = (ROOT / "docs" / "plugins.md").read_text()
SPECS = [hookspecs.ModelSpec, hookspecs.DatasetSpec, hookspecs.MetricSpec, hookspecs.DataInfo,
         hookspecs.LoadedData, hookspecs.StreamingData, hookspecs.Split]


def section(heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\n", DOC, re.MULTILINE)
    assert match, f"docs/plugins.md has no heading {heading!r}"
    level = len(match.group(1))
    rest = DOC[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def signature_line(name: str, fn) -> str:
    """``def name(arg: Type, ...) -> Return:`` as the source writes it."""
    sig = inspect.signature(fn)
    args = ", ".join(p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {p.annotation}"
                     for p in sig.parameters.values())
    returns = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"def {name}({args}){returns}:"


def documented_signatures(heading: str) -> dict[str, str]:
    """The ``def`` lines of the first python block under ``heading``."""
    lines = [line.strip() for line in blocks(section(heading), "python")[0].splitlines()]
    return {re.match(r"def (\w+)\(", line).group(1): line for line in lines
            if re.match(r"def \w+\(.*\).*:$", line)}


def table_rows(text: str) -> list[list[str]]:
    """Rows of the first markdown table in ``text`` (header and rule dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return cells[2:]


def test_every_hook_is_documented_with_its_exact_signature():
    documented = documented_signatures("Hooks")
    hooks = plugins.describe_hooks()
    assert set(documented) == set(hooks) == set(plugins.hook_names())
    for name, spec in hooks.items():
        assert documented[name] == signature_line(name, spec)
        for arg in inspect.signature(spec).parameters:
            assert f"`{arg}`" in section("Hooks"), (name, arg)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.__name__)
def test_every_spec_field_is_in_its_table_with_its_type_and_default(spec):
    rows = table_rows(section(spec.__name__))
    fields = dataclasses.fields(spec)
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in fields]
    for row, f in zip(rows, fields, strict=True):
        assert row[1] == f"`{f.type}`", f.name
        if f.default is not dataclasses.MISSING:
            default = f.default.__name__ if isinstance(f.default, type) else repr(f.default)
            assert row[2] == f"`{default}`".replace("'", '"'), f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert row[2] == f"`{f.default_factory()!r}`", f.name
        else:
            assert row[2] == "required", f.name
        assert row[3], f"{spec.__name__}.{f.name} has no explanation"


def test_processor_methods_are_documented_with_their_signatures_and_in_the_table():
    documented = documented_signatures("Processor")
    methods = ["__init__", "fit", "encode", "decode", "save", "load"]
    assert set(documented) == set(methods)
    for name in methods:
        assert documented[name] == signature_line(name, getattr(hookspecs.Processor, name))
    described = {r[0].split("(")[0].strip("`") for r in table_rows(section("Processor"))}
    assert described == set(methods)
    for attribute in ("self.params", "self.info", "self.state", "self.restored"):
        assert attribute in section("Processor")


def test_documented_contract_version_is_the_code_s():
    text = section("Contract version")
    assert re.findall(r"HOOK_CONTRACT_VERSION = (\d+)", text) == [str(hookspecs.HOOK_CONTRACT_VERSION)]
    assert re.findall(r"TRAINYARD_HOOK_CONTRACT = (\d+)", text) == [str(hookspecs.HOOK_CONTRACT_VERSION)]
    assert re.search(r"TRAINYARD_HOOK_CONTRACT = (\d+)", blocks(section("A complete plugin"), "python")[0])


def test_every_plugin_switch_of_the_loader_is_documented():
    switches = set(re.findall(r"^``(TRAINYARD_\w+)", plugins.__doc__, re.MULTILINE))
    assert switches == {"TRAINYARD_DISABLE_EXTERNAL_PLUGINS", "TRAINYARD_PLUGINS",
                        "TRAINYARD_DISABLE_PLUGINS"}
    documented = {r[0].strip("`").split("=")[0] for r in table_rows(section("Packaging: the entry point"))}
    assert documented == switches


def test_the_documented_entry_point_is_the_example_plugin_s_own():
    (snippet,) = blocks(section("Packaging: the entry point"), "toml")
    documented = tomllib.loads(snippet)["project"]
    example = tomllib.loads((ROOT / "examples" / "trainyard-example-plugin" / "pyproject.toml").read_text())
    assert documented["name"] == example["project"]["name"]
    assert documented["entry-points"]["trainyard"] == example["project"]["entry-points"]["trainyard"]
    assert plugins.ENTRY_POINT_GROUP == "trainyard"


def test_the_streaming_example_s_rows_are_as_declared_and_its_label_can_be_learned():
    import numpy as np

    source, = blocks(section("Streaming datasets"), "python")
    namespace: dict = {}
    exec(compile(source, "docs/plugins.md", "exec"), namespace)  # noqa: S102 - our doc
    rows = namespace["rows"]({"id": np.arange(2_000)})
    assert rows["input"].shape == (2_000, 2) and rows["input"].dtype == np.float32
    # Both classes occur, and a model can learn the label from the input.
    from sklearn.linear_model import LogisticRegression

    assert set(rows["target"].tolist()) == {0, 1}
    fitted = LogisticRegression().fit(rows["input"][::2], rows["target"][::2])
    assert fitted.score(rows["input"][1::2], rows["target"][1::2]) > 0.9


def test_the_complete_plugin_in_the_doc_registers_conforms_and_runs_its_job():
    source, = blocks(section("A complete plugin"), "python")
    module = types.ModuleType(unique("doc_plugin"))
    name = unique("doc_plugin")
    sys.modules[module.__name__] = module  # as an import would; dataclasses look it up
    try:
        exec(compile(source, "docs/plugins.md", "exec"), module.__dict__)  # noqa: S102 - our doc
    finally:
        del sys.modules[module.__name__]
    with plugin_registered(module, name):
        registry = plugins.get_registry()
        assert [p.message for p in registry.problems if p.plugin == name] == []
        info = next(p for p in registry.plugins if p.name == name)
        assert info.provides == {"model": ["logreg"], "dataset": ["iris"], "metric": ["error_rate"]}
        assert_conforms(name)

        (job,) = blocks(section("A complete plugin"), "yaml")
        resolved = resolve(load_config(base=yaml.safe_load(job)))
        assert (resolved.model.name, resolved.dataset.name, resolved.monitor_mode) == (
            "logreg", "iris", "min")


def test_the_readmes_plugin_example_conforms_as_written():
    """The README's "Writing a plugin" example, copied as it is, passes the conformance check
    (a user's first plugin; it once lacked a processor and could not train)."""
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme[readme.index("## Writing a plugin"):], re.S)[0]
    module = types.ModuleType(unique("readme_plugin"))
    sys.modules[module.__name__] = module  # as an import would; dataclasses look it up
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)  # noqa: S102 - our README
    finally:
        del sys.modules[module.__name__]
    name = unique("readme_tiny")
    with plugin_registered(module, name):
        assert_conforms(name)
