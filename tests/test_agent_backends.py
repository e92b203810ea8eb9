"""Which sampler runs by default, and the vLLM knobs of `eprl eval` / `eprl rollout`."""

import importlib.util

import pytest

from agent.backends import backend_reason, build_policy
from agent.cli import vllm_options
from agent.config import PolicyConfig, default_backend

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM in the main venv (`make setup`)")
def test_vllm_is_the_default_where_it_imports(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = PolicyConfig()
    assert cfg.backend == "vllm" and backend_reason(cfg) == "the default: vLLM is importable"
    # a multi-rank CPU run (torchrun sets WORLD_SIZE) samples with each rank's learner
    monkeypatch.setenv("WORLD_SIZE", "2")
    if not __import__("torch").cuda.is_available():
        cfg = PolicyConfig()
        assert cfg.backend == "hf" and "multi-rank run without CUDA" in backend_reason(cfg)


def test_hf_is_the_default_without_vllm_and_a_named_backend_is_kept(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert default_backend() == "hf"
    cfg = PolicyConfig()
    assert cfg.backend == "hf" and "vLLM is not installed" in backend_reason(cfg)
    named = PolicyConfig(backend="vllm")
    assert (
        named.backend == "vllm"
        and backend_reason(named) == "set in the config / on the command line"
    )


def test_build_policy_says_which_backend_runs_and_why(tiny_model_dir, capsys):
    policy = build_policy(PolicyConfig(backend="hf"), tiny_model_dir)
    assert policy.tokenizer is not None
    err = capsys.readouterr().err
    assert "eprl: policy backend hf (set in the config / on the command line)" in err


def test_vllm_options_keep_only_given_knobs_and_name_a_bad_flag():
    assert vllm_options() == {}
    assert vllm_options(2, 0.8, "bfloat16", 2048) == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16",
        "max_model_len": 2048,
    }
    with pytest.raises(ValueError, match=r"--dtype 'float64'"):
        vllm_options(dtype="float64")
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 0"):
        vllm_options(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 1.5"):
        vllm_options(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match=r"--max-model-len 64"):
        vllm_options(max_model_len=64)
