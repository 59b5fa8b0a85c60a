"""caa.models.specs: what a model argument names and how many blocks its config declares, told
without loading the model or reaching the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caa.errors import InputError, ModelError
from caa.models.specs import config_num_layers, hub_offline, looks_like_path, read_config, require_reachable


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("gpt2", False),
        ("HuggingFaceTB/SmolLM2-135M", False),
        ("./model", True),
        ("/abs/model", True),
        ("~/models/m", True),
        ("a/b/c", True),  # a hub id has exactly one separator
        ("model.gguf", True),
        ("org/weights.SAFETENSORS", True),  # suffixes compare case-insensitively
        ("org/name.v2", False),
    ],
)
def test_looks_like_path(spec: str, path: bool) -> None:
    assert looks_like_path(spec) is path


def test_config_num_layers_of_tiny_model_directories(tiny_models: dict[str, Path]) -> None:
    for arch, directory in tiny_models.items():
        assert config_num_layers(str(directory)) == 4, arch  # gpt2 declares it as n_layer


def test_config_num_layers_reads_text_config_and_disbelieves_absurd_counts(tmp_path: Path) -> None:
    def with_config(name: str, config: dict[str, object]) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    assert config_num_layers(with_config("nested", {"text_config": {"num_hidden_layers": 7}})) == 7
    assert config_num_layers(with_config("huge", {"num_hidden_layers": 10**6})) is None
    assert config_num_layers(with_config("bool", {"num_hidden_layers": True})) is None
    assert config_num_layers(with_config("zero", {"n_layer": 0, "num_layers": 3})) == 3
    assert config_num_layers(with_config("array", [1, 2])) is None  # type: ignore[arg-type]
    assert config_num_layers(str(tmp_path / "missing")) is None
    assert config_num_layers(str(tmp_path / "not-converted.gguf")) is None


def test_read_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no config.json: not a transformers model"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(InputError, match="expected a JSON object, found a JSON array"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": 3}')
    with pytest.raises(InputError) as e:
        read_config(tmp_path)
    assert e.value.field == "model_type"
    (tmp_path / "config.json").write_text('{"model_type": "llama"')
    with pytest.raises(InputError, match="is not a valid JSON file"):
        read_config(tmp_path)


def test_hub_offline_flags_and_require_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for value, offline in [("1", True), (" yes ", True), ("On", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline, value
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert hub_offline()
    with pytest.raises(ModelError, match=r"the hub is offline .* not in the local cache"):
        require_reachable("caa-test/not-cached")
