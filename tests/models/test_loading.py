from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caa.errors import InputError, ModelError
from caa.models.loading import (
    SUPPORTED_ARCHITECTURES,
    block_hookpoint,
    decoder_blocks,
    load_model,
    resolve_dtype,
)
from tests.tiny_models import EXTRA_ARCHITECTURES, make_config, make_tokenizer, save_tiny_model


def test_load_tiny_model_and_fingerprint(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    fp = loaded.fingerprint
    assert fp.num_layers == 4 == len(loaded.blocks)
    assert fp.hidden_size == 32
    assert fp.dtype == "float32"
    assert fp.weights_hash.startswith("dir:")
    assert loaded.has_chat_template
    assert loaded.tokenizer.pad_token is not None
    assert not loaded.model.training
    # the same directory gives the same fingerprint
    assert load_model(str(tiny_model_dir), device="cpu").fingerprint == fp


@pytest.mark.parametrize("arch", EXTRA_ARCHITECTURES)
def test_decoder_blocks_of_every_supported_architecture(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config(arch, vocab_size=len(make_tokenizer())))
    blocks = decoder_blocks(model)
    assert len(blocks) == 4
    ids = torch.tensor([[5, 6, 7]])
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(blocks) + 1


def test_unknown_architecture_is_one_clear_error() -> None:
    class Config:
        model_type = "mamba"

    class Model(torch.nn.Module):
        config = Config()

    with pytest.raises(ModelError, match=r"unsupported architecture 'mamba'.*gpt2.*llama"):
        decoder_blocks(Model())
    assert {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "gpt2",
        "gpt_neox",
        "phi3",
    } <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown model 'no-such-model'.*smollm2-135m"),
        ("missing.gguf", "GGUF file not found"),
        (
            "nobody/no-such-model-xyz",
            "could not load model 'nobody/no-such-model-xyz' from the Hugging Face Hub",
        ),
    ],
)
def test_bad_model_specs(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_model(spec, device="cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_trust_remote_code_is_off_by_default(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    seen: list[bool] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_models["llama"]), device="cpu")
    load_model(str(tiny_models["llama"]), device="cpu", trust_remote_code=True)
    assert seen == [False, True]


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")


def test_base_model_without_chat_template(tmp_path: Path) -> None:
    loaded = load_model(str(save_tiny_model("llama", tmp_path / "base", chat=False)), device="cpu")
    assert not loaded.has_chat_template


@pytest.mark.slow
def test_embedded_smollm2_loads_and_cache_skips_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    monkeypatch.setenv("CAA_CACHE", str(tmp_path / "cache"))
    gguf_reads: list[str] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("gguf_file"):
            gguf_reads.append(kwargs["gguf_file"])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    first = load_model("smollm2-135m", device="cpu")
    assert gguf_reads == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    second = load_model("smollm2-135m", device="cpu")
    assert len(gguf_reads) == 1, "the second load de-quantised the GGUF again instead of using the cache"
    fp = second.fingerprint
    assert (fp.architecture, fp.num_layers, fp.hidden_size) == ("llama", 30, 576)
    assert fp == first.fingerprint
    assert len(fp.weights_hash) == 64
    cached = next((tmp_path / "cache" / "models").iterdir())
    assert (cached / "model.safetensors").is_file()
    ids = first.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        a = first.model(ids).logits
        b = second.model(ids).logits
    assert torch.equal(a, b)
    assert first.tokenizer.decode(a[0, -1].argmax()).strip() == "Paris"


class _Payload:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_never_loaded(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A model directory whose weights are a pickle (pytorch_model.bin) is refused, unopened."""
    import pickle
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "code-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError, match="could not load model"):
        load_model(str(model), device="cpu")
    assert not marker.exists()


def test_paths_in_datasets_are_text(tmp_path: Path) -> None:
    """A field that names a file is stored as text: ingest never opens it."""
    import json

    from caa.stages.ingest import ingest

    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    src = tmp_path / "paths.jsonl"
    src.write_text(json.dumps({"prompt": str(secret), "positive": "file://" + str(secret), "negative": "x"}))
    pair = ingest([src]).pairs[0]
    assert (pair.prompt, pair.positive) == (str(secret), "file://" + str(secret))


def test_fingerprint_and_its_metadata_schema_are_one_declaration(tiny_models: dict[str, Path]) -> None:
    """The fingerprint a loaded model carries is the class that declares the 'model' metadata entry."""
    from caa.store import schemas
    from caa.store.artifacts import _check_meta
    from caa.store.schemas import META_FIELDS_OF_KIND, Fingerprint

    loaded = load_model(str(tiny_models["llama"]), device="cpu")
    assert type(loaded.fingerprint) is Fingerprint
    assert all(META_FIELDS_OF_KIND[kind]["model"] is Fingerprint for kind in ("activations", "sweep"))
    assert not hasattr(schemas, "ModelMeta")
    assert loaded.fingerprint.to_dict()["hidden_size"] == loaded.hidden_size
    with pytest.raises(InputError, match=r"field 'model.hidden_size': expected an integer in the 'caa'"):
        _check_meta(
            Path("a.parquet"), {"model": {"hidden_size": "wide"}}, META_FIELDS_OF_KIND["sweep"], "caa"
        )
    with pytest.raises(InputError, match=r"field 'model': expected an object in the 'caa' metadata"):
        _check_meta(Path("a.parquet"), {"model": 3}, META_FIELDS_OF_KIND["sweep"], "caa")


def _config(arch: str) -> object:
    """A tiny config of ``arch``, including those the shared fixtures do not build."""
    import transformers as tf

    vocab = len(make_tokenizer())
    small = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    if arch == "gemma3":  # what AutoModelForCausalLM builds for it: Gemma3ForConditionalGeneration
        vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
        vision |= {"num_attention_heads": 2, "image_size": 28, "patch_size": 14}
        text = make_config("gemma3", vocab).to_dict()
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    if arch == "gemma3_text":
        return make_config("gemma3", vocab)
    if arch == "mixtral":
        return tf.MixtralConfig(**small, **heads, num_local_experts=2, num_experts_per_tok=1)
    if arch == "olmo2":
        return tf.Olmo2Config(**small, **heads, eos_token_id=3, pad_token_id=1)
    return make_config(arch, vocab)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_block_hookpoint_names_the_block_lm_eval_hooks(arch: str) -> None:
    """lm-eval's steered model hooks the modules of ``model.base_model.named_modules()`` by name:
    the name caa gives layer l must be decoder block l there, in every supported architecture."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config(arch))
    assert model.config.model_type == arch
    named = dict(model.base_model.named_modules())
    blocks = decoder_blocks(model)
    for layer in (0, len(blocks) - 1):
        assert named[block_hookpoint(arch, layer)] is blocks[layer]
    with pytest.raises(ModelError, match=r"unsupported architecture 'mamba'"):
        block_hookpoint("mamba", 1)
