"""Every `dcm` command of the README's single-node 8-GPU recipe resolves (--dry-run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main as dcm

README = Path(__file__).parents[1] / "README.md"


def recipe_commands() -> list[list[str]]:
    text = README.read_text()
    block = text.split("<!-- recipe:8gpu -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("|", 1)[0].strip()
        if line.startswith("dcm "):
            commands.append(shlex.split(line.replace('"$ARTIFACT"', "/runs/x/artifact"))[1:])
    return commands


def test_recipe_has_every_stage():
    assert [c[0] for c in recipe_commands()] == ["ingest", "distill", "generate", "serve"]


@pytest.mark.parametrize("argv", recipe_commands(), ids=lambda a: a[0])
def test_recipe_command_resolves(argv, capsys):
    with pytest.raises(SystemExit) as done:
        dcm([*argv, "--dry-run"])
    assert done.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    if argv[0] == "ingest":
        assert cfg["ingest"]["encode_actors"] == 8 and cfg["ingest"]["actor_gpus"] == "auto"
    if argv[0] == "distill":
        assert cfg["train"]["num_workers"] == 8 and cfg["train"]["use_gpu"] == "auto"
        assert re.fullmatch(r"/models/Wan2\.1-T2V-1\.3B-Diffusers", cfg["model"]["path"])
    if argv[0] == "serve":
        assert cfg["serve"]["max_replicas"] == 8 and cfg["serve"]["replica_gpus"] == "auto"
