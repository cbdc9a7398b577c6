"""nf4q.naming.matches: the one module-name rule of quantize_model(skip=...) and peft_layers' target_modules."""
import pytest
from torch import nn

import nf4q
import peft_layers
from nf4q.naming import matches

NAMES = ["lm_head", "model.lm_head", "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.qq_proj",
         "model.layers.0.mlp", "model.layers.0.mlp_norm", "model.layers.1.mlp.down_proj", "q_proj"]


@pytest.mark.parametrize("patterns, expected", [
    (["q_proj"], {"model.layers.0.self_attn.q_proj", "q_proj"}),  # whole dotted segments: not qq_proj
    (("layers.0.mlp",), {"model.layers.0.mlp"}),  # a dotted suffix, not a prefix of mlp_norm
    (["lm_head", "down_proj"], {"lm_head", "model.lm_head", "model.layers.1.mlp.down_proj"}),
    (r".*\.(q|qq)_proj", {"model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.qq_proj"}),
    ("q_proj", {"q_proj"}),  # a str is a regex over the whole name: no suffix rule
    ("lm", set()),  # ... and never a prefix or substring
    ([r".*_proj"], set()),  # list entries are names, not regexes
    ([], set()), ((), set()), (None, set()),
])
def test_rule(patterns, expected):
    assert {n for n in NAMES if matches(n, patterns)} == expected


def test_same_rule_as_peft():
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig

    for target in (["q_proj"], ["layers.0.mlp", "lm_head"], r".*\.(q|qq)_proj", "q_proj", ["down_proj"]):
        cfg = LoraConfig(target_modules=target)
        for name in NAMES:
            assert matches(name, target) == bool(tuners_utils.check_target_module_exists(cfg, name)), (target, name)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.qq_proj, self.mlp = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)


def test_quantize_model_skip_uses_the_rule():
    model = nn.Sequential(Block(), Block())
    nf4q.quantize_model(model, skip=["0.q_proj", "mlp"], progress=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, nf4q.Linear4bit))}
    assert kinds == {"0.q_proj": "Linear", "0.qq_proj": "Linear4bit", "0.mlp": "Linear",
                     "1.q_proj": "Linear4bit", "1.qq_proj": "Linear4bit", "1.mlp": "Linear"}
    regex = nf4q.quantize_model(nn.Sequential(Block()), skip=r"0\.q+_proj", progress=False)
    assert [n for n, m in regex.named_modules() if type(m) is nn.Linear] == ["0.q_proj", "0.qq_proj"]


def test_target_modules_use_the_rule():
    model = peft_layers.get_peft_model(nn.Sequential(Block(), Block()),
                                       peft_layers.LoRAConfig(r=2, target_modules=["0.q_proj", "mlp"]))
    wrapped = sorted(n.rsplit("model.", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, peft_layers.TunerLayer))
    assert wrapped == ["0.mlp", "0.q_proj", "1.mlp"]
