"""Configuration: one schema for files, dicts and protobuf messages, and errors that
name the field at fault, from every front door."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

import pymesh

from .conftest import make_config, proxy_binary


@pytest.mark.parametrize(("config", "path", "fragment"), [
    ({"listeners": []}, "listeners", "at least one listener"),
    ({"listeners": [{"address": "localhost"}]}, "listeners[0].address", "not a socket address"),
    ({"listeners": [{"address": "127.0.0.1:0", "bogus": 1}]}, "listeners[0].bogus", "unknown field"),
    ({"listeners": [{"address": "127.0.0.1:0", "direction": "SIDEWAYS"}]}, "listeners[0].direction", "SIDEWAYS"),
    ({"listeners": [{"address": "127.0.0.1:0", "direction": "INBOUND"}]}, "listeners[0].default_service",
     "required"),
    ({"listeners": [{"address": "127.0.0.1:0"}], "services": [{"name": "a", "endpoints": [{"address": "x"}]}]},
     "services[0].endpoints[0].address", "not a socket address"),
    ({"listeners": [{"address": "127.0.0.1:0"}], "services": [{"name": "a"}, {"name": "a"}]},
     "services[1].name", "duplicate"),
    ({"listeners": [{"address": "127.0.0.1:0"}], "timeouts": {"connect": "soon"}}, "timeouts.connect", ""),
    ({"listeners": [{"address": "127.0.0.1:0"}], "timeouts": {"connect": "0s"}}, "timeouts.connect",
     "greater than 0s"),
    ({"listeners": [{"address": "127.0.0.1:0"}], "limits": {"maxHeaderBytes": 10}}, "limits.max_header_bytes",
     "minimum"),
])
def test_errors_name_the_field(config: dict, path: str, fragment: str) -> None:
    with pytest.raises(pymesh.ConfigError) as error:
        pymesh.validate(config)
    assert error.value.path == path
    assert fragment in str(error.value)
    with pytest.raises(pymesh.ConfigError):
        pymesh.Proxy(config).start()


def test_yaml_json_dict_and_protobuf_are_one_schema(tmp_path: Path) -> None:
    config = make_config({"web": ["127.0.0.1:8080"]}, timeouts={"request": "2.5s"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "c.json").write_text(json.dumps(config))
    from_yaml = pymesh.validate(tmp_path / "c.yaml")
    assert from_yaml == pymesh.validate(tmp_path / "c.json") == pymesh.validate(config)
    assert from_yaml["timeouts"]["request"] == "2.500s"

    from google.protobuf import json_format

    from pymesh.schema import ProxyConfig

    message = json_format.ParseDict(config, ProxyConfig())
    assert pymesh.validate(message) == from_yaml
    with pymesh.Proxy(message) as proxy:
        assert proxy.config()["services"][0]["name"] == "web"


def test_native_binary_rejects_a_bad_file_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - address: 127.0.0.1:0\nservices:\n  - name: web\n    endpoints: [{address: nope}]\n")
    result = subprocess.run([proxy_binary(), "--config", str(bad)], capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert "services[0].endpoints[0].address" in result.stderr
    assert str(bad) in result.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("listeners: [\n")
    result = subprocess.run([proxy_binary(), "--config", str(broken)], capture_output=True, text=True, timeout=10)
    assert result.returncode != 0 and "line" in result.stderr


def test_wrong_config_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="mapping, a file path or a ProxyConfig"):
        pymesh.Proxy(42).start()  # type: ignore[arg-type]
