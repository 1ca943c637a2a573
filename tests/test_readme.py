"""The README's commands work as written. Every fenced shell command that runs the pipeline
(directly, through torchrun, make, sbatch, docker or a sweep file) is split as the shell would
split it; the cheap ones run for real (summary, data, --version, report and mlflow-sync on an
empty store, every verb's --help), every named config loads with the command's overrides (so a
method, model or option the code does not know fails here), and the rest must at least parse."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.cli.options import paths_and_overrides
from pipeline.cli.main import COMMANDS, build_parser, main
from pipeline.config import load_config
from pipeline.methods import method_names

pytestmark = pytest.mark.unit
README = (REPO / "README.md").read_text()
# A usage line's placeholders: CONFIG, [--opt key=value …], <jobid>, DIR, …
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+$|[\[\]…<>]")


def shell_lines(text: str) -> list[str]:
    """The lines of every ```bash block, continuation lines joined; a heredoc's body lines are
    prefixed with ``<<`` (they are a file's contents, not commands)."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        heredoc = None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc is not None:
                if line.strip() == heredoc:
                    heredoc = None
                else:
                    lines.append("<<" + line)
                continue
            opened = re.search(r"<<'?(\w+)'?", line)
            heredoc = opened[1] if opened else None
            lines.append(line)
    return lines


def commands(lines: list[str]) -> list[list[str]]:
    """Each shell command as its words (comments dropped, `a && b` split)."""
    out = []
    for line in lines:
        if line.startswith("<<"):
            continue
        words: list[str] = []
        for word in shlex.split(line, comments=True) + ["&&"]:
            if word in ("&&", "||", ";"):
                out += [words] if words else []
                words = []
            else:
                words.append(word)
    return out


def sweep_files(lines: list[str]) -> dict[str, list[list[str]]]:
    """File name → its run lines, for files the README writes with a heredoc or printf."""
    files: dict[str, list[list[str]]] = {}
    current = None
    for line in lines:
        if line.startswith("<<") and current is not None:
            files[current].append(shlex.split(line[2:], comments=True))
            continue
        written = re.search(r"cat > (\S+) <<", line)
        if written:
            current = written[1]
            files[current] = []
        printed = re.match(r"printf '([^']*)' (.*?) > (\S+)", line)
        if printed:
            form, values, name = printed.groups()
            files[name] = [shlex.split(form.replace("\\n", "") % v) for v in values.split()]
    return files


def in_repo(word: str) -> str:
    """A path inside the image (/opt/pipeline/...) is the repository's file."""
    return str(REPO / word.removeprefix("/opt/pipeline/")) if word.startswith(
        ("configs/", "/opt/pipeline/configs/")) else word


def pipeline_argv(words: list[str], sweeps: dict[str, list[list[str]]]) -> list[list[str]]:
    """The `pipeline` argument lists a command runs (none when it runs no pipeline command)."""
    for i, word in enumerate(words):
        if word.endswith("/pipeline") or (word == "pipeline" and words[i - 1] == "-m"):
            return [words[i + 1:]]
        if word.startswith("pipeline:") and words[0] == "docker":  # docker run … IMAGE ARGS
            return [words[i + 1:]]
        if word == "trainer" and "compose" in words:  # docker compose run … trainer ARGS
            return [words[i + 1:]]
        if word == "slurm/train.sbatch":
            return [["train", *words[i + 1:]]]
        if word == "slurm/sweep.sbatch":
            name, overrides = words[i + 1], words[i + 2:]
            return [["train", *run, *overrides] for run in sweeps[name]]
    if words[:2] == ["make", "train"]:
        given = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        return [["train", given.get("CONFIG", "configs/digits/baseline.yaml"),
                 *shlex.split(given.get("ARGS", ""))]]
    return []


LINES = shell_lines(README)
SWEEPS = sweep_files(LINES)
RUNS = [argv for words in commands(LINES) for argv in pipeline_argv(words, SWEEPS)]


def test_the_readme_runs_every_command():
    verbs = {argv[0] for argv in RUNS if argv}
    assert {"train", "eval", "export", "data", "summary", "report", "mlflow-sync",
            "import"} <= verbs
    assert len(SWEEPS["sweeps/resnet18-methods.txt"]) == 3 and len(SWEEPS["sweep.txt"]) == 2


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest in ("command", "dataset", "kind")).choices


@pytest.mark.parametrize("argv", [a for a in RUNS if any(PLACEHOLDER.search(w) for w in a)],
                         ids=" ".join)
def test_usage_lines_name_existing_verbs_and_options(argv):
    parser = build_parser()
    if argv[0].startswith("--"):
        assert argv[0] in parser._option_string_actions
        return
    sub = _subparsers(parser)[argv[0]]
    if argv[0] == "data":
        sub = _subparsers(sub)[argv[1]]
    known = set(sub._option_string_actions)
    for word in argv:
        option = word.strip("[]").split("=")[0]
        if option.startswith("--"):
            assert option in known, f"{argv[0]} has no option {option}"


CONCRETE = [a for a in RUNS if not any(PLACEHOLDER.search(w) for w in a)]


@pytest.mark.parametrize("argv", [a for a in CONCRETE if a[0] == "train"], ids=" ".join)
def test_every_train_command_loads_its_config_with_its_overrides(argv):
    config, *overrides = argv[1:]
    load_config(in_repo(config), overrides)


@pytest.mark.parametrize("argv", [a for a in CONCRETE if a[0] in ("eval", "export", "predict")],
                         ids=" ".join)
def test_every_checkpoint_command_parses_and_its_config_loads(argv):
    args = build_parser().parse_args(argv)
    config, checkpoint, overrides = paths_and_overrides(args.args)
    assert checkpoint.endswith(".pt") or "checkpoints/" in checkpoint
    if config is not None:
        load_config(in_repo(config), overrides)


@pytest.mark.parametrize("argv", [a for a in CONCRETE if a[0] == "import"], ids=" ".join)
def test_import_commands_parse_and_name_a_convertible_model(argv):
    from pipeline.models.csg_import import LAYOUTS

    args = build_parser().parse_args(argv)
    assert args.model in LAYOUTS


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty working directory: no tracking store, no runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv", [a for a in CONCRETE
                                  if a[0] in ("summary", "report", "mlflow-sync")],
                         ids=" ".join)
def test_cheap_commands_run_for_real(argv, scratch, capsys):
    assert main(argv) == 0, capsys.readouterr().err
    assert not [line for line in capsys.readouterr().out.splitlines()
                if not line.startswith("{")]


def test_data_commands_run_for_real(scratch, capsys):
    """`data digits --out DIR` as written (in the scratch directory), then `data index` /
    `data check` on what it wrote (the README's /datasets/imagenet stands for any
    ImageNet-layout tree)."""
    data = sorted((a for a in CONCRETE if a[0] == "data"), key=lambda a: a[1] != "digits")
    assert [a[1] for a in data] == ["digits", "index", "check"]
    digits = scratch / data[0][data[0].index("--out") + 1]
    for argv in data:
        run = argv if argv[1] == "digits" else [*argv[:2], str(digits), *argv[3:]]
        assert main(run) == 0, capsys.readouterr().err
    assert (digits / "data-index.npz").is_file()


def test_version_and_every_help_run(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("pipeline ")
    parser = build_parser()
    verbs = _subparsers(parser)
    assert len(verbs) == len(COMMANDS)
    helps = [[verb, "--help"] for verb in verbs]
    helps += [[verb, kind, "--help"] for verb in ("data", "import")
              for kind in _subparsers(verbs[verb])]
    for argv in helps:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0 and "usage: pipeline" in capsys.readouterr().out, argv


def test_every_method_and_config_the_prose_names_exists():
    methods = set(method_names())
    table = re.search(r"^\| method \|.*?\n\n", README, re.M | re.S)[0]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == methods - {"baseline"}
    named = re.findall(r"method\.name\s*=\s*\"?(\w+)", README)
    assert named and set(named) <= methods, set(named) - methods
    for config in set(re.findall(r"(?<![\w/])configs/[\w/.-]+\.yaml", README)):
        assert (REPO / config).is_file(), config
        if not config.endswith("experiments.yaml"):
            load_config(REPO / config)
