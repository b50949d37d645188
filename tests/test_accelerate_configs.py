"""The shipped accelerate configs (configs/accelerate/) parse as accelerate's own config
class and hold values accelerate accepts. They are not run here (no GPUs, no DeepSpeed)."""

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"ddp-8gpu", "deepspeed-zero2", "deepspeed-zero3", "fsdp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_as_accelerate_config(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise ValueError here
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED, DistributedType.FSDP)
    assert cfg.num_processes >= 2 and cfg.num_processes % cfg.num_machines == 0
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port


@pytest.mark.parametrize("path", [p for p in CONFIGS if "deepspeed" in p.stem], ids=lambda p: p.stem)
def test_deepspeed_values(path):
    ds = yaml.safe_load(path.read_text())["deepspeed_config"]
    assert ds["zero_stage"] in (2, 3) and str(ds["zero_stage"]) in path.stem
    assert ds["offload_optimizer_device"] in ("none", "cpu", "nvme") and ds["offload_param_device"] in ("none", "cpu", "nvme")
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] >= 1
    if ds["zero_stage"] == 3:
        assert ds["zero3_save_16bit_model"] is True  # save_pretrained needs the gathered weights


@pytest.mark.parametrize("path", [p for p in CONFIGS if "fsdp" in p.stem], ids=lambda p: p.stem)
def test_fsdp_values(path):
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY
    from transformers import LlamaConfig, LlamaForCausalLM

    fs = yaml.safe_load(path.read_text())["fsdp_config"]
    assert fs["fsdp_version"] == 2
    assert fs["fsdp_auto_wrap_policy"] in FSDP_AUTO_WRAP_POLICY
    assert fs["fsdp_state_dict_type"] in FSDP2_STATE_DICT_TYPE
    # the layer class to wrap exists in the default model (SmolLM2 is a Llama)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    assert fs["fsdp_transformer_layer_cls_to_wrap"] in {type(m).__name__ for m in model.modules()}
