"""YAML 1.2 through PyYAML, for the GPU check alone: the GPU machine's image has PyYAML but not
ruamel.yaml (bench/gpu_image.py), which pipeline/grid.py's ``load_yaml`` reads grid files with.

PyYAML implements YAML 1.1, whose implicit types change what a grid says (``1e-4`` is a string,
``no``/``on``/``off`` are booleans, ``010`` is 8). ``Yaml12Loader`` is PyYAML's safe loader with
its implicit resolvers replaced by ruamel.yaml's for version 1.2 (ruamel/yaml/resolver.py,
``implicit_resolvers``, copied from ruamel.yaml 0.19.1, the project's reference), integers and
floats constructed as ruamel does under 1.2 (leading zeros are decimal; ``0o``, ``0x``, ``0b``;
underscores ignored), and a key written twice in one mapping an error, as ruamel's safe loader
makes it. tests/unit/test_gpu_image.py checks that both give the same values for a table of
scalars and the same plan for every grids/*.yaml.

``install_ruamel_shim`` puts a module named ``ruamel.yaml`` in ``sys.modules`` that offers the two
names pipeline/grid.py imports from it (``YAML(typ="safe", pure=True).load`` and ``YAMLError``),
backed by this loader, when the real one cannot be imported. The main tool never does this.
"""
from __future__ import annotations

import math
import re
import sys
import types
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

# ruamel.yaml 0.19.1, resolver.py, the entries whose versions include (1, 2)
_RESOLVERS = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:float", r"""^(?:
         [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", "-+0123456789."),
    ("tag:yaml.org,2002:int", r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0o?[0-7_]+
        |[-+]?[0-9_]+
        |[-+]?0x[0-9a-fA-F_]+)$""", "-+0123456789"),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
    ("tag:yaml.org,2002:null", r"""^(?: ~
        |null|Null|NULL
        | )$""", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:timestamp", r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
        |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
        (?:[Tt]|[ \t]+)[0-9][0-9]?
        :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
        (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""", "0123456789"),
    ("tag:yaml.org,2002:value", r"^(?:=)$", "="),
]


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 as ruamel.yaml's safe loader does (module docstring)."""

    yaml_implicit_resolvers: dict = {}  # only YAML 1.2's, added below (not SafeLoader's 1.1 ones)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        """A mapping; raises ConstructorError (a yaml.YAMLError) for a key written twice. Keys that
        come from a merge (``<<: *anchor``) may be overridden, as YAML's merge allows."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: SafeConstructor refuses it with its own message
                continue
            if twice:
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       f"found duplicate key {key!r}; a key may appear once in a mapping",
                                       key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


for _tag, _regexp, _first in _RESOLVERS:
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_regexp, re.X), list(_first))


def _construct_int(loader: Yaml12Loader, node: Any) -> int:
    """ruamel's 1.2 integers: ``0b``, ``0o``, ``0x`` prefixes, leading zeros decimal, ``_`` ignored."""
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    for prefix, base in (("0b", 2), ("0o", 8), ("0x", 16)):
        if text.startswith(prefix):
            return sign * int(text[2:], base)
    return sign * int(text, 10)


def _construct_float(loader: Yaml12Loader, node: Any) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    sign = -1.0 if text.startswith("-") else 1.0
    if text.lstrip("+-") == ".inf":
        return sign * math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load(text: str) -> Any:
    """One YAML 1.2 document. Raises yaml.YAMLError for invalid YAML or a duplicate key."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 (a safe loader)


class YAML:
    """The part of ruamel.yaml's ``YAML`` that pipeline/grid.py uses: ``YAML(typ="safe", pure=True).load``."""

    def __init__(self, typ: str = "safe", pure: bool = True) -> None:
        if typ != "safe":
            raise ValueError(f"bench/yaml12.py offers only the safe loader, not typ={typ!r}")

    def load(self, stream: Any) -> Any:
        return load(stream)


def ruamel_shim() -> dict[str, types.ModuleType]:
    """Modules named ``ruamel`` and ``ruamel.yaml`` offering ``YAML`` and ``YAMLError`` from here."""
    pkg = types.ModuleType("ruamel")
    mod = types.ModuleType("ruamel.yaml", "bench/yaml12.py's stand-in for ruamel.yaml")
    for name, value in (("YAML", YAML), ("YAMLError", yaml.YAMLError)):
        setattr(mod, name, value)
    setattr(pkg, "yaml", mod)
    return {"ruamel": pkg, "ruamel.yaml": mod}


def install_ruamel_shim() -> bool:
    """Make ``from ruamel.yaml import YAML, YAMLError`` give this module's loader, unless ruamel.yaml
    imports. Returns True when the shim was installed."""
    try:
        import ruamel.yaml  # noqa: F401
        return False
    except ImportError:
        pass
    sys.modules.update(ruamel_shim())
    return True
