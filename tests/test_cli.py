import json

from pipeline.cli import build_parser
from pipeline.status import StatusRow, format_bytes, format_table
from tests.conftest import run_cli


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "resume", "status", "gc", "validate", "plan", "submit", "jobs", "logs", "stop"}
    for name, p in sub.choices.items():
        assert p.format_help().startswith(f"usage: vitpipe {name}"), name
    top = run_cli("--help")
    assert top.returncode == 0 and "examples:" in top.stdout and "vitpipe resume runs/tiny" in top.stdout


def test_status_of_a_missing_run_is_one_line(tmp_path):
    result = run_cli("status", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"vitpipe: error: {tmp_path / 'nope'}/config.json: not a vitpipe run directory " \
                                    "(no config.json); start it with `vitpipe run`"


def test_table_formatting():
    rows = [StatusRow("ingest", "smoke.generate", "done", 75.0, 2, 3 * 1024**2, ""),
            StatusRow("pretrain", "smoke.transform", "failed", 1.5, 0, 0, "OSError: boom")]
    lines = format_table(rows).splitlines()
    assert lines[1].split()[:5] == ["ingest", "smoke.generate", "done", "1m15s", "2"]
    assert lines[2].endswith("OSError: boom")
    assert format_bytes(512) == "512 B" and format_bytes(3 * 1024**3) == "3.0 GiB"
    assert json.dumps(rows[0].as_dict())
