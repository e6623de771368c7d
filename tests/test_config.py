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
])
def test_bad_values_are_one_flag_error_naming_the_flag(argv, flag, message):
    with pytest.raises(FlagError) as error:
        validate_train_flags(parsed(*argv))
    assert error.value.flag == flag and message in str(error.value) and str(error.value).startswith(f"--{flag}: ")


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
