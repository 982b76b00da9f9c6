"""Every benchmark JSON says where its figures came from (megagpt/provenance.py)."""
import datetime
import subprocess

from megagpt import provenance


def test_provenance_names_the_command_date_machine_versions_and_commit(monkeypatch):
    monkeypatch.setattr("sys.argv", ["tools/bench_x.py", "--config", "a b.json"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = provenance.provenance()
    assert p["command"].endswith("tools/bench_x.py --config 'a b.json'")    # quoted as typed
    assert datetime.datetime.fromisoformat(p["date"]).tzinfo is not None
    assert p["cpu"] and p["host"] and p["cpus"] >= 1 and p["gpu"] is None
    assert p["torch"] and p["python"] and p["triton_interpret"] == "1"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert (p["commit"] or "").split("+")[0] == head      # none outside a checkout (an sdist)


def test_outside_a_checkout_the_commit_is_none(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_commit() is None


def test_a_changed_checkout_is_marked(monkeypatch, tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert not provenance.git_commit().endswith("+changes")
    (tmp_path / "f").write_text("2")
    assert provenance.git_commit().endswith("+changes")
