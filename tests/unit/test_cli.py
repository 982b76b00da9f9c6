"""megagpt.cli: how the command-line programs exit."""
import pytest

from megagpt.cli import run_main


def test_run_main_exits_with_the_status_main_returns():
    with pytest.raises(SystemExit) as info:
        run_main(lambda: 2)
    assert info.value.code == 2


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tools/preprocess_data.py", "--input", "x"])

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_main(interrupted)
    assert info.value.code == 130
    assert capsys.readouterr().err == "preprocess_data.py: interrupted (Ctrl-C)\n"
