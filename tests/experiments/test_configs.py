"""One config file per module family, the variant as its argument."""

import pytest

from experiments.configs import autoencoder, cvae, dit, dit_large, value


def test_variants_select_sizes_and_recipes():
    assert [cvae.get_config(s).model.size for s in "SBL"] == ["S", "B", "L"]
    assert [dit.get_config(s).model.size for s in "SBL"] == ["S", "B", "L"]
    assert value.get_config("clip").model.clip_len == 4
    assert value.get_config("liv").model.clip_len == 1
    assert autoencoder.get_config("sd").mode == "full"
    ft = autoencoder.get_config("finetune")
    assert (ft.mode, ft.learning_rate, ft.ema_decay) == ("decoder", 1e-5, 0.999)
    # runlocal after a variant (or alone) is the tiny CPU run, whatever the size.
    for arg in ("S,runlocal", "L,runlocal", "runlocal", " L , runlocal "):
        c = dit.get_config(arg)
        assert c.runlocal and c.model.size == "tiny"


def test_dit_large_is_dit_l():
    assert dit_large.get_config().to_dict() == dit.get_config("L").to_dict()
    assert dit_large.get_config("runlocal").to_dict() == dit.get_config("L,runlocal").to_dict()


@pytest.mark.parametrize("module,arg,match", [
    (cvae, "M", r"unknown config argument 'M' for cvae.py; use --config=experiments/configs/"
                r"cvae.py:VARIANT with VARIANT one of \['S', 'B', 'L'\]"),
    (dit, None, r"dit.py needs a variant; use --config=experiments/configs/dit.py:VARIANT"),
    (value, "clip,liv", r"unknown config argument 'clip,liv' for value.py"),
    (autoencoder, "sd,fast", r"unknown config argument 'sd,fast'.*\['sd', 'finetune'\]"),
])
def test_bad_arguments_name_the_valid_variants(module, arg, match):
    with pytest.raises(ValueError, match=match):
        module.get_config(arg)
