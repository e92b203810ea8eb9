"""The embedded model loads offline and answers; the second load comes from the cache."""

import pytest

from agent import models


def test_embedded_model_converts_once_then_loads_from_cache(monkeypatch):
    folder = models.embedded_model_dir()  # converts on the first use in a fresh clone
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert models.resolve_model("smollm2-135m-instruct") == str(folder)
    model = models.load_model("smollm2-135m-instruct")
    tokenizer = models.load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3? Answer with a number."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="no-such-model"):
        models.resolve_model("./no-such-model")
    with pytest.raises(ValueError, match="'float16'"):
        models.load_model("smollm2-135m-instruct", dtype="float16")


def test_list_models_shows_the_embedded_model():
    names = [entry.name for entry in models.list_models()]
    assert names[0] == models.EMBEDDED_NAME
