"""The config: sizes, loading YAML/JSON, flags over files, validation with messages that say how to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd.config import (
    Config,
    HardwareConfig,
    MethodConfig,
    Overrides,
    TrainingConfig,
    apply_flags,
    default_config,
    gpu_label,
    load_config,
    parse_bytes,
)
from gkd.errors import InputError

GiB = 1 << 30


@pytest.mark.parametrize(
    "value,expected",
    [
        ("40GiB", 40 * GiB),
        ("40GB", 40 * 10**9),
        ("40G", 40 * 10**9),
        ("512MiB", 512 << 20),
        ("1TiB", 1 << 40),
        (40, 40 * GiB),
        ("40", 40 * GiB),
        (2**31, 2**31),
        ("0.5GiB", GiB // 2),
        ("1e3", 1000 * GiB),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value, "x") == expected


@pytest.mark.parametrize("value", ["forty", "40XB", -1, True, None, "-3GiB"])
def test_parse_bytes_rejects(value):
    with pytest.raises(InputError):
        parse_bytes(value, "--gpu-memory")


def test_defaults_are_the_headline_machine():
    c = Config()
    assert c.hardware.gpus == 8 and c.hardware.gpu_memory_bytes == 40 * GiB
    assert c.training.seq_len == 512
    assert [m.name for m in c.methods] == ["kd", "minilmv2"]
    assert c.hardware.gpu_name == "A100-SXM4-40GB"


def test_default_config_file_is_the_headline_job():
    c = default_config()
    assert c.teachers == ("glm-130b",)
    assert [m.name for m in c.methods] == ["kd", "minilmv2"]
    assert c.training.seq_len == 512 and c.hardware.gpus == 8


def test_load_yaml_and_json_agree(tmp_path):
    data = {
        "teacher": "tiny-llama-teacher",
        "student": "tiny-llama-student",
        "methods": [{"name": "kd", "weight": 0.5, "options": {"temperature": 2.0}}],
        "hardware": {"gpus": 4, "gpu_memory": "24GiB", "host_memory": "256GiB"},
        "training": {"seq_len": 128, "global_batch": 16, "micro_batch": [1, 2]},
        "overrides": {"student_zero_stage": 2, "recompute_layers": [0]},
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    a, b = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.yaml")
    assert a.to_dict() == b.to_dict()
    assert a.hardware.gpu_memory_bytes == 24 * GiB
    assert a.training.micro_batch == (1, 2)
    assert a.overrides.recompute_layers == (0,)
    assert a.methods[0] == MethodConfig(name="kd", weight=0.5, options={"temperature": 2.0})
    assert Config.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_flags_override_file(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: a\nstudent: b\nmethods: [kd]\ntraining: {seq_len: 256}\n")
    c = apply_flags(
        load_config(tmp_path / "c.yaml"),
        teacher="t1,t2",
        seq_len=1024,
        gpus=16,
        gpu_memory="80GiB",
        micro_batch="auto",
        methods="kd,minilmv2",
        host_memory="2TiB",
        global_batch=32,
    )
    assert c.teachers == ("t1", "t2")
    assert c.training.seq_len == 1024 and c.training.micro_batch == () and c.training.global_batch == 32
    assert c.hardware.gpus == 16 and c.hardware.gpu_memory_bytes == 80 * GiB and c.hardware.nodes == 2
    assert [m.name for m in c.methods] == ["kd", "minilmv2"]
    assert gpu_label(c.hardware.gpu_name, c.hardware.gpu_memory_bytes) == "GPU"  # not the default A100-40GB


def test_gpu_label_follows_the_memory(tmp_path):
    def label(config):
        return gpu_label(config.hardware.gpu_name, config.hardware.gpu_memory_bytes)

    default = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    assert label(default) == "A100-SXM4-40GB"  # it gives 40GiB, the default GPU's memory
    assert label(apply_flags(default, gpu_memory="40GiB")) == "A100-SXM4-40GB"
    (tmp_path / "a.yaml").write_text("teacher: a\nstudent: b\nmethods: [kd]\nhardware: {gpu_memory: 80GiB}\n")
    assert label(load_config(tmp_path / "a.yaml")) == "GPU"
    (tmp_path / "b.yaml").write_text(
        "teacher: a\nstudent: b\nmethods: [kd]\nhardware: {gpu_memory: 80GiB, gpu_name: H100-80GB}\n"
    )
    named = load_config(tmp_path / "b.yaml")
    assert label(named) == "H100-80GB"
    assert label(apply_flags(named, gpu_memory="79GiB")) == "H100-80GB"


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"teacherz": "x"}, "unknown keys"),
        ({"hardware": {"gpus": 0}}, "hardware.gpus"),
        ({"hardware": {"gpu_memory": "lots"}}, "size"),
        ({"hardware": {"flops_efficiency": 2}}, "fraction"),
        ({"hardware": {"gpus": 12}}, "multiple of gpus_per_node"),
        ({"training": {"seq_len": -1}}, "training.seq_len"),
        ({"training": {"global_batch": 60}}, "divisible"),
        ({"training": {"dtype": "float8"}}, "training.dtype"),
        ({"training": {"optimizer": "lion"}}, "training.optimizer"),
        ({"training": {"micro_batch": "many"}}, "micro_batch"),
        ({"methods": []}, "no methods"),
        ({"methods": [{"weight": 1}]}, "name"),
        ({"methods": [{"name": "kd", "wieght": 1}]}, "unknown keys"),
        ({"overrides": {"student_zero_stage": 4}}, "0, 1, 2 or 3"),
        ({"overrides": {"teacher_placement": "gpu"}}, "teacher_placement"),
        ({"overrides": {"student_offload": "optimizer+parameters", "student_zero_stage": 2}}, "ZeRO stage 3"),
        ({"overrides": {"tensor_parallel": 3}}, "divide"),
        ({"deepspeed": {"reduce_bucket_size": 0}}, "reduce_bucket_size"),
        ("just a string", "mapping"),
        # Model references must be strings (`teacher: 5` was a TypeError).
        ({"teacher": 5}, "teacher must be a preset name"),
        ({"teacher": {"name": "x"}}, "teacher must be a preset name"),
        ({"teachers": ["glm-130b", 7]}, "got 7"),
        ({"student": 5}, "student must be a preset name"),
        # training.optimizer is a name the runtime's DeepSpeed config can build (a mapping was a TypeError,
        # sgd planned but every run failed); lr and weight decay are their own keys.
        ({"training": {"optimizer": {"name": "adamw", "lr": -1}}}, "training.lr and training.weight_decay"),
        ({"training": {"optimizer": "sgd"}}, "use one of adamw, adam"),
        ({"training": {"lr": -1}}, "training.lr must be > 0"),
        ({"training": {"lr": 0}}, "training.lr must be > 0"),
        ({"training": {"lr": float("inf")}}, "training.lr must be a finite number"),
        ({"training": {"lr": "fast"}}, "training.lr must be a number"),
        ({"training": {"weight_decay": -0.1}}, "training.weight_decay must be >= 0"),
        ({"training": {"weight_decay": float("nan")}}, "training.weight_decay must be a finite number"),
        ({"hardware": {"interconnect": "carrier_pigeon"}}, "nvlink, pcie, infiniband, ethernet"),
        ({"methods": [{"name": "kd", "weight": float("nan")}]}, "'kd' weight must be a finite number"),
        ({"methods": [{"name": "kd", "weight": float("inf")}]}, "'kd' weight must be a finite number"),
        ({"hardware": {"gpu_memory": float("nan")}}, "hardware.gpu_memory must be a size"),
        ({"hardware": {"host_memory": float("inf")}}, "hardware.host_memory must be a size"),
        ({"overrides": [1]}, "overrides must be a mapping"),
        ({"overrides": {"recompute_layers": [0, 0]}}, "names a layer twice"),
        ({"hardware": {"gpu_name": 5}}, "hardware.gpu_name must be text"),
        ({"methods": [{"name": "kd", "weight": 0}]}, "every method has weight 0"),
        ({"hardware": {"gpu_memory": "8GiB", "gpu_memory_bytes": 1000}}, "twice, under two names"),
        (
            {"overrides": {"tensor_parallel": 2, "teacher_placement": "replicated"}},
            "overrides.tensor_parallel 2 splits the teacher, but overrides.teacher_placement is replicated",
        ),
        (
            {"training": {"micro_batch": 2}, "overrides": {"micro_batch": 4}},
            "overrides.micro_batch 4 is not among training.micro_batch 2",
        ),
    ],
)
def test_bad_input_is_one_line_input_error(data, fragment):
    with pytest.raises(InputError) as err:
        Config.from_dict(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_bad_yaml_says_what_and_where(tmp_path):
    """The parser's problem and its line, not only its context ("while parsing a flow sequence")."""
    (tmp_path / "bad.yaml").write_text("teacher: tiny-llama-teacher\nmethods: [kd\n")
    with pytest.raises(InputError) as err:
        load_config(tmp_path / "bad.yaml")
    assert str(err.value) == (
        "config bad.yaml is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1"
    )
    (tmp_path / "tab.yaml").write_text("methods:\n\t- kd\n")
    with pytest.raises(
        InputError, match="found character '\\\\t' that cannot start any token at line 2, column 1"
    ):
        load_config(tmp_path / "tab.yaml")


def test_sections_validate_directly():
    with pytest.raises(InputError):
        HardwareConfig(gpu_memory_bytes=0)
    with pytest.raises(InputError):
        TrainingConfig(steps=0)
    with pytest.raises(InputError):
        Overrides(student_offload="optimizer", student_zero_stage=0)
    with pytest.raises(InputError):
        MethodConfig(name="")


def test_model_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "student.json").write_text("{}")
    (tmp_path / "c.yaml").write_text("teacher: glm-130b\nstudent: student.json\n")
    c = load_config(tmp_path / "c.yaml")
    assert c.model_path(c.student) == str(tmp_path / "student.json")
    assert c.model_path("glm-130b") == "glm-130b"


def test_lr_and_weight_decay_default_and_round_trip():
    assert (Config().training.lr, Config().training.weight_decay) == (1e-4, 0.0)
    c = Config.from_dict({"training": {"optimizer": "adam", "lr": 3e-5, "weight_decay": 0.01}})
    assert (c.training.optimizer, c.training.lr, c.training.weight_decay) == ("adam", 3e-5, 0.01)
    data = json.loads(c.to_json())
    assert (data["training"]["lr"], data["training"]["weight_decay"]) == (3e-5, 0.01)
    assert Config.from_dict(data) == c


@pytest.mark.parametrize("interconnect", ["nvlink", "pcie", "infiniband", "ethernet"])
def test_known_interconnects_are_accepted(interconnect):
    assert (
        Config.from_dict({"hardware": {"interconnect": interconnect}}).hardware.interconnect == interconnect
    )
