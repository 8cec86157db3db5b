"""Custom model code (a config.json with auto_map): refused unless the model's entry says
`trust_remote_code: true`; then its classes are registered with transformers, the job plans, and one line
says whose code runs. Each case runs `gkd plan` in its own process, since registering changes
transformers' tables for the whole process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGURATION = """
from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "gkd_test_x"
"""
MODELING = """
from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
"""


def custom_model(folder: Path) -> Path:
    """A tiny model folder whose architecture exists only in its own configuration_x.py / modeling_x.py."""
    folder.mkdir()
    (folder / "configuration_x.py").write_text(CONFIGURATION)
    (folder / "modeling_x.py").write_text(MODELING)
    config = {
        "model_type": "gkd_test_x",
        "architectures": ["XForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        },
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 256,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def gkd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from gkd.cli import entry; sys.argv = ['gkd', *sys.argv[1:]]; entry()"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )


def python(code: str, hf_home: Path) -> str:
    """The stdout of `python -c code` in a process of its own (HF_HOME=hf_home: registering custom code
    changes transformers' tables for the whole process); a non-zero exit fails the test."""
    env = {**os.environ, "HF_HOME": str(hf_home)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def job(tmp_path: Path, student: object) -> str:
    config = {
        "teacher": "tiny-llama-teacher",
        "student": student,
        "methods": ["kd"],
        "hardware": {"gpus": 1},
        "training": {"seq_len": 32, "global_batch": 2},
    }
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_custom_code_is_refused_without_the_setting_and_planned_with_it(tmp_path: Path) -> None:
    custom_model(tmp_path / "x")
    refused = gkd(tmp_path, "plan", job(tmp_path, "x"))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert "auto_map" in refused.stderr and "trust_remote_code: true" in refused.stderr
    assert not (tmp_path / "hf" / "modules").exists()  # nothing of the model's code was copied or run

    planned = gkd(tmp_path, "plan", job(tmp_path, {"model": "x", "trust_remote_code": True}), "--json")
    assert planned.returncode in (0, 1), planned.stderr[-2000:]
    notices = [line for line in planned.stderr.splitlines() if "custom model code" in line]
    assert len(notices) == 1 and notices[0].endswith("/x (trust_remote_code: true)"), planned.stderr
    plan = json.loads(planned.stdout)
    resolved = plan["inputs"]["config"]
    assert resolved["trust_remote_code"] == [resolved["student"]] == [str((tmp_path / "x").resolve())]


def test_a_trusted_custom_model_builds_as_its_own_class(tmp_path: Path) -> None:
    folder = custom_model(tmp_path / "x")
    code = (
        "from gkd.models import build_model, resolve_model, trust_remote_code\n"
        f"trust_remote_code({str(folder)!r})\n"
        f"model = build_model(resolve_model({str(folder)!r}), device='cpu')\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    )
    stdout = python(code, tmp_path / "hf")
    assert stdout.split()[0] == "XForCausalLM"


def test_trust_remote_code_must_name_a_model_of_the_job() -> None:
    from gkd.config import Config
    from gkd.errors import InputError

    with pytest.raises(InputError, match="not the teacher or the student"):
        Config.from_dict(
            {"teacher": "tiny-llama-teacher", "student": "tiny-llama-student", "trust_remote_code": ["y"]}
        )
    with pytest.raises(InputError, match="true or false"):
        Config.from_dict({"student": {"model": "tiny-llama-student", "trust_remote_code": "yes"}})


@pytest.mark.slow
def test_a_trusted_custom_student_trains_and_is_saved_with_its_code(tmp_path: Path) -> None:
    """`gkd run` (2 steps, 2 processes) of a custom-code student: the workers build it, the notice is said
    once, and OUT/student carries the code files, so from_pretrained(trust_remote_code=True) loads it and
    gkd eval --trust-remote-code student evaluates it; gkd export of its checkpoint writes them too."""
    custom_model(tmp_path / "x")
    config = {
        "teacher": "tiny-llama-teacher",
        "student": {"model": "x", "trust_remote_code": True},
        "methods": ["kd"],
        "training": {"seq_len": 32, "global_batch": 4, "steps": 2},
    }
    (tmp_path / "job.json").write_text(json.dumps(config))
    ran = gkd(tmp_path, "run", "job.json", "--out", "run", "--processes", "2", "--save-every", "2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    output = ran.stdout + ran.stderr
    assert output.count("running the custom model code of") == 1, output
    student = tmp_path / "run" / "student"
    assert {"configuration_x.py", "modeling_x.py"} <= {p.name for p in student.iterdir()}
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(student)!r}, trust_remote_code=True)\n"
        "out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)\n"
        "print(type(model).__name__, out.shape[1])\n"
    )
    stdout = python(code, tmp_path / "hf2")
    assert stdout.split() == ["XForCausalLM", "6"]
    # gkd eval reads the saved student with the run's settings once its code is trusted.
    (tmp_path / "held.txt").write_text("\n".join(f"held-out line {i} of plain text" for i in range(12)))
    evaluated = gkd(
        tmp_path, "eval", "run/student", "--data", "held.txt", "--json", "--trust-remote-code", "student"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    figures = json.loads(evaluated.stdout)
    assert figures["seq_len"] == 32 and figures["loss"] > 0
    # gkd export trusts what the run's plan recorded as trusted, and writes the code files too.
    exported = gkd(tmp_path, "export", "run", "--out", "exported")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert {"configuration_x.py", "modeling_x.py", "model.safetensors"} <= {
        p.name for p in (tmp_path / "exported").iterdir()
    }


def test_a_custom_tokenizer_loads_only_from_a_trusted_folder(tmp_path: Path) -> None:
    """A tokenizer whose class is the folder's own code (auto_map in tokenizer_config.json) is loaded as that
    class for a trusted folder; for an untrusted one its code does not run (the standard class named in
    tokenizer_config.json, or a one-line refusal)."""
    folder = custom_model(tmp_path / "x")
    (folder / "tokenization_x.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class XTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    code = f"""
import json
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from gkd.errors import InputError
from gkd.models import trust_remote_code
from gkd.planner.specs import load_spec
from gkd.runtime.data import load_tokenizer

folder = Path({str(folder)!r})
bpe = Tokenizer(models.BPE(vocab={{"a": 0, "b": 1}}, merges=[]))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(folder))
config = json.loads((folder / "tokenizer_config.json").read_text())
config["auto_map"] = {{"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}}
(folder / "tokenizer_config.json").write_text(json.dumps(config))
trust_remote_code(folder)
spec = load_spec(str(folder))
print(type(load_tokenizer(str(folder), spec).tokenizer).__name__)
import gkd.models
gkd.models._TRUSTED.clear()
try:
    print(type(load_tokenizer(str(folder), spec).tokenizer).__name__)
except InputError as err:
    print("refused:", err)
"""
    stdout = python(code, tmp_path / "hf")
    lines = stdout.splitlines()
    assert lines[0] == "XTokenizer", stdout
    assert lines[1] != "XTokenizer", stdout  # the standard class, or a one-line refusal


def test_gkd_inspect_runs_custom_code_only_with_its_flag(tmp_path: Path) -> None:
    custom_model(tmp_path / "x")
    refused = gkd(tmp_path, "inspect", "x", "--seq-len", "16")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.count("\n") == 1 and "--trust-remote-code" in refused.stderr, refused.stderr
    assert not (tmp_path / "hf" / "modules").exists()  # nothing of the model's code was copied or run

    inspected = gkd(tmp_path, "inspect", "x", "--seq-len", "16", "--json", "--trust-remote-code")
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert inspected.stderr.count("running the custom model code of x") == 1, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["model"]["model_type"] == "gkd_test_x" and report["model"]["layers"] == 2


def _custom_model_with_weights(folder: Path) -> None:
    """custom_model(folder) with seeded random weights beside it (model.safetensors)."""
    custom_model(folder)
    code = (
        "import torch\n"
        "from safetensors.torch import save_file\n"
        "from gkd.models import build_model, resolve_model, trust_remote_code\n"
        f"trust_remote_code({str(folder)!r})\n"
        "torch.manual_seed(0)\n"
        f"model = build_model(resolve_model({str(folder)!r}), device='cpu')\n"
        f"save_file(model.state_dict(), {str(folder / 'model.safetensors')!r})\n"
    )
    python(code, folder.parent / "hf")


def test_gkd_eval_runs_custom_code_only_for_the_models_it_names(tmp_path: Path) -> None:
    """Student x and teacher y, both custom code of their own: each runs only when its role is named."""
    _custom_model_with_weights(tmp_path / "x")
    # y: the same code under its own model type (classes register per model type, for the whole process).
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    for name in ("config.json", "configuration_x.py"):
        path = tmp_path / "y" / name
        path.write_text(path.read_text().replace("gkd_test_x", "gkd_test_y"))
    (tmp_path / "held.txt").write_text("\n".join(f"held-out line {i} of plain text" for i in range(12)))
    common = ("eval", "x", "--teacher", "y", "--data", "held.txt", "--seq-len", "16", "--batch-size", "2")

    for trusted, refused_model in (("teacher", "x"), ("student", "y")):
        refused = gkd(tmp_path, *common, "--trust-remote-code", trusted)
        assert refused.returncode == 2, refused.stderr[-2000:]
        error = refused.stderr.splitlines()[-1]
        assert error.startswith(f"gkd: error: model {refused_model}: ") and "--trust-remote-code" in error
        assert "Traceback" not in refused.stderr
    no_teacher = gkd(tmp_path, "eval", "x", "--data", "held.txt", "--trust-remote-code", "teacher")
    assert no_teacher.returncode == 2 and "needs --teacher" in no_teacher.stderr, no_teacher.stderr

    ran = gkd(tmp_path, *common, "--json", "--trust-remote-code", "student", "--trust-remote-code", "teacher")
    assert ran.returncode == 0, ran.stderr[-2000:]
    notices = [line for line in ran.stderr.splitlines() if "running the custom model code of" in line]
    assert [line.split(" of ")[1].split()[0] for line in notices] == ["x", "y"], ran.stderr
    figures = json.loads(ran.stdout)
    # The same weights under two names: the same loss, and full agreement.
    assert figures["loss"] == pytest.approx(figures["teacher_loss"], rel=1e-6)
    assert figures["top1_agreement"] == 1.0


def test_a_model_type_registered_by_a_trusted_folder_does_not_trust_another(tmp_path: Path) -> None:
    """Classes register per model type for the whole process: a second folder of the same type, not trusted
    itself, is still refused once the first (trusted) one has registered them."""
    trusted, other = custom_model(tmp_path / "x"), tmp_path / "copy"
    shutil.copytree(trusted, other)
    code = (
        "from gkd.errors import InputError\n"
        "from gkd.models import resolve_model, trust_remote_code\n"
        f"trust_remote_code({str(trusted)!r})\n"
        f"print(resolve_model({str(trusted)!r}).model_type)\n"
        "try:\n"
        f"    resolve_model({str(other)!r})\n"
        "except InputError as err:\n"
        "    print('refused:', err)\n"
    )
    stdout = python(code, tmp_path / "hf")
    lines = stdout.splitlines()
    assert lines[0] == "gkd_test_x" and lines[1].startswith(f"refused: model {other}: "), stdout
