"""Configuration: every bad value or contradictory combination is one ConfigError naming its field, shown as
its flag; a method's rules (domains, fixed attack, weights, budget) come from its record."""

import os

import pytest
from absl import flags

from advprop_tf.errors import ConfigError
from advprop_tf.train_flags import config_from_flags, define_train_flags, flag_error, flag_of, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parsed(*argv, model_dir="/tmp/unused-run"):
    fv = flags.FlagValues()
    define_train_flags(fv)
    fv(["train", f"--model_dir={model_dir}", *argv])
    return fv


@pytest.mark.parametrize("argv,flag,message", [
    (["--dropout_rate=1.5"], "dropout_rate", "must be in [0, 1), got 1.5"),
    (["--drop_connect_rate=-0.1"], "drop_connect_rate", "must be in [0, 1)"),
    (["--keep_checkpoints=0"], "keep_checkpoints", "must be >= 1"),
    (["--adv_loss_weight=-1"], "adv_loss_weight", "must be >= 0, got -1"),
    (["--clean_loss_weight=-0.5"], "clean_loss_weight", "must be >= 0"),
    (["--clean_loss_weight=0", "--adv_loss_weight=0"], "clean_loss_weight", "no other loss"),
    (["--augment=keras_cv_randaugment", "--randaugment_magnitude=28"], "randaugment_magnitude", "caps it at 10"),
    (["--randaugment_magnitude=-1"], "randaugment_magnitude", "must be >= 0"),
    (["--randaugment_layers=0"], "randaugment_layers", "must be >= 1"),
    (["--augment=autoaugment", "--aux_domains=autoaugment,adv"], "aux_domains", "already does"),
    (["--aux_domains=advx"], "aux_domains", "after 'adv' comes an epsilon"),
    (["--aux_domains=adv1,adv2", "--epsilon_schedule=0:1,0.5:2"], "epsilon_schedule", "does not have"),
    (["--tpu=local", "--worker_hosts=127.0.0.1:1,127.0.0.1:2"], "worker_hosts", "contradicts --tpu"),
    (["--prob_start_from_clean=1.5"], "prob_start_from_clean", "must be in [0, 1]"),
    (["--lr_schedule=step"], "lr_decay_boundaries", "needs increasing positive epochs"),
    (["--lr_schedule=step", "--lr_decay_boundaries=70,35"], "lr_decay_boundaries", "increasing"),
    (["--weight_decay=-1e-4"], "weight_decay", "must be >= 0"),
    (["--model=resnet-51"], "model", "unknown model 'resnet-51'"),
    (["--method=fast_advprop", "--adv_fraction=0"], "adv_fraction", "must be in (0, 1), got 0"),
    (["--method=fast_advprop", "--adv_fraction=1"], "adv_fraction", "must be in (0, 1)"),
    (["--method=fast_advprop", "--aux_domains=adv1,adv2"], "aux_domains", "one auxiliary BN"),
    (["--method=fast_advprop", "--targeted"], "targeted", "always targeted=False"),
    (["--method=fast_advprop", "--attack_bn_mode=inference"], "attack_bn_mode", "always attack_bn_mode=batch"),
    (["--method=fast_advprop", "--norandom_start"], "random_start", "always random_start=True"),
    (["--method=fast_advprop", "--epsilon_schedule=0:1,0.5:2"], "epsilon_schedule", "not supported"),
    (["--method=fast_advprop", "--epsilon=0"], "epsilon", "must be > 0"),
    (["--method=fast_advprop", "--noisy_loss_weight=-1"], "noisy_loss_weight", "must be >= 0, got -1"),
    (["--attack_steps=0", "--epsilon=2"], "attack_steps", "must be >= 1 when epsilon > 0"),
    (["--attack_step_size=0"], "attack_step_size", "must be > 0"),
    (["--method=vanilla", "--epsilon_schedule=0:1"], "epsilon_schedule", "contradicts --method=vanilla"),
    (["--aux_domains=randaugment"], "aux_domains", "needs an adversarial domain"),
    (["--mixed_precision=float16", "--tpu=local"], "mixed_precision", "float16 is for GPUs"),
    (["--init_skip_head"], "init_skip_head", "needs --init_checkpoint"),
    (["--dataset=folder"], "data_dir", "needs a location"),
])
def test_bad_values_are_one_error_naming_the_flag(argv, flag, message):
    with pytest.raises(ConfigError) as error:
        config_from_flags(parsed(*argv))
    assert flag_of(error.value.field) == flag and message in error.value.reason
    assert flag_error(error.value).startswith(f"--{flag}: ")


def test_the_sections_are_typed_and_the_library_never_sees_flags():
    config = make_config(model_dir="/tmp/unused", train_batch_size=64, epsilon=2.0, aux_domains=["adv1", "adv2"])
    assert config.optimization.train_batch_size == 64 and config.run.model_dir == "/tmp/unused"
    assert config.method.attack.epsilon == 2.0 and config.method.attack.steps == 3  # the paper's rule
    assert config.method.domains.names == ("clean", "adv1", "adv2")
    assert config.method.domains.get("adv2").epsilon == 2.0
    vanilla = make_config(model_dir="/tmp/unused", method="vanilla", aux_domains=["adv1", "adv2"])
    assert vanilla.method.domains.names == ("clean",)  # the method's record decides
    with pytest.raises(ConfigError, match="^model_dir: is required"):
        make_config()
    with pytest.raises(ConfigError, match="^no_such_flag: unknown flag"):
        make_config(model_dir="/tmp/unused", no_such_flag=1)


def test_fast_advprop_defaults_are_the_papers():
    fv = parsed("--method=fast_advprop", "--attack_bn_mode=batch")  # agreeing explicitly is fine
    cfg = config_from_flags(fv)
    method = cfg.method
    assert (method.adv_fraction, method.noisy_loss_weight, method.adv_weight, method.clean_loss_weight) == (
        0.2, 0.5, 0.5, 1.0)
    assert (method.attack.epsilon, method.attack.steps, method.match_vanilla_budget) == (1.0, 1, True)
    assert (method.attack.targeted, method.attack.random_start, method.attack.attack_bn_mode) == (False, True, "batch")
    assert method.domains.names == ("clean", "adv")
    assert config_from_flags(parsed("--method=fast_advprop", "--adv_loss_weight=1")).method.adv_weight == 1.0
    assert config_from_flags(parsed("--method=advprop")).method.adv_weight == 1.0


def test_resnet50_fast_advprop_config_is_the_public_scripts_recipe(tmp_path):
    from advprop_tf.training.builders import budget_scale, images_per_replica

    cfg = config_from_flags(parsed(f"--flagfile={REPO}/configs/resnet50_fast_advprop.flags", f"--data_dir={tmp_path}",
                                   model_dir=str(tmp_path / "run")))
    assert (cfg.method.method, cfg.method.adv_fraction, cfg.optimization.train_epochs) == ("fast_advprop", 0.2, 105)
    assert cfg.optimization.lr_decay_boundaries == (30, 60, 90, 100)
    assert images_per_replica(cfg, 8) == 40 and budget_scale(cfg, 8) == pytest.approx(1.2)


def test_a_fractional_epsilon_attacks_with_one_step():
    assert config_from_flags(parsed("--epsilon=0.5")).method.attack.steps == 1


@pytest.mark.parametrize("name,magnitude", [("b0", 10), ("b3", 10), ("b4", 10), ("b5", 17), ("b7", 28), ("b8", 28)])
def test_efficientnet_configs_are_advprop_with_autoaugment_as_the_paper(name, magnitude, tmp_path):
    cfg = config_from_flags(parsed(f"--flagfile={REPO}/configs/{name}.flags", f"--data_dir={tmp_path}",
                                   model_dir=str(tmp_path / "run")))
    assert (cfg.method.method, cfg.data.augment, cfg.model.input_normalization) == ("advprop", "autoaugment", "inception")
    assert cfg.data.randaugment_magnitude == magnitude  # for --augment=randaugment, the authors' value


def test_paths_are_checked_on_the_filesystem_the_flag_names(tmp_path):
    with pytest.raises(ConfigError, match="^dataset: '/nonexistent/images' does not exist"):
        config_from_flags(parsed("--dataset=folder:/nonexistent/images"))
    with pytest.raises(ConfigError, match="^init_checkpoint: .* does not exist"):
        config_from_flags(parsed(f"--init_checkpoint={tmp_path}/missing"))
    config_from_flags(parsed("--dataset=folder:/nonexistent/images"), check_files=False)  # values alone are fine
