"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_pretraining_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make pretrain", "make test"]
    # CI runs exactly the README's test command, then the drift check on the newest allowed versions.
    ci_commands = [
        line for line in (README.parent / ".ci" / "run").read_text().splitlines() if line.startswith("make ")
    ]
    assert ci_commands == ["make test", "make drift"]
    makefile = (README.parent / "Makefile").read_text()
    pretrain_recipe = makefile.split("\npretrain: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "accelerate launch $(ACCELERATE_ARGS) recipes/pretrain.py $(ARGS)" in pretrain_recipe


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md quickstart", "exec"), {})
    assert (tmp_path / "tiny-apertus" / "model.safetensors").exists()
    assert (tmp_path / "tiny-apertus" / "config.json").exists()
