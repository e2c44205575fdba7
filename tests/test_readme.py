"""README.md stays short and honest: its code runs or parses, and its figures are read from results.

Figures. A table README quotes follows a marker ``<!-- table: PATH -->`` and is PATH's text
verbatim; PATH is a table that tests/test_results.py checks against its results. Every other
figure (a decimal number, or a number with a unit of time, memory or ratio) must be matched by
FIGURES below, which reads it from a committed results file, or be a name listed in NOT_FIGURES.
To show another default run, point DEFAULT_RUN and README's presets marker at its folder.
"""

import argparse
import contextlib
import importlib
import inspect
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import typing

import pytest

import tables  # experiments/ (on sys.path: conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EVIDENCE = ROOT / "experiments" / "README.md"
RESULTS = ROOT / "experiments" / "results"
MAX_LINES = 350

DEFAULT_RUN = RESULTS / "presets"  # the default run's table (default_runs.py --table-only) and its runs


def preset(name: str) -> dict:
    return json.loads((DEFAULT_RUN / "table.json").read_text())["runs"][name]


def pm(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def members_table() -> dict:
    return json.loads((RESULTS / "members-one-step" / "table.json").read_text())["runs"]["members2"]


def train_time_vs_full() -> float:
    return json.loads((RESULTS / "enhanced-preset" / "wall-vs-full.json").read_text())["train_ratio"]


# (regex of README text with one group per figure, the figures as read from results files)
FIGURES: list[tuple[str, typing.Callable[[], tuple[str, ...]]]] = [
    (r"classifier trained,\s+([\d.]+)% of the parameters, 3 epochs",
     lambda: (f"{preset('enhanced')['trainable_percent']:.2f}",)),
    (r"test MCC (\S+ ± \S+),\s+validation MCC (\S+ ± \S+); seed 0 took ([\d,]+) s wall",
     lambda: (pm(preset("enhanced")["test_mcc"]), pm(preset("enhanced")["validation_mcc"]),
              f"{json.loads((DEFAULT_RUN / 'enhanced-s0' / 'results.json').read_text())['wall_seconds']:,.0f}")),
    (r"adapter is (\S+) test MCC and (\S+) validation MCC against\s+full\s+fine-tuning \(3 seeds each, ([\d.]+)% of",
     lambda: (f"{preset('enhanced')['test_mcc']['mean'] - preset('full')['test_mcc']['mean']:+.4f}",
              f"{preset('enhanced')['validation_mcc']['mean'] - preset('full')['validation_mcc']['mean']:+.4f}",
              f"{preset('enhanced')['trainable_percent']:.2f}")),
    (r"in ([\d.]+)x\s+full fine-tuning's training time", lambda: (f"{train_time_vs_full():.2f}",)),
    (r"and (\S+) test MCC above plain\s+LoRA",
     lambda: (f"{preset('enhanced')['test_mcc']['mean'] - preset('lora')['test_mcc']['mean']:+.4f}",)),
    (r"reach (\S+ ± \S+) test MCC and (\S+ ± \S+) validation MCC",
     lambda: (pm(members_table()["test_mcc"]), pm(members_table()["validation_mcc"]))),
]
NOT_FIGURES = ("Python 3.10", "arXiv:2412.18729", "Llama-3.1-8B", "v1.0", "v1.1")  # versions and names, not measurements
FIGURE = re.compile(r"\d[\d,]*\.\d+|\d[\d,]*\s?(?:s|ms|min|h|MiB|GiB|GB|MB|x)\b")
MARKER = re.compile(r"^<!-- table: (\S+) -->\n", flags=re.M)


def readme() -> str:
    return README.read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", readme(), flags=re.S | re.M)


def test_readme_is_at_most_350_lines():
    assert len(readme().splitlines()) <= MAX_LINES


def test_readme_lora_example_runs_and_learns(capsys):
    block = next(b for b in blocks("python") if "flaxlora.init_lora" in b)
    assert len(block.strip().splitlines()) <= 22
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "layers_0/kernel" in out and "trainable:" in out
    first = float(namespace["optax"].softmax_cross_entropy_with_integer_labels(
        namespace["model"].apply({"params": namespace["params"]}, namespace["x"]), namespace["y"]).mean())
    assert float(namespace["loss"]) < first


def test_readme_python_blocks_run_or_call_what_exists():
    """A block that needs no trained run folder runs; one that does (``runs/...``) calls only
    functions that exist, and methods that the object those functions return has."""
    checked = 0
    for block in blocks("python"):
        if "flaxlora.init_lora" in block:  # the example: run by the test above
            continue
        if "runs/" not in block:
            exec(compile(block, str(README), "exec"), {})
            checked += 1
            continue
        returned = {}  # name -> the class a flaxlora function assigned to it returns
        for name, dotted in re.findall(r"^(\w+) = (flaxlora(?:\.\w+)+)\(", block, flags=re.M):
            returned[name] = typing.get_type_hints(resolve(dotted))["return"]
        for name, method in re.findall(r"^(\w+)\.(\w+)\(", block, flags=re.M):
            assert callable(getattr(returned[name], method, None)), f"README: {name}.{method} does not exist"
            checked += 1
    assert checked >= 2


def test_every_flaxlora_name_in_readme_exists():
    names = set(re.findall(r"\bflaxlora(?:\.\w+)+", readme()))
    assert len(names) > 10
    for dotted in sorted(names):
        resolve(dotted)


def resolve(dotted: str):
    """The module or attribute ``dotted`` names (``flaxlora.restore``, ``flaxlora.models.scan``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        with contextlib.suppress(ModuleNotFoundError):
            obj = importlib.import_module(".".join(parts[:i]))
            break
    for attr in parts[i:]:
        assert hasattr(obj, attr), f"README names {dotted}, which does not exist"
        obj = getattr(obj, attr)
    return obj


class Parsed(Exception):
    """Raised by parse_args once a command line has parsed: the command's work never starts."""


def command_lines() -> list[tuple[dict, list[str]]]:
    """(environment, words) of each command in README's bash blocks, ``&&`` chains split."""
    commands, env = [], {}
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                command = words[:words.index("&&")] if "&&" in words else words
                words = words[len(command) + 1:]
                if command[0] == "export":
                    env.update(w.split("=", 1) for w in command[1:])
                else:
                    commands.append((dict(env), command))
    return commands


def parse(module_name: str, argv: list[str], monkeypatch) -> argparse.Namespace | None:
    """Parse ``argv`` with the module's own parser, as its main() would, without running it;
    None when the parser exits (``--help``: status 0). Scripts whose main() reads sys.argv get it."""
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    takes_argv = bool(inspect.signature(module.main).parameters)
    try:
        module.main(argv) if takes_argv else module.main()
    except Parsed as parsed:
        if hasattr(module, "run_config"):  # qqp.py: the flags must also make a valid run configuration
            module.run_config(parsed.args[0])
        return parsed.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{module_name}.main() never parsed its arguments")


def check_python(words: list[str], monkeypatch, capsys) -> None:
    if words[1] == "-m":
        module, argv = words[2], words[3:]
        if module == "pytest":  # the test command itself (CI runs it)
            return
    else:
        script = ROOT / words[1]
        assert script.is_file() and script.parent.name == "experiments", f"README runs {words[1]}"
        module, argv = script.stem, words[2:]
    with pytest.raises(SystemExit) as help_exit:
        parse(module, ["--help"], monkeypatch)
    assert help_exit.value.code == 0, f"{module} --help"
    try:
        assert parse(module, argv, monkeypatch) is not None
    except SystemExit as error:
        pytest.fail(f"README: {shlex.join(words)}\n  does not parse: {error.code}")
    capsys.readouterr()


def check_tpu(words: list[str], env: dict, monkeypatch, capsys) -> None:
    """``tpu/tpu.sh ACTION ...``: its dry run succeeds, and the qqp.py flags of ``run -- ...`` parse."""
    argv = [*words[1:], "--dry-run"] if "--" not in words else [*words[1:words.index("--")], "--dry-run", *words[words.index("--"):]]
    done = subprocess.run(["bash", str(ROOT / words[0]), *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 0, f"README: {shlex.join(words)}: {done.stderr}"
    if "--" in words:
        check_python(["python", "experiments/qqp.py", *words[words.index("--") + 1:]], monkeypatch, capsys)


def test_readme_commands_parse(monkeypatch, capsys):
    commands = command_lines()
    assert len(commands) >= 10
    for env, words in commands:
        if words[0].endswith("python"):
            check_python(words, monkeypatch, capsys)
        elif words[0] == "tpu/tpu.sh":
            check_tpu(words, env, monkeypatch, capsys)
        else:
            assert words == ["bash", "setup.sh"], f"README: the test does not know how to check {shlex.join(words)}"


def quoted_tables(document: pathlib.Path) -> list[str]:
    return MARKER.findall(document.read_text())


@pytest.mark.parametrize("document", [README, EVIDENCE], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_tables_are_committed_tables_verbatim(document):
    text = document.read_text()
    checked = {str((RESULTS / path).relative_to(ROOT)) for path in tables.TABLES}
    checked |= {str(p.with_name("table.md").relative_to(ROOT)) for p in RESULTS.glob("*/table.json")}
    checked |= {"experiments/results/scaling/scaling.md", "experiments/results/buckets/buckets.md",
                "experiments/results/memory-model/readme.md"}  # all: test_results
    checked |= {str(p.relative_to(ROOT)) for p in RESULTS.glob("serve/*-*.md")}  # tests/test_serve.py
    paths = quoted_tables(document)
    assert paths
    for match in MARKER.finditer(text):
        path = match.group(1)
        assert path in checked, f"{document.name} quotes {path}, which tests/test_results.py does not check"
        quoted = (ROOT / path).read_text()
        assert text[match.end():match.end() + len(quoted)] == quoted, f"{document.name}: {path} is not quoted verbatim"


def test_readme_quotes_the_default_run_speed_and_memory_tables():
    assert set(quoted_tables(README)) == {f"{DEFAULT_RUN.relative_to(ROOT)}/table.md",
                                          "experiments/results/speed/vs-peft.md",
                                          "experiments/results/memory-model/readme.md"}


def prose(text: str) -> str:
    """README without what is checked elsewhere: quoted tables, code (comments kept), inline code, link targets."""
    for match in MARKER.finditer(text):
        quoted = (ROOT / match.group(1)).read_text()
        text = text.replace(quoted, "")
    text = MARKER.sub("", text)
    text = re.sub(r"^```\w*\n(.*?)^```", lambda m: "\n".join(
        line.split(" # ", 1)[1] for line in m.group(1).splitlines() if " # " in line), text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def test_every_figure_in_readme_is_read_from_results():
    text = prose(readme())
    for pattern, expected in FIGURES:
        match = re.search(pattern, text)
        assert match, f"README lacks the figure sentence {pattern!r} (tests/test_readme.py FIGURES)"
        assert match.groups() == expected(), f"README {match.group(0)!r}: the results say {expected()}"
        text = text[:match.start()] + text[match.end():]
    for name in NOT_FIGURES:
        text = text.replace(name, "")
    unread = FIGURE.findall(text)
    assert not unread, f"README figures not read from results (add them to FIGURES): {unread}"


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", [README, EVIDENCE, RESULTS / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_reach_files_and_headings(document):
    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", document.read_text())
    assert links
    for target, anchor in links:
        if target.startswith("http"):
            continue
        path = (document.parent / target).resolve() if target else document
        assert path.exists(), f"{document.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{document.name} links to {target}#{anchor}: no such heading"


def test_files_and_tests_readme_names_exist():
    text = readme()
    for path, test in re.findall(r"`((?:tests|experiments|flaxlora|tpu)/[\w/.-]*\w)(?:::(\w+))?`", text):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), flags=re.M), f"README names {path}::{test}"
