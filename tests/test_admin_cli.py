"""`ftune db|keys|tenants`, run on the server against its database: the lists read every page."""

from __future__ import annotations

from ftune import admin
from ftune.cli import main


def test_keys_and_tenants_are_made_and_listed_across_pages(tmp_path, capsys, monkeypatch):
    home = str(tmp_path / "home")
    assert main(["db", "upgrade", "--home", home]) == 0
    monkeypatch.setattr(admin, "PAGE", 2)  # several pages with a handful of rows
    for name in ("team-a", "team-b", "team-c"):
        assert main(["tenants", "create", name, "--home", home]) == 0
    for _ in range(5):
        assert main(["keys", "create", "--tenant", "team-a", "--role", "member",
                     "--home", home]) == 0
    capsys.readouterr()
    assert main(["tenants", "list", "--home", home]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("default", "team-a", "team-b", "team-c"))
    assert main(["keys", "list", "--tenant", "team-a", "--home", home]) == 0
    assert capsys.readouterr().out.count(" member ") == 5
