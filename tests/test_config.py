"""Flag validation: every bad value or contradictory combination is one FlagError naming the flag."""

import os

import pytest
from absl import flags

from advprop_tf.config import FlagError, attack_steps, define_train_flags, validate_train_flags

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
])
def test_bad_values_are_one_flag_error_naming_the_flag(argv, flag, message):
    with pytest.raises(FlagError) as error:
        validate_train_flags(parsed(*argv))
    assert error.value.flag == flag and message in str(error.value) and str(error.value).startswith(f"--{flag}: ")


def test_fast_advprop_defaults_are_the_papers():
    from advprop_tf.config import adv_loss_weight, config_from_flags, model_domains

    fv = parsed("--method=fast_advprop", "--attack_bn_mode=batch")  # agreeing explicitly is fine
    validate_train_flags(fv)
    cfg = config_from_flags(fv)
    assert (cfg.adv_fraction, cfg.noisy_loss_weight, adv_loss_weight(cfg), cfg.clean_loss_weight) == (0.2, 0.5, 0.5, 1.0)
    assert (cfg.epsilon, attack_steps(cfg), cfg.match_vanilla_budget) == (1.0, 1, True)
    assert model_domains(cfg.method, cfg.aux_domains) == ("clean", "adv")
    assert adv_loss_weight(parsed("--method=fast_advprop", "--adv_loss_weight=1")) == 1.0
    assert adv_loss_weight(parsed("--method=advprop")) == 1.0


def test_resnet50_fast_advprop_config_is_the_public_scripts_recipe(tmp_path):
    from advprop_tf.config import config_from_flags
    from advprop_tf.training.builders import budget_scale

    fv = parsed(f"--flagfile={REPO}/configs/resnet50_fast_advprop.flags", f"--data_dir={tmp_path}",
                model_dir=str(tmp_path / "run"))
    validate_train_flags(fv)
    cfg = config_from_flags(fv)
    assert (cfg.method, cfg.adv_fraction, cfg.train_epochs, cfg.lr_decay_boundaries) == (
        "fast_advprop", 0.2, 105, ["30", "60", "90", "100"])
    assert budget_scale(cfg) == 1.2


def test_a_fractional_epsilon_attacks_with_one_step():
    fv = parsed("--epsilon=0.5")
    validate_train_flags(fv)
    assert attack_steps(fv) == 1


@pytest.mark.parametrize("name,magnitude", [("b0", 10), ("b3", 10), ("b4", 10), ("b5", 17), ("b7", 28), ("b8", 28)])
def test_efficientnet_configs_are_advprop_with_autoaugment_as_the_paper(name, magnitude, tmp_path):
    fv = parsed(f"--flagfile={REPO}/configs/{name}.flags", f"--data_dir={tmp_path}", model_dir=str(tmp_path / "run"))
    validate_train_flags(fv)
    assert (fv.method, fv.augment, fv.input_normalization) == ("advprop", "autoaugment", "inception")
    assert fv.randaugment_magnitude == magnitude  # for --augment=randaugment, the authors' value
