import pytest
import yaml

from trainer.config import ConfigError, RunConfig, load_config, save_config


def write(tmp_path, tree):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, {"steps": 3, "objective": {"repo": {"variant": "r"}}}))
    assert cfg.steps == 3 and cfg.objective.repo.variant == "r"
    assert cfg.trainer.lr == RunConfig().trainer.lr
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    # the resolved file holds every default, not just what the user wrote
    assert "max_nonfinite_in_a_row" in out.read_text()


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, {"trainer": {"lr": 1e-5}}),
        [
            "trainer.lr=1e-6",
            "rollout.group_size=8",
            "objective.tis_cap=null",
            "rollout.stop=['</code>', 'END']",
            "env.kwargs.max_turns=3",
        ],
    )
    assert cfg.trainer.lr == pytest.approx(1e-6)
    assert cfg.rollout.group_size == 8
    assert cfg.objective.tis_cap is None
    assert cfg.rollout.stop == ["</code>", "END"]
    assert cfg.env.kwargs == {"max_turns": 3}


def test_unknown_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.lrr: unknown key"):
        load_config(write(tmp_path, {"trainer": {"lrr": 1e-5}}))


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"'objective\.repo\.zeta'.*valid: .*zeta_init"):
        load_config(None, ["objective.repo.zeta=0.1"])


def test_bad_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"trainer\.lr: Input should be a valid number.*'fast'"):
        load_config(None, ["trainer.lr=fast"])
    with pytest.raises(ConfigError, match=r"objective\.aggregation: Input should be 'token_mean'"):
        load_config(None, ["objective.aggregation=mean"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["trainer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="held out"):
        load_config(None, ["env.train_split=dev", "eval.split=dev"])
    with pytest.raises(ConfigError, match="zeta_min <= zeta_init <= zeta_max"):
        load_config(None, ["objective.repo.zeta_init=5.0"])
    kl_zero3 = ["objective.kl_coef=0.05", "trainer.learner=deepspeed"]
    with pytest.raises(ConfigError, match=r"objective.kl_coef=0.05 .*deepspeed.zero_stage 1 or 2"):
        load_config(None, [*kl_zero3, "trainer.deepspeed.zero_stage=3"])
    assert load_config(None, [*kl_zero3, "trainer.deepspeed.zero_stage=2"]).objective.kl_coef > 0
    nucleus = ["policy.top_p=0.9", "objective.old_logprobs=sampler"]
    with pytest.raises(
        ConfigError, match=r"policy.top_p=0.9 with objective.old_logprobs='sampler'"
    ):
        load_config(None, nucleus)
    assert load_config(None, nucleus[:1]).policy.top_p == 0.9  # the learner's own ratio is fine


def test_a_served_policy_cannot_be_trained_and_dropped_keys_are_unknown():
    """policy.backend=openai is refused when the config is read (not at step 1), and the keys
    nothing read (model.trust_remote_code, policy.device, policy.openai) are gone, not ignored."""
    with pytest.raises(ConfigError, match=r"policy.backend='openai' cannot be trained"):
        load_config(None, ["policy.backend=openai"])
    for key in ("model.trust_remote_code=true", "policy.device=cpu", "policy.openai.timeout_s=1"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(None, [key])
    assert load_config(None, ["policy.backend=vllm"]).policy.vllm.fp32_head
